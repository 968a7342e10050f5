"""Round configuration shared by the server and every site of one SecAgg / SecAgg+ round."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from secure_fl.errors import ConfigError
from secure_fl.secagg.graph import (
    RandomBytes,
    complete_graph,
    harary_graph,
    secagg_parameters,
    secagg_plus_parameters,
    validate_graph,
)

PROTOCOLS = ("secagg", "secagg+")
PROTOCOL_VERSION = "secure_fl/secagg/v1"
_MAX_ID = 2**32 - 1


@dataclass(frozen=True)
class SecAggConfig:
    """Everything the parties of one round agree on before it starts.

    ``graph`` maps each site to its masking neighbours (all other sites for SecAgg). A site's
    secrets are Shamir-shared among its *holders*: its neighbours and itself, ``threshold`` of which
    reconstruct. ``active`` turns on the active-adversary variant (signed key advertisements and the
    consistency check); it needs every site's long-term Ed25519 public key in ``verify_keys``.

    Errors: ConfigError on any invalid field, naming it and its allowed range.
    """

    round_id: int
    site_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    bits: int
    graph: Mapping[int, frozenset[int]] = field(repr=False)
    protocol: str = "secagg"
    active: bool = False
    verify_keys: Mapping[int, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not isinstance(self.round_id, int) or not 0 <= self.round_id < 2**63:
            raise ConfigError(f"round_id must be an integer in [0, 2**63), got {self.round_id!r}")
        ids = self.site_ids
        if len(ids) < 2:
            raise ConfigError(f"site_ids must name at least 2 sites, got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ConfigError("site_ids must be distinct")
        for i in ids:
            if not isinstance(i, int) or not 1 <= i <= _MAX_ID:
                raise ConfigError(f"site_ids must be integers in [1, {_MAX_ID}], got {i!r}")
        if self.bits not in (32, 64):
            raise ConfigError(f"bits must be 32 or 64, got {self.bits!r}")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigError(f"vector_length must be an integer >= 1, got {self.vector_length!r}")
        graph = {i: frozenset(v) for i, v in self.graph.items()}
        validate_graph(ids, graph)
        object.__setattr__(self, "graph", MappingProxyType(graph))
        min_holders = min(len(v) for v in graph.values()) + 1
        if not isinstance(self.threshold, int) or not 2 <= self.threshold <= min_holders:
            raise ConfigError(
                f"threshold must be an integer in [2, {min_holders}] (the smallest number of share "
                f"holders of any site), got {self.threshold!r}"
            )
        if self.active:
            if self.verify_keys is None or set(self.verify_keys) != set(ids):
                raise ConfigError(
                    "verify_keys must hold one Ed25519 public key per site when active"
                )
            for i, key in self.verify_keys.items():
                if len(key) != 32:
                    raise ConfigError(f"verify_keys[{i}] must be 32 bytes, got {len(key)}")
            object.__setattr__(self, "verify_keys", MappingProxyType(dict(self.verify_keys)))

    def neighbours(self, site: int) -> frozenset[int]:
        """The sites whose pairwise masks ``site`` adds."""
        return self.graph[site]

    def holders(self, site: int) -> frozenset[int]:
        """The sites holding shares of ``site``'s secrets: its neighbours and itself."""
        return self.graph[site] | {site}

    def context(self, label: str) -> bytes:
        """Domain-separation string binding protocol version, variant, round and purpose."""
        return f"{PROTOCOL_VERSION}|{self.protocol}|round={self.round_id}|{label}".encode()


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
    """Build a round configuration, choosing the graph and threshold when not given.

    For ``"secagg"`` the graph is complete and the default threshold comes from
    :func:`secagg_parameters`; for ``"secagg+"`` the default ``k`` and threshold come from
    :func:`secagg_plus_parameters` (Bell et al. 2020) and the graph is a randomly permuted Harary graph
    drawn with ``randbytes`` (the OS CSPRNG when None).

    Errors: ConfigError on invalid combinations.
    """
    rb: RandomBytes = randbytes if randbytes is not None else os.urandom
    ids = sorted(site_ids)
    n = len(ids)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if n < 2:
        raise ConfigError(f"site_ids must name at least 2 sites, got {n}")
    if protocol == "secagg":
        if k is not None and k != n - 1:
            raise ConfigError(f"k is fixed to n-1={n - 1} for protocol 'secagg', got {k}")
        graph = complete_graph(ids)
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
        if not isinstance(k, int) or not (k == n - 1 or 2 <= k < n - 1):
            raise ConfigError(
                f"k must be {n - 1} (complete graph) or an even integer in [2, {n - 2}], got {k!r}"
            )
        graph = complete_graph(ids) if k == n - 1 else harary_graph(ids, k, rb)
    return SecAggConfig(
        round_id=round_id,
        site_ids=tuple(ids),
        threshold=threshold,
        vector_length=vector_length,
        bits=bits,
        graph=graph,
        protocol=protocol,
        active=active,
        verify_keys=verify_keys,
    )
