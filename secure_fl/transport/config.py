"""Configuration of the federation server and of a site: JSON files, parsed into frozen dataclasses.

``secure-fl provision`` writes one file per party; operators edit them. Relative paths are
resolved against the directory of the file. Unknown keys are refused (a typo must not silently
fall back to a default).

Errors: every loader raises :class:`~secure_fl.errors.ConfigError` naming the field (as a dotted
path) and its allowed range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.rounds.spec import AggregationSpec

FEDERATION_PROTOCOL = "secure_fl/federation/v1"
AGGREGATIONS = ("secagg", "secagg+", "plain", "ckks")
# The steps at which a test can make a site kill itself: ``SiteRunner(crash_hook=...)`` is called
# with one of these just before the step (an injected test hook, never a config key).
CRASH_POINTS = (
    "update",
    "advertise",
    "share_keys",
    "masked_input",
    "unmask",
    "ckks_upload",
)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the federation's CA certificate, this party's certificate and private key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class CkksFiles:
    """This party's CKKS artefact (the public context on the server, the secret context on a
    site) and the federation's CKKS fingerprint, as written by ``secure-fl provision``."""

    context: Path
    fingerprint: str


@dataclass(frozen=True)
class RosterEntry:
    """A site allowed in the federation.

    ``name`` is the common name of its certificate; ``site_id`` its id in the secure-aggregation
    protocol; ``cert_sha256`` (hex), when set, pins the exact certificate (a reissued certificate
    for the same name is refused until the roster is updated); ``verify_key`` is its long-term
    Ed25519 public key for the active SecAgg variant.
    """

    name: str
    site_id: int
    cert_sha256: str | None = None
    verify_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Limits:
    """Resource limits (both ends).

    ``max_message_bytes`` bounds any single gRPC message, ``chunk_bytes`` the data of one chunk
    (must leave room for framing within ``max_message_bytes``), ``max_payload_bytes`` one chunked
    payload. Server only: ``max_concurrent_rpcs`` in total, ``per_site_concurrency`` calls at once
    per site, ``rate_per_s`` / ``burst`` a token bucket per site, ``max_streams_per_connection``
    HTTP/2 streams per connection. Site only: ``max_vector_length`` the longest vector a site
    agrees to allocate.
    """

    max_message_bytes: int = 4 * 1024 * 1024
    chunk_bytes: int = 1024 * 1024
    max_payload_bytes: int = 2 * 1024 * 1024 * 1024
    max_concurrent_rpcs: int = 256
    per_site_concurrency: int = 4
    rate_per_s: float = 50.0
    burst: int = 100
    max_streams_per_connection: int = 16
    max_vector_length: int = 500_000_000

    def __post_init__(self) -> None:
        _positive("limits.max_message_bytes", self.max_message_bytes, minimum=64 * 1024)
        _positive("limits.chunk_bytes", self.chunk_bytes)
        if self.chunk_bytes + 1024 > self.max_message_bytes:
            raise ConfigError(
                "limits.chunk_bytes must leave 1024 bytes of framing within "
                f"limits.max_message_bytes={self.max_message_bytes}, got {self.chunk_bytes}"
            )
        _positive("limits.max_payload_bytes", self.max_payload_bytes)
        _positive("limits.max_concurrent_rpcs", self.max_concurrent_rpcs)
        _positive("limits.per_site_concurrency", self.per_site_concurrency)
        _positive("limits.rate_per_s", self.rate_per_s)
        _positive("limits.burst", self.burst)
        _positive("limits.max_streams_per_connection", self.max_streams_per_connection)
        _positive("limits.max_vector_length", self.max_vector_length)


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


def _positive(name: str, value: object, *, minimum: float = 0.0) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and float(value) > 0
        and float(value) >= minimum
    )
    if not ok:
        low = f">= {minimum:g}" if minimum else "> 0"
        raise ConfigError(f"{name} must be a finite number {low}, got {value!r}")


