"""A site's configuration (``SiteConfig``), what it accepts from the server (``SitePolicy``),
what it computes (``TaskSpec``) and their JSON loader and writer.

Errors: every loader raises ConfigError naming the field (as a dotted path) and its allowed range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.transport.config_common import (
    AGGREGATIONS,
    CkksFiles,
    Limits,
    RosterEntry,
    TlsFiles,
    _check_roster,
    _ckks,
    _limits,
    _positive,
    _roster,
    _tls,
)
from secure_fl.transport.config_section import _read_json, _Section


@dataclass(frozen=True)
class TaskSpec:
    """What a site computes each round. ``kind`` ``"synthetic"`` is the deterministic test task
    (:class:`secure_fl.transport.tasks.SyntheticTask`); ``"python"`` loads ``factory``
    (``"package.module:callable"``), called with ``options`` as keyword arguments and returning a
    :class:`secure_fl.transport.tasks.SiteTask`."""

    kind: str = "synthetic"
    factory: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "python"):
            raise ConfigError(f"task.kind must be 'synthetic' or 'python', got {self.kind!r}")
        if self.kind == "python" and (not self.factory or ":" not in self.factory):
            raise ConfigError("task.factory must be 'package.module:callable' for kind 'python'")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


DEFAULT_POLICY_AGGREGATIONS = ("secagg", "secagg+", "ckks")


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts from the server, pinned in the site's own config (``policy``).

    The server is untrusted: whatever it announces is checked against this policy before the
    site computes, reports or sends anything derived from its data (see
    :mod:`secure_fl.transport.policy`). A round that breaks the policy is refused with a WARNING
    and the site leaves it without sending anything.

    ``aggregations``: the aggregations accepted. ``plain`` (updates in the clear) is accepted
    only when listed *and* ``allow_plain`` is true. ``require_active``: refuse the semi-honest
    SecAgg variant (default true). ``corrupt_fraction`` / ``dropout_rate``: the fraction of
    corrupt sites and of dropouts this site assumes; with the round's ``n`` (and ``k``) they give
    the smallest threshold (and, for SecAgg+, the smallest degree) the site accepts.
    ``vector_length``: the exact length of the flattened update, when known (else the size of the
    downloaded model is required). The privacy floor (distributed DP, checked by
    :class:`secure_fl.transport.privacy.SitePrivacy` before anything is sent): ``require_dp``
    refuses a SecAgg round without distributed DP noise; ``min_noise_multiplier`` refuses a
    round whose noise multiplier is below it (null: no floor on the multiplier);
    ``max_dp_rounds`` is the most DP rounds this site takes part in (counted by the site itself
    in ``state_dir/dp_rounds.jsonl``, :mod:`secure_fl.transport.site_dp`; null: no limit). A
    floor or a budget implies ``require_dp`` (a round without noise would bypass them): it is
    set to true here, and the config loader refuses ``require_dp: false`` written beside them.

    Errors: ConfigError naming the field and its allowed range.
    """

    aggregations: tuple[str, ...] = DEFAULT_POLICY_AGGREGATIONS
    allow_plain: bool = False
    require_active: bool = True
    corrupt_fraction: float = 0.0
    dropout_rate: float = 0.1
    vector_length: int | None = None
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_dp_rounds: int | None = None

    def __post_init__(self) -> None:
        aggs = self.aggregations
        if (
            not isinstance(aggs, tuple)
            or not aggs
            or any(a not in AGGREGATIONS for a in aggs)
            or len(set(aggs)) != len(aggs)
        ):
            raise ConfigError(
                f"policy.aggregations must be a non-empty list of distinct values from "
                f"{AGGREGATIONS}, got {aggs!r}"
            )
        if "plain" in aggs and self.allow_plain is not True:
            raise ConfigError(
                "policy.aggregations lists 'plain' (updates in the clear): set "
                "policy.allow_plain to true to accept it"
            )
        for name in ("corrupt_fraction", "dropout_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 <= float(value) < 0.5
            ):
                raise ConfigError(f"policy.{name} must be a number in [0, 0.5), got {value!r}")
        length = self.vector_length
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 1
        ):
            raise ConfigError(
                f"policy.vector_length must be an integer >= 1 or null, got {length!r}"
            )
        if not isinstance(self.require_dp, bool):
            raise ConfigError(f"policy.require_dp must be true or false, got {self.require_dp!r}")
        floor = self.min_noise_multiplier
        if floor is not None and (
            isinstance(floor, bool)
            or not isinstance(floor, int | float)
            or not 0.0 < float(floor) < float("inf")
        ):
            raise ConfigError(
                f"policy.min_noise_multiplier must be a finite number > 0 or null, got {floor!r}"
            )
        budget = self.max_dp_rounds
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise ConfigError(
                f"policy.max_dp_rounds must be an integer >= 1 or null, got {budget!r}"
            )
        if floor is not None or budget is not None:
            # A floor or a budget implies require_dp (class docstring).
            object.__setattr__(self, "require_dp", True)

    def accepts(self, aggregation: str) -> bool:
        """Whether this policy accepts ``aggregation`` at all."""
        if aggregation == "plain":
            return self.allow_plain and "plain" in self.aggregations
        return aggregation in self.aggregations


