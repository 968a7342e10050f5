"""Round configuration shared by the server and every site of one SecAgg / SecAgg+ round."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from secure_fl.errors import ConfigError, LocalProtocolError
from secure_fl.secagg.graph import (
    RandomBytes,
    complete_graph,
    secagg_parameters,
    secagg_plus_parameters,
)

PROTOCOLS = ("secagg", "secagg+")
PROTOCOL_VERSION = "secure_fl/secagg/v3"
BINDING_BYTES = 32
_MAX_ID = 2**32 - 1


@dataclass(frozen=True)
class SecAggConfig:
    """Everything the parties of one round agree on before it starts.

    ``k`` is the masking degree: ``None`` or ``n - 1`` is the complete graph (classic SecAgg, the only
    choice for ``"secagg"``); an even ``k`` in ``[2, n - 2]`` is a sparse SecAgg+ graph. The graph
    itself is NOT part of the configuration: a sparse graph is derived in the round from nonces
    every site commits to and reveals (see :mod:`secure_fl.secagg.commit`), so the server, which
    distributes this configuration, cannot choose it. A site's secrets are Shamir-shared among its
    *holders*: its neighbours and itself, ``threshold`` of which reconstruct. ``active`` turns on
    the active-adversary variant (signed key advertisements and the consistency check); it needs
    every site's long-term Ed25519 public key in ``verify_keys``. Whether a site accepts the
    threshold and the variant is its own :class:`~secure_fl.secagg.policy.SitePolicy`.

    ``binding`` is an opaque digest (empty, or 32 bytes) of whatever else the caller needs every
    party to agree on -- the transport puts :func:`encoding_binding` of every participant's weight
    and the fixed-point codec here. :meth:`context` binds it together with the roster, the
    threshold, ``k``, ``vector_length`` and ``bits``; since that context feeds every signature,
    commitment, share-encryption key and pairwise-mask seed, sites shown different values cannot
    complete a round together (the round aborts or sums garbage; it never isolates one input).

    Errors: ConfigError on any invalid field, naming it and its allowed range.
    """

    round_id: int
    site_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    bits: int
    protocol: str = "secagg"
    k: int | None = None
    active: bool = False
    verify_keys: Mapping[int, bytes] | None = field(default=None, repr=False)
    binding: bytes = field(default=b"", repr=False)
    _digest: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not isinstance(self.round_id, int) or not 0 <= self.round_id < 2**63:
            raise ConfigError(f"round_id must be an integer in [0, 2**63), got {self.round_id!r}")
        ids = tuple(self.site_ids)
        object.__setattr__(self, "site_ids", ids)
        if len(ids) < 2:
            raise ConfigError(f"site_ids must name at least 2 sites, got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ConfigError("site_ids must be distinct")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= _MAX_ID:
                raise ConfigError(f"site_ids must be integers in [1, {_MAX_ID}], got {i!r}")
        if self.bits not in (32, 64):
            raise ConfigError(f"bits must be 32 or 64, got {self.bits!r}")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigError(f"vector_length must be an integer >= 1, got {self.vector_length!r}")
        n = len(ids)
        k = n - 1 if self.k is None else self.k
        if self.protocol == "secagg" and k != n - 1:
            raise ConfigError(f"k is fixed to n-1={n - 1} for protocol 'secagg', got {k!r}")
        if (
            isinstance(k, bool)
            or not isinstance(k, int)
            or not (k == n - 1 or (2 <= k <= n - 2 and k % 2 == 0))
        ):
            raise ConfigError(
                f"k must be {n - 1} (complete graph) or an even integer in [2, {n - 2}], got {k!r}"
            )
        object.__setattr__(self, "k", k)
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int)
            or not 2 <= self.threshold <= k + 1
        ):
            raise ConfigError(
                f"threshold must be an integer in [2, {k + 1}] (the number of share holders of "
                f"each site), got {self.threshold!r}"
            )
        if self.active:
            if self.verify_keys is None or set(self.verify_keys) != set(ids):
                raise ConfigError(
                    "verify_keys must hold one Ed25519 public key per site when active "
                    "(pass active=False explicitly for the semi-honest variant)"
                )
            for i, key in self.verify_keys.items():
                if len(key) != 32:
                    raise ConfigError(f"verify_keys[{i}] must be 32 bytes, got {len(key)}")
            object.__setattr__(self, "verify_keys", MappingProxyType(dict(self.verify_keys)))
        if not isinstance(self.binding, bytes):
            raise ConfigError(f"binding must be bytes, got {type(self.binding).__name__}")
        if len(self.binding) not in (0, BINDING_BYTES):
            raise ConfigError(
                f"binding must be empty or {BINDING_BYTES} bytes, got {len(self.binding)} bytes"
            )
        object.__setattr__(self, "_digest", self._roster_digest())

    def _roster_digest(self) -> bytes:
        """SHA-256 of the roster, threshold, k, vector length, bits and binding (canonical)."""
        ids = sorted(self.site_ids)
        data = b"".join(
            (
                b"secure_fl/secagg/round-parameters/v1\x00",
                struct.pack(">I", len(ids)),
                b"".join(struct.pack(">I", i) for i in ids),
                struct.pack(">IIQB", self.threshold, self.degree, self.vector_length, self.bits),
                struct.pack(">B", len(self.binding)),
                self.binding,
            )
        )
        return hashlib.sha256(data).digest()

    @property
    def degree(self) -> int:
        """The masking degree ``k`` as an int (``n - 1`` for the complete graph)."""
        return self.k if self.k is not None else len(self.site_ids) - 1

    @property
    def sparse(self) -> bool:
        """True for a sparse SecAgg+ graph, which is derived in the round's reveal phase."""
        return self.degree < len(self.site_ids) - 1

    @property
    def graph(self) -> Mapping[int, frozenset[int]]:
        """The complete graph. Errors: LocalProtocolError for a sparse graph, which exists only
        once a round has derived it (``SecAggClient.graph`` / ``SecAggServer.graph``)."""
        if self.sparse:
            raise LocalProtocolError(
                "a sparse SecAgg+ graph is derived in the round from the sites' revealed nonces; "
                "use the client's or server's .graph after the reveal phase"
            )
        return MappingProxyType(complete_graph(list(self.site_ids)))

    def context(self, label: str) -> bytes:
        """Domain-separation string binding protocol version, variant, round, purpose and a
        SHA-256 digest of the roster (sorted ``site_ids``), ``threshold``, ``k``,
        ``vector_length``, ``bits`` and ``binding``. Every key agreement, commitment and
        signature of the round uses it, so two parties that were shown different values of any
        of these derive unrelated keys and reject each other's signatures."""
        return (
            f"{PROTOCOL_VERSION}|{self.protocol}|k={self.degree}|active={int(self.active)}|"
            f"round={self.round_id}|params={self._digest.hex()}|{label}"
        ).encode()