def _check_roster(roster: tuple[RosterEntry, ...]) -> None:
    if len(roster) < 2:
        raise ConfigError(f"roster must name at least 2 sites, got {len(roster)}")
    names = [e.name for e in roster]
    ids = [e.site_id for e in roster]
    if len(set(names)) != len(names) or len(set(ids)) != len(ids):
        raise ConfigError("roster names and site ids must be distinct")
    for e in roster:
        if not valid_name(e.name):
            raise ConfigError(f"roster name {e.name!r} must match [A-Za-z0-9._-]{{1,64}}")
        if not isinstance(e.site_id, int) or not 1 <= e.site_id < 2**32:
            raise ConfigError(
                f"roster site_id of {e.name!r} must be in [1, 2**32), got {e.site_id}"
            )
        if e.verify_key is not None and len(e.verify_key) != 32:
            raise ConfigError(f"roster verify_key of {e.name!r} must be 32 bytes")


def valid_name(name: object) -> bool:
    """Site and server names: 1-64 characters of ``[A-Za-z0-9._-]``, not starting with a dot."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    )


# -- JSON parsing -------------------------------------------------------------------------------


class _Section:
    """Typed access to one JSON object; :meth:`done` refuses keys nobody read."""

    def __init__(self, data: object, where: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'} must be a JSON object")
        self.data: dict[str, Any] = data
        self.where = where
        self.base = base
        self.read: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def str_(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)} must be a string, got {value!r}")
        return value

    def opt_str(self, key: str) -> str | None:
        return self.str_(key) if self.has(key) else self.raw(key)

    def int_(self, key: str, default: int | None = None) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be an integer, got {value!r}")
        return value

    def opt_int(self, key: str) -> int | None:
        return self.int_(key) if self.has(key) else self.raw(key)

    def float_(self, key: str, default: float | None = None) -> float:
        value = self.raw(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be a number, got {value!r}")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be true or false, got {value!r}")
        return value

    def path(self, key: str) -> Path:
        return (self.base / self.str_(key)).resolve()

    def opt_path(self, key: str) -> Path | None:
        return self.path(key) if self.has(key) else self.raw(key)

    def section(self, key: str) -> _Section:
        return _Section(self.raw(key, {}), self._name(key), self.base)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ConfigError(f"unknown keys in {self.where or 'config'}: {unknown}")


def _read_json(path: Path) -> tuple[dict[str, Any], Path]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a JSON object")
    return data, Path(path).resolve().parent


def _tls(s: _Section) -> TlsFiles:
    t = s.section("tls")
    out = TlsFiles(ca=t.path("ca"), cert=t.path("cert"), key=t.path("key"))
    t.done()
    return out


def _ckks(s: _Section) -> CkksFiles | None:
    if not s.has("ckks"):
        s.raw("ckks")
        return None
    c = s.section("ckks")
    out = CkksFiles(context=c.path("context"), fingerprint=c.str_("fingerprint"))
    c.done()
    return out


def _roster(s: _Section) -> tuple[RosterEntry, ...]:
    items = s.raw("roster")
    if not isinstance(items, list):
        raise ConfigError("roster must be a list of {name, site_id, ...} objects")
    out = []
    for i, item in enumerate(items):
        e = _Section(item, f"roster[{i}]", s.base)
        key = e.opt_str("verify_key")
        try:
            verify_key = bytes.fromhex(key) if key is not None else None
        except ValueError as exc:
            raise ConfigError(f"roster[{i}].verify_key must be hex") from exc
        out.append(
            RosterEntry(
                name=e.str_("name"),
                site_id=e.int_("site_id"),
                cert_sha256=e.opt_str("cert_sha256"),
                verify_key=verify_key,
            )
        )
        e.done()
    return tuple(out)


def _limits(s: _Section) -> Limits:
    sec = s.section("limits")
    defaults = Limits()
    kwargs: dict[str, Any] = {}
    for name in defaults.__dataclass_fields__:
        if sec.has(name):
            default = getattr(defaults, name)
            kwargs[name] = sec.float_(name) if isinstance(default, float) else sec.int_(name)
    sec.done()
    return Limits(**kwargs)


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
