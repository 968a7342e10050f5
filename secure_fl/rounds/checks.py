"""A site's checks on a setup from the (untrusted) server, in one place, before anything is sent.

* :func:`config_from_setup` rebuilds the SecAggConfig and codec from a :class:`SecAggSetup`,
  binding every listed weight, the codec and the distributed-DP JSON (malformed: refused).
* :func:`check_roster` pins the participants and their keys to the provisioned roster.
* :func:`own_weight` computes the site's normalised weight itself from the listed weights.
* The site's policy (aggregation, variant, threshold, degree, vector length, colluders) is
  :func:`secure_fl.transport.policy.check_secagg_round`; :class:`SecAggSiteRound` calls all of
  them in order (see :meth:`secure_fl.rounds.secagg.SecAggSiteRound.on_setup`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

from secure_fl.encoding import FixedPointCodec
from secure_fl.errors import ConfigError, PolicyError, RemoteProtocolError
from secure_fl.rounds.messages import PlainSetup, SecAggSetup
from secure_fl.rounds.plan import round_binding
from secure_fl.secagg.config import SecAggConfig


def own_weight(
    listed: Mapping[int, float], site_id: int, reported: float, announced: float
) -> float:
    """A site's normalised weight, computed by the site itself from the setup's weights list.

    ``listed`` are every participant's weights as the server lists them, ``reported`` what this
    site reported and ``announced`` the normalised weight the server sent. The result is
    ``listed[site_id] / sum(listed)`` normalised exactly as
    :func:`secure_fl.encoding.plan_bit_width` does, so it is bit-identical to the server's plan.
    This (with the weights list bound into the round's keys, see ``SecAggConfig.binding``) stops
    a server from scaling this site's update up and the others' down to isolate it in the sum.

    Errors: PolicyError (before anything is sent) when this site is not listed, its listed weight
    differs from the one it reported, the result underflows to 0, or ``announced`` differs from
    it by more than 1e-12 relative.
    """
    if site_id not in listed:
        raise PolicyError("the setup lists no weight for this site")
    if listed[site_id] != float(reported):
        raise PolicyError(
            f"the setup lists this site's weight as {listed[site_id]!r}, it reported {reported!r}"
        )
    exact = [Fraction(listed[s]) for s in sorted(listed)]
    norm = float(Fraction(listed[site_id]) / sum(exact, Fraction(0)))
    if norm <= 0.0:
        raise PolicyError("this site's normalised weight underflows to 0")
    if abs(float(announced) - norm) > 1e-12 * norm:
        raise PolicyError(
            f"the setup's weight {announced!r} is not this site's share of the listed weights "
            f"({norm!r})"
        )
    return norm


def setup_weights(setup: SecAggSetup | PlainSetup) -> dict[int, float]:
    """Every participant's listed weight from ``setup`` (a SecAgg or plain setup).
    Errors: RemoteProtocolError unless there is exactly one finite weight > 0 per site id and
    their sum is finite."""
    weights = dict(setup.weights)
    if set(weights) != set(setup.site_ids) or len(set(setup.site_ids)) != len(setup.site_ids):
        raise RemoteProtocolError("the setup must list exactly one weight per site id")
    for s, w in weights.items():
        if not (isinstance(w, float) and math.isfinite(w) and w > 0):
            raise RemoteProtocolError(
                f"setup weights[{s}] (setup weight of site {s}) must be finite and > 0, got {w!r}"
            )
    if not math.isfinite(sum(weights.values())):
        raise RemoteProtocolError("setup weights must have a finite sum")
    return weights


def check_l2_clip(value: object) -> float | None:
    """A setup's ``l2_clip``: None or a finite float > 0.
    Errors: RemoteProtocolError naming the field otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RemoteProtocolError(f"setup l2_clip must be finite and > 0, got {value!r}")
    try:
        bound = float(value)
    except OverflowError:
        bound = math.inf
    if not (math.isfinite(bound) and bound > 0):
        raise RemoteProtocolError(f"setup l2_clip must be finite and > 0, got {value!r}")
    return bound


def config_from_setup(
    setup: SecAggSetup, *, max_length: int | None = None
) -> tuple[SecAggConfig, FixedPointCodec]:
    """Rebuild the round's SecAggConfig (bound to every listed weight, the codec and the
    distributed-DP JSON: :func:`~secure_fl.rounds.plan.round_binding`) and codec from ``setup``.

    Errors: RemoteProtocolError when the setup is malformed (weights not one per site, an
    invalid field, a normalised weight outside (0, 1]) or asks for vectors longer than
    ``max_length`` (the site's own bound on what it allocates)."""
    if not isinstance(setup, SecAggSetup):
        raise RemoteProtocolError(f"expected a SecAggSetup, got {type(setup).__name__}")
    if max_length is not None and setup.vector_length > max_length:
        raise RemoteProtocolError(
            f"setup asks for vectors of {setup.vector_length} values, the limit is {max_length}"
        )
    weights = setup_weights(setup)
    check_l2_clip(setup.l2_clip)
    try:
        codec = FixedPointCodec(
            bits=int(setup.bits), frac_bits=int(setup.frac_bits), clip_range=setup.clip_range
        )
        extra = setup.distributed_dp_json.encode("utf-8")
        config = SecAggConfig(
            round_id=setup.round_id,
            site_ids=tuple(sorted(setup.site_ids)),
            threshold=int(setup.threshold),
            vector_length=int(setup.vector_length),
            bits=int(setup.bits),
            protocol=setup.protocol,
            k=int(setup.k),
            active=setup.active,
            verify_keys=dict(setup.verify_keys) or None,
            binding=round_binding(weights, codec, int(setup.vector_length), extra, setup.l2_clip),
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"invalid round configuration from the server: {exc}") from exc
    if not (isinstance(setup.weight, float) and 0.0 < setup.weight <= 1.0):
        raise RemoteProtocolError(f"setup weight must be in (0, 1], got {setup.weight!r}")
    return config, codec


def check_roster(
    config: SecAggConfig, site_id: int, roster: Mapping[int, bytes | None] | None
) -> None:
    """Refuse a round that names a site off ``roster`` (provisioned site id -> Ed25519 verify
    key, None where none is pinned), omits this site, or (active variant) shows a verify key
    other than the provisioned one. ``roster`` None (in process): only this site's presence.
    Errors: RemoteProtocolError."""
    if site_id not in config.site_ids:
        raise RemoteProtocolError("this site is not in the round configuration")
    if roster is None:
        return
    for sid in config.site_ids:
        if sid not in roster:
            raise RemoteProtocolError(f"the round names site {sid}, which is not on the roster")
    if config.active:
        for sid, key in (config.verify_keys or {}).items():
            if roster[sid] != key:
                raise RemoteProtocolError(
                    f"the verification key of site {sid} differs from the provisioned one"
                )


__all__ = ["check_l2_clip", "check_roster", "config_from_setup", "own_weight", "setup_weights"]