@dataclass(frozen=True)
class SiteConfig:
    """A site's configuration.

    ``roster`` is the provisioned roster (the site checks the server's round configuration
    against it); ``policy`` what it accepts from the server (:class:`SitePolicy`; a config
    without one gets the safe default: secagg / secagg+ / ckks, active, plain refused);
    ``signing_key`` its Ed25519 key for the active variant; ``output_model`` where the final
    model is written. ``insecure_test_seed`` makes this site's randomness reproducible (tests
    only). There are no test hooks in a site config: a test that needs a site to crash injects
    one (``SiteRunner(crash_hook=...)``); the old ``test_crash_before`` keys are refused as
    unknown.
    """

    federation: str
    name: str
    server: str
    server_name: str
    tls: TlsFiles
    roster: tuple[RosterEntry, ...]
    state_dir: Path
    task: TaskSpec = field(default_factory=TaskSpec)
    limits: Limits = field(default_factory=Limits)
    policy: SitePolicy = field(default_factory=SitePolicy)
    signing_key: Path | None = None
    output_model: Path | None = None
    reconnect_timeout_s: float = 300.0
    insecure_test_seed: int | None = None
    log_file: Path | None = None
    ckks: CkksFiles | None = None

    def __post_init__(self) -> None:
        _check_roster(self.roster)
        if not any(e.name == self.name for e in self.roster):
            raise ConfigError(f"name {self.name!r} is not on the roster")
        _positive("reconnect_timeout_s", self.reconnect_timeout_s)

    @property
    def site_id(self) -> int:
        return next(e.site_id for e in self.roster if e.name == self.name)


def _policy(s: _Section) -> SitePolicy:
    if not s.has("policy"):
        s.raw("policy")
        return SitePolicy()
    p = s.section("policy")
    aggs = p.raw("aggregations", list(DEFAULT_POLICY_AGGREGATIONS))
    if not isinstance(aggs, list) or not all(isinstance(a, str) for a in aggs):
        raise ConfigError(f"policy.aggregations must be a list of strings, got {aggs!r}")
    out = SitePolicy(
        aggregations=tuple(aggs),
        allow_plain=p.bool_("allow_plain", False),
        require_active=p.bool_("require_active", True),
        corrupt_fraction=p.float_("corrupt_fraction", 0.0),
        dropout_rate=p.float_("dropout_rate", 0.1),
        vector_length=p.opt_int("vector_length"),
        require_dp=p.bool_("require_dp", False),
        min_noise_multiplier=(
            p.float_("min_noise_multiplier")
            if p.has("min_noise_multiplier")
            else p.raw("min_noise_multiplier")
        ),
        max_dp_rounds=p.opt_int("max_dp_rounds"),
    )
    if p.has("require_dp") and p.raw("require_dp") is False:
        implied = [
            name
            for name in ("min_noise_multiplier", "max_dp_rounds")
            if getattr(out, name) is not None
        ]
        if implied:
            raise ConfigError(
                f"policy.require_dp is false but policy.{implied[0]} is set: a floor or a "
                "budget on DP rounds implies require_dp (a round without noise would bypass "
                "it); set require_dp to true or remove the field"
            )
    p.done()
    return out


def policy_to_json(policy: SitePolicy) -> dict[str, Any]:
    """The ``policy`` section of a site config (as :func:`load_site_config` reads it)."""
    return {
        "aggregations": list(policy.aggregations),
        "allow_plain": policy.allow_plain,
        "require_active": policy.require_active,
        "corrupt_fraction": policy.corrupt_fraction,
        "dropout_rate": policy.dropout_rate,
        "vector_length": policy.vector_length,
        "require_dp": policy.require_dp,
        "min_noise_multiplier": policy.min_noise_multiplier,
        "max_dp_rounds": policy.max_dp_rounds,
    }


def load_site_config(path: str | Path) -> SiteConfig:
    """Parse a site's JSON configuration. Errors: ConfigError naming the field."""
    data, base = _read_json(Path(path))
    s = _Section(data, "", base)
    t = s.section("task")
    options = t.raw("options", {})
    if not isinstance(options, dict):
        raise ConfigError("task.options must be a JSON object")
    task = TaskSpec(kind=t.str_("kind", "synthetic"), factory=t.opt_str("factory"), options=options)
    t.done()
    config = SiteConfig(
        federation=s.str_("federation"),
        name=s.str_("name"),
        server=s.str_("server"),
        server_name=s.str_("server_name"),
        tls=_tls(s),
        roster=_roster(s),
        state_dir=s.path("state_dir"),
        task=task,
        limits=_limits(s),
        policy=_policy(s),
        signing_key=s.opt_path("signing_key"),
        output_model=s.opt_path("output_model"),
        reconnect_timeout_s=s.float_("reconnect_timeout_s", 300.0),
        insecure_test_seed=s.opt_int("insecure_test_seed"),
        log_file=s.opt_path("log_file"),
        ckks=_ckks(s),
    )
    s.done()
    return config
