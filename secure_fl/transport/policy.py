"""A site's own policy, checked against what the (untrusted) server announces.

Guarantee (against a malicious server): a site computes, reports or sends nothing for a round
whose aggregation its config does not accept (``plain`` only when explicitly allowed), and sends
no SecAgg message (no advertisement, no masked input) for a round configuration that is not the
active variant (unless the site opted out), whose threshold is below the minimum the site derives
itself from ``n``, ``k`` and its own assumed corrupt fraction, whose sparse SecAgg+ degree ``k`` is
below the one the site would choose itself from its own dropout rate and corrupt fraction, in
which fewer than two sites are not assumed colluders (``n - c < 2``), or whose vector length is
not the model's (and the pinned one). Every refusal raises :class:`~secure_fl.errors.PolicyError` naming
what was asked and what the policy allows; the site logs it at WARNING and leaves the round.

The threshold rule (Bonawitz et al. 2017, section 6): with ``h = k + 1`` share holders per site of
which ``c`` may be corrupt, the active variant needs ``2t > h + c`` (the server cannot collect ``t``
shares of both secrets of one honest site), the semi-honest one ``t > c``; never below 2.
:func:`secure_fl.secagg.graph.minimum_threshold` computes it (for SecAgg+ the number of corrupt
holders is bounded statistically).
"""

from __future__ import annotations

import json
import math
from typing import Any

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.secagg.graph import minimum_threshold as _core_minimum_threshold
from secure_fl.secagg.graph import secagg_plus_parameters
from secure_fl.transport.config import SitePolicy


def minimum_threshold(num_sites: int, k: int, corrupt_fraction: float, *, active: bool) -> int:
    """The smallest threshold this site accepts in a round of ``num_sites`` sites where each
    site has ``k`` neighbours (``k = n - 1`` for SecAgg): the SecAgg core's
    :func:`~secure_fl.secagg.graph.minimum_threshold`. Errors: PolicyError when no threshold is
    secure for this round (too many corrupt sites for the neighbourhood)."""
    try:
        return int(_core_minimum_threshold(num_sites, k, corrupt_fraction, active=active))
    except ConfigError as exc:
        raise PolicyError(f"no threshold is secure for this round: {exc}") from exc


def minimum_degree(num_sites: int, dropout_rate: float, corrupt_fraction: float) -> int:
    """The smallest SecAgg+ degree ``k`` this site accepts among ``num_sites`` sites: the one it
    would choose itself (:func:`~secure_fl.secagg.graph.secagg_plus_parameters`, Bell et al.
    2020). A smaller ``k`` raises the chance that all of a site's neighbours are corrupt or
    dropped, which reveals its input. Errors: PolicyError when the rates admit no degree."""
    try:
        return int(
            secagg_plus_parameters(
                num_sites, dropout_rate=dropout_rate, corrupt_fraction=corrupt_fraction
            ).k
        )
    except ConfigError as exc:
        raise PolicyError(f"no SecAgg+ degree is secure for this round: {exc}") from exc


def check_aggregation(policy: SitePolicy, aggregation: str) -> None:
    """Refuse an aggregation the site's policy does not accept (PolicyError)."""
    if aggregation == "plain" and not policy.accepts("plain"):
        raise PolicyError(
            "the server asks for 'plain' aggregation (this site's update in the clear); this "
            "site's policy refuses it (set policy.allow_plain and list 'plain' to accept it)"
        )
    if not policy.accepts(aggregation):
        raise PolicyError(
            f"the server asks for aggregation {aggregation!r}; this site's policy accepts "
            f"{list(policy.aggregations)}"
        )


def dp_required(policy: Any) -> bool:
    """Whether ``policy`` requires distributed DP noise in every round: ``require_dp``, or
    implied by a noise floor (``min_noise_multiplier``) or a budget of DP rounds
    (``max_dp_rounds``): a floor or a budget that a round *without* noise could bypass would
    protect nothing."""
    return bool(
        getattr(policy, "require_dp", False)
        or getattr(policy, "min_noise_multiplier", None) is not None
        or getattr(policy, "max_dp_rounds", None) is not None
    )


def check_privacy_floor(policy: SitePolicy, aggregation: str) -> None:
    """Refuse, at the round's start, an aggregation that cannot carry the distributed DP noise
    this site's policy requires (:func:`dp_required`: ``policy.require_dp``, or implied by
    ``policy.min_noise_multiplier`` / ``policy.max_dp_rounds``; only SecAgg / SecAgg+ rounds
    whose setup carries noise at or above the floor, checked at the setup). Errors:
    PolicyError."""
    if dp_required(policy) and aggregation not in ("secagg", "secagg+"):
        raise PolicyError(
            f"the server asks for aggregation {aggregation!r}, which carries no distributed DP "
            "noise; this site's policy requires it (policy.require_dp, implied by "
            "policy.min_noise_multiplier and policy.max_dp_rounds: secagg or secagg+ with "
            "noise at or above the floor)"
        )


#: The longest JSON text a site parses from a server instruction (round config, DP config).
MAX_INSTRUCTION_JSON_CHARS = 64 * 1024
#: The deepest nesting of arrays / objects a site accepts in such a JSON text.
MAX_INSTRUCTION_JSON_DEPTH = 32


