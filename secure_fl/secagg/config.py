"""Round configuration shared by the server and every site of one SecAgg / SecAgg+ round."""

from __future__ import annotations

from collections.abc import Mapping
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
PROTOCOL_VERSION = "secure_fl/secagg/v2"
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
        """Domain-separation string binding protocol version, variant, round and purpose."""
        return (
            f"{PROTOCOL_VERSION}|{self.protocol}|k={self.degree}|active={int(self.active)}|"
            f"round={self.round_id}|{label}"
        ).encode()


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
) -> SecAggConfig:
    """Build a round configuration, choosing the degree and threshold when not given.

    For ``"secagg"`` the graph is complete and the default threshold comes from
    :func:`secagg_parameters`; for ``"secagg+"`` the default ``k`` and threshold come from
    :func:`secagg_plus_parameters` (Bell et al. 2020). The sparse graph itself is derived in the
    round from the sites' committed nonces, never chosen here; ``randbytes`` is accepted for
    compatibility and ignored (it used to draw the graph).

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
    )
