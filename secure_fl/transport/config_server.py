"""The federation server's configuration (``ServerConfig``) and its JSON loader.

Errors: every loader raises ConfigError naming the field (as a dotted path) and its allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.rounds.spec import AggregationSpec
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
class Deadlines:
    """Seconds. ``wait_for_sites_s``: how long a round waits for every roster site to be live
    before starting with those present; ``update_s``: time for sites to compute and report their
    update; ``phase_s``: each secure-aggregation phase; ``liveness_s``: a site silent for longer is
    not invited to a round; ``poll_wait_s``: longest long-poll; ``linger_s``: how long the server
    stays up after the last round so that sites learn it is over; ``heartbeat_s``: while the server
    waits for sites (joins, an update, a phase, uploads) it logs a ``waiting`` event this often."""

    wait_for_sites_s: float = 120.0
    update_s: float = 3600.0
    phase_s: float = 120.0
    liveness_s: float = 60.0
    poll_wait_s: float = 10.0
    linger_s: float = 10.0
    heartbeat_s: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "wait_for_sites_s",
            "update_s",
            "phase_s",
            "liveness_s",
            "poll_wait_s",
            "linger_s",
            "heartbeat_s",
        ):
            _positive(f"deadlines.{name}", getattr(self, name))


#: How updates are combined: the one typed aggregation spec of the round layer (see
#: :class:`secure_fl.rounds.spec.AggregationSpec`); the old name stays for importers. ``plain``
#: sends updates in the clear (a baseline, never for patient data; every site must allow it in its
#: own policy); the semi-honest variant needs ``active: false`` here *and*
#: ``policy.require_active: false`` in each site's config; ``ckks`` (see
#: :mod:`secure_fl.transport.ckks`) uses the ``ckks`` section of the config.
AggregationSettings = AggregationSpec


@dataclass(frozen=True)
class ModelSpec:
    """The initial global model: a tensors file (``path``), or zeros of ``shapes`` (float32)."""

    path: Path | None = None
    shapes: tuple[tuple[int, ...], ...] = ((16, 16), (16,))

    def __post_init__(self) -> None:
        if self.path is None and not self.shapes:
            raise ConfigError("model.shapes must name at least one tensor when model.path is null")


@dataclass(frozen=True)
class ServerConfig:
    """The federation server's configuration (see ``protocols/federation.md``).

    ``insecure_test_seed`` makes the server's random choices (the SecAgg+ graph) reproducible: for
    tests and benchmarks only. ``round_config``: a flat JSON object of scalars sent to every site
    each round (``RoundStart.round_config_json``: learning rate, local epochs, FedProx mu...).
    ``server_optimizer``: ``{"name": "fedavgm", "lr": 1.0, "momentum": 0.9}`` and so on
    (:func:`secure_fl.aggregators.server_opt.make_server_optimizer`), applied to the decoded mean
    (plain, secagg, secagg+; refused with ckks: the server cannot step an encrypted model).
    ``privacy``: a :class:`secure_fl.privacy.config.PrivacyConfig` the server enforces
    (:mod:`secure_fl.transport.privacy`), or None.

    Errors: ConfigError naming the field and the allowed range.
    """

    federation: str
    listen: str
    tls: TlsFiles
    roster: tuple[RosterEntry, ...]
    state_dir: Path
    rounds: int = 1
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    model: ModelSpec = field(default_factory=ModelSpec)
    deadlines: Deadlines = field(default_factory=Deadlines)
    limits: Limits = field(default_factory=Limits)
    min_sites: int = 2
    max_attempts: int = 3
    insecure_test_seed: int | None = None
    log_file: Path | None = None
    ckks: CkksFiles | None = None
    round_config: Mapping[str, Any] = field(default_factory=dict)
    server_optimizer: Mapping[str, Any] | None = None
    privacy: Any = None  # secure_fl.privacy.config.PrivacyConfig | None

    def __post_init__(self) -> None:
        _check_round_config(self.round_config)
        if self.server_optimizer is not None:
            if self.aggregation.protocol == "ckks":
                raise ConfigError(
                    "server_optimizer cannot be used with aggregation.protocol ckks: the server "
                    "holds only the encrypted model and cannot run an optimiser on it"
                )
            _server_optimizer(self.server_optimizer)  # validates name and options
        _check_roster(self.roster)
        _positive("rounds", self.rounds)
        _positive("max_attempts", self.max_attempts)
        if not isinstance(self.min_sites, int) or not 2 <= self.min_sites <= len(self.roster):
            raise ConfigError(
                f"min_sites must be an integer in [2, {len(self.roster)}] (the roster size), "
                f"got {self.min_sites!r}"
            )

    def site_by_name(self, name: str) -> RosterEntry | None:
        return next((e for e in self.roster if e.name == name), None)


def _check_round_config(value: object) -> None:
    """``round_config`` must be a flat JSON object of scalars. Errors: ConfigError."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"round_config must be a JSON object, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"round_config keys must be strings, got {key!r}")
        if item is not None and not isinstance(item, str | int | float | bool):
            raise ConfigError(
                f"round_config.{key} must be a JSON scalar (string, number, boolean or null), "
                f"got {type(item).__name__}"
            )
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"round_config.{key} must be finite, got {item!r}")


