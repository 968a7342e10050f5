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

# The policy is the round layer's (a Flower node and a gRPC site pin the same one); kept importable
# from here for every existing caller.
from secure_fl.rounds.policy import DEFAULT_POLICY_AGGREGATIONS as DEFAULT_POLICY_AGGREGATIONS
from secure_fl.rounds.policy import SitePolicy as SitePolicy
from secure_fl.transport.config_common import (
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