def encoding_binding(
    site_ids: Sequence[int],
    weights: Sequence[float],
    *,
    bits: int,
    frac_bits: int,
    clip_range: float,
    vector_length: int,
) -> bytes:
    """SHA-256 of a canonical encoding of every participant's (site id, reported weight), sorted
    by id, and the fixed-point codec (``bits``, ``frac_bits``, ``clip_range``) and
    ``vector_length``: everything that decides what each site puts into the sum. Passed as
    :attr:`SecAggConfig.binding`, it stops a server from giving sites different weights or codecs
    (e.g. weight 1 for one site and ~0 for the others) to isolate one site's update in the sum.

    Errors: ConfigError when the lengths differ, an id repeats, or a weight is not finite > 0.
    """
    if len(site_ids) != len(weights):
        raise ConfigError(
            f"weights must have one entry per site: {len(weights)} for {len(site_ids)}"
        )
    pairs = sorted(zip((int(i) for i in site_ids), (float(w) for w in weights), strict=True))
    if len({i for i, _ in pairs}) != len(pairs):
        raise ConfigError("site_ids must be distinct")
    for i, w in pairs:
        if not 1 <= i <= _MAX_ID:
            raise ConfigError(f"site_ids must be integers in [1, {_MAX_ID}], got {i!r}")
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"weight of site {i} must be finite and > 0, got {w!r}")
    data = b"".join(
        (
            b"secure_fl/secagg/encoding-binding/v1\x00",
            struct.pack(">IIdQ", int(bits), int(frac_bits), float(clip_range), int(vector_length)),
            struct.pack(">I", len(pairs)),
            b"".join(struct.pack(">Id", i, w) for i, w in pairs),
        )
    )
    return hashlib.sha256(data).digest()


def make_config(
    site_ids: list[int] | tuple[int, ...],
    *,
    vector_length: int,
    bits: int,
    protocol: str = "secagg",
    round_id: int = 0,
    threshold: int | None = None,
    k: int | None = None,
    dropout_rate: float = 0.05,
    corrupt_fraction: float = 0.05,
    active: bool = False,
    verify_keys: Mapping[int, bytes] | None = None,
    randbytes: RandomBytes | None = None,
    binding: bytes = b"",
) -> SecAggConfig:
    """Build a round configuration, choosing the degree and threshold when not given.

    For ``"secagg"`` the graph is complete and the default threshold comes from
    :func:`secagg_parameters`; for ``"secagg+"`` the default ``k`` and threshold come from
    :func:`secagg_plus_parameters` (Bell et al. 2020). The sparse graph itself is derived in the
    round from the sites' committed nonces, never chosen here; ``randbytes`` is accepted for
    compatibility and ignored (it used to draw the graph). ``binding`` is passed on to
    :attr:`SecAggConfig.binding` (e.g. :func:`encoding_binding`).

    Deployments should pass ``active=True`` with ``verify_keys``; every site's default
    :class:`~secure_fl.secagg.policy.SitePolicy` refuses the semi-honest variant.

    Errors: ConfigError on invalid combinations.
    """
    del randbytes  # the server no longer draws the graph
    ids = sorted(site_ids)
    n = len(ids)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if n < 2:
        raise ConfigError(f"site_ids must name at least 2 sites, got {n}")
    if protocol == "secagg":
        if k is not None and k != n - 1:
            raise ConfigError(f"k is fixed to n-1={n - 1} for protocol 'secagg', got {k}")
        k = n - 1
        if threshold is None:
            threshold = secagg_parameters(
                n, dropout_rate=dropout_rate, corrupt_fraction=corrupt_fraction
            ).threshold
    else:
        if k is None:
            params = secagg_plus_parameters(
                n, dropout_rate=dropout_rate, corrupt_fraction=corrupt_fraction
            )
            k = params.k
            if threshold is None:
                threshold = params.threshold
        elif threshold is None:
            raise ConfigError("threshold must be given when k is given for 'secagg+'")
    return SecAggConfig(
        round_id=round_id,
        site_ids=tuple(ids),
        threshold=threshold,
        vector_length=vector_length,
        bits=bits,
        protocol=protocol,
        k=k,
        active=active,
        verify_keys=verify_keys,
        binding=binding,
    )
