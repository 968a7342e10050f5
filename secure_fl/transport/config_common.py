"""The parts shared by the server and the site configuration: protocol constants, TLS and CKKS
files, the roster, resource limits, their validators and their JSON section parsers.

Errors: ConfigError naming the field (as a dotted path) and its allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.rounds.policy import AGGREGATIONS as AGGREGATIONS
from secure_fl.transport.config_section import _Section

FEDERATION_PROTOCOL = "secure_fl/federation/v1"
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


# -- JSON parsing of the shared sections --------------------------------------------------------


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