def make_server_optimizer_from(spec: Mapping[str, Any]) -> Any:
    """A fresh server optimiser for a ``server_optimizer`` object (``name`` plus its options).
    Errors: ConfigError naming ``server_optimizer.<field>``."""
    return _server_optimizer(spec)


def _server_optimizer(spec: Mapping[str, Any]) -> Any:
    from secure_fl.aggregators.server_opt import make_server_optimizer

    if not isinstance(spec, Mapping):
        raise ConfigError(f"server_optimizer must be a JSON object, got {type(spec).__name__}")
    options = {k: v for k, v in spec.items() if k != "name"}
    return make_server_optimizer(spec.get("name", "fedavg"), **options)


def _server_privacy(raw: object) -> Any:
    if raw is None:
        return None
    from secure_fl.privacy.config import PrivacyConfig

    if not isinstance(raw, Mapping):
        raise ConfigError(f"privacy must be a JSON object, got {type(raw).__name__}")
    return PrivacyConfig.from_dict(raw)


def _aggregation(s: _Section) -> AggregationSpec:
    """The ``aggregation`` section: an unknown key is refused listing the protocol's options; a
    key of another protocol only at its default value (files written with every key)."""
    sec = s.section("aggregation")
    protocol = sec.raw("protocol", "secagg+")
    options = {k: sec.raw(k) for k in sec.data if k != "protocol"}
    return AggregationSpec.from_options(protocol, options, where="aggregation", lenient=True)


def load_server_config(path: str | Path) -> ServerConfig:
    """Parse the server's JSON configuration. Errors: ConfigError naming the field."""
    data, base = _read_json(Path(path))
    s = _Section(data, "", base)
    aggregation = _aggregation(s)
    mod = s.section("model")
    shapes_raw = mod.raw("shapes", [[16, 16], [16]])
    if not isinstance(shapes_raw, list) or not all(
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        for shape in shapes_raw
    ):
        raise ConfigError("model.shapes must be a list of shapes (lists of integers > 0)")
    model = ModelSpec(path=mod.opt_path("path"), shapes=tuple(tuple(x) for x in shapes_raw))
    mod.done()
    dl = s.section("deadlines")
    deadlines = Deadlines(
        **{name: dl.float_(name) for name in Deadlines.__dataclass_fields__ if dl.has(name)}
    )
    dl.done()
    config = ServerConfig(
        federation=s.str_("federation"),
        listen=s.str_("listen"),
        tls=_tls(s),
        roster=_roster(s),
        state_dir=s.path("state_dir"),
        rounds=s.int_("rounds", 1),
        aggregation=aggregation,
        model=model,
        deadlines=deadlines,
        limits=_limits(s),
        min_sites=s.int_("min_sites", 2),
        max_attempts=s.int_("max_attempts", 3),
        insecure_test_seed=s.opt_int("insecure_test_seed"),
        log_file=s.opt_path("log_file"),
        ckks=_ckks(s),
        round_config=s.raw("round_config", None) or {},
        server_optimizer=s.raw("server_optimizer", None),
        privacy=_server_privacy(s.raw("privacy", None)),
    )
    s.done()
    return config