def bounded_json(
    text: str,
    field: str,
    *,
    max_chars: int = MAX_INSTRUCTION_JSON_CHARS,
    max_depth: int = MAX_INSTRUCTION_JSON_DEPTH,
) -> Any:
    """Parse ``text`` (the server-sent JSON field named ``field``) after checking, without
    recursion, that it is at most ``max_chars`` characters long and nests arrays / objects at
    most ``max_depth`` deep (so that a hostile server cannot exhaust the parser's recursion or
    the site's memory). Errors: ValueError naming ``field``, the limit and what was sent."""
    if len(text) > max_chars:
        raise ValueError(
            f"{field} is {len(text)} characters long; at most {max_chars} are accepted"
        )
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise ValueError(
                        f"{field} nests arrays/objects more than {max_depth} deep; at most "
                        f"{max_depth} levels are accepted"
                    )
        elif ch in "]}":
            depth -= 1
    return json.loads(text)


def check_secagg_round(
    policy: SitePolicy,
    *,
    announced: str,
    protocol: str,
    active: bool,
    num_sites: int,
    k: int,
    threshold: int,
    vector_length: int,
    model_length: int,
    roster_size: int | None = None,
) -> None:
    """Check a SecAgg / SecAgg+ round configuration against ``policy`` before anything is sent.

    ``announced``: the aggregation of the round start; ``k``: the smallest neighbourhood in the
    round (``num_sites - 1`` for SecAgg); ``model_length``: the size of the model the site
    downloaded; ``roster_size``: the number of sites in the federation as provisioned.

    The number of sites that may collude with the server is ``c = ceil(corrupt_fraction *
    roster_size)`` *whatever the size of the round*: the server chooses who takes part, and a
    server that invites only a few sites must not thereby shrink the number of colluders the site
    assumes (c colluders among a small round are a large fraction of it). The thresholds and
    degree are then checked at the round's own fraction ``c / num_sites``. A round with
    ``num_sites - c < 2`` is refused outright: every other participant could be a colluder, and
    the sum minus their inputs would be this site's input (two-site rounds with ``c = 0`` pass).
    Errors: PolicyError naming the field and what the policy allows.
    """
    check_aggregation(policy, protocol)
    if protocol != announced:
        raise PolicyError(
            f"the round started as {announced!r} but its configuration is {protocol!r}"
        )
    if policy.require_active and not active:
        raise PolicyError(
            "the server asks for the semi-honest SecAgg variant (active=false); this site's "
            "policy requires the active variant (policy.require_active)"
        )
    expected = policy.vector_length if policy.vector_length is not None else model_length
    if vector_length != expected or vector_length != model_length:
        raise PolicyError(
            f"the round's vector_length is {vector_length}; this site expects {expected} "
            f"(the model has {model_length} values)"
        )
    colluders = round_colluders(policy.corrupt_fraction, num_sites, roster_size)
    if num_sites - colluders < 2:
        raise PolicyError(
            f"the round has {num_sites} sites and this site assumes up to {colluders} colluders "
            f"(policy.corrupt_fraction={policy.corrupt_fraction} of {roster_size or num_sites} "
            "rostered sites); with fewer than 2 sites beyond them the sum minus the colluders' "
            f"inputs is this site's input: a round needs at least {colluders + 2} sites"
        )
    fraction = round_corrupt_fraction(policy.corrupt_fraction, num_sites, roster_size)
    if k < num_sites - 1:
        min_k = minimum_degree(num_sites, policy.dropout_rate, fraction)
        if k < min_k:
            raise PolicyError(
                f"the round's masking degree k={k} is below this site's minimum {min_k} (n="
                f"{num_sites}, dropout_rate={policy.dropout_rate}, corrupt_fraction="
                f"{fraction:g} of this round)"
            )
    minimum = minimum_threshold(num_sites, k, fraction, active=active)
    if threshold < minimum:
        raise PolicyError(
            f"the round's threshold {threshold} is below this site's minimum {minimum} (n="
            f"{num_sites}, k={k}, corrupt_fraction={fraction:g} of this round, from "
            f"policy.corrupt_fraction={policy.corrupt_fraction} of {roster_size or num_sites} "
            f"rostered sites, active={active})"
        )


def round_colluders(corrupt_fraction: float, num_sites: int, roster_size: int | None) -> int:
    """The number of sites that may collude with the server in a round of ``num_sites``:
    ``ceil(corrupt_fraction * roster_size)`` (the federation as provisioned, at least the round),
    whatever the size of the round."""
    total = max(num_sites, roster_size or num_sites)
    return math.ceil(corrupt_fraction * total - 1e-12)


def round_corrupt_fraction(
    corrupt_fraction: float, num_sites: int, roster_size: int | None
) -> float:
    """The fraction of a round's ``num_sites`` sites that may collude with the server when up to
    ``ceil(corrupt_fraction * roster_size)`` sites of the whole federation may (at most 1)."""
    return min(1.0, round_colluders(corrupt_fraction, num_sites, roster_size) / num_sites)


def describe(policy: SitePolicy) -> dict[str, Any]:
    """Log fields describing ``policy`` (no secrets)."""
    return {
        "aggregations": list(policy.aggregations),
        "require_active": policy.require_active,
        "corrupt_fraction": policy.corrupt_fraction,
        "dropout_rate": policy.dropout_rate,
        "vector_length": policy.vector_length,
        "require_dp": policy.require_dp,
        "min_noise_multiplier": policy.min_noise_multiplier,
        "max_dp_rounds": policy.max_dp_rounds,
    }
