"""Masking graphs and parameter selection for SecAgg and SecAgg+.

SecAgg (Bonawitz et al. 2017) masks every pair of sites: the complete graph. SecAgg+ (Bell et al. 2020)
masks each site with only ``k`` neighbours of a random sparse graph, and shares its secrets only with
those neighbours, which brings the per-site cost from O(n) down to O(log n).

The graph here is a Harary graph ``H(k, n)`` (a circulant: ring position ``i`` is joined to the ``k/2``
positions on each side) placed on the sites through a uniformly random permutation drawn from a
cryptographically secure source. It is ``k``-regular and ``k``-connected. The honest surviving sites
stay connected unless ``k/2`` consecutive ring positions all hold dropped or corrupt sites, which is
the event the parameter choice bounds. The parameter choice itself (thresholds, degrees, their
failure bounds) is in :mod:`secure_fl.secagg.parameters`; every name is importable from here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping

from secure_fl.errors import ConfigError
from secure_fl.secagg.parameters import (
    DEFAULT_ETA,
    DEFAULT_SIGMA,
    MaskingParameters,
    _warned,
    assumed_corrupt,
    binom_cdf,
    binom_sf,
    consistency_quorum,
    minimum_threshold,
    secagg_parameters,
    secagg_plus_parameters,
)

RandomBytes = Callable[[int], bytes]


def _randbelow(n: int, randbytes: RandomBytes) -> int:
    """Uniform integer in [0, n) by rejection sampling from ``randbytes`` (no modulo bias)."""
    if n <= 0:
        raise ConfigError(f"n must be positive, got {n}")
    nbits = max(1, (n - 1).bit_length())
    nbytes = (nbits + 7) // 8
    mask = (1 << nbits) - 1
    while True:
        value = int.from_bytes(randbytes(nbytes), "big") & mask
        if value < n:
            return value


def random_permutation(items: list[int], randbytes: RandomBytes) -> list[int]:
    """Fisher-Yates shuffle driven by ``randbytes``; uniform over all permutations."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = _randbelow(i + 1, randbytes)
        out[i], out[j] = out[j], out[i]
    return out


def complete_graph(ids: list[int]) -> dict[int, frozenset[int]]:
    """Every site is the neighbour of every other site (classic SecAgg)."""
    everyone = frozenset(ids)
    return {i: everyone - {i} for i in ids}


def harary_graph(ids: list[int], k: int, randbytes: RandomBytes) -> dict[int, frozenset[int]]:
    """A ``k``-regular Harary graph over ``ids`` with randomly permuted positions.

    Errors: ConfigError when ``k`` is odd, below 2, or not below ``len(ids)``.
    """
    n = len(ids)
    if k < 2 or k % 2 or k >= n:
        raise ConfigError(f"k must be an even integer in [2, {n - 1}] for n={n} sites, got {k}")
    ring = random_permutation(sorted(ids), randbytes)
    half = k // 2
    graph: dict[int, set[int]] = {i: set() for i in ids}
    for pos, node in enumerate(ring):
        for step in range(1, half + 1):
            other = ring[(pos + step) % n]
            graph[node].add(other)
            graph[other].add(node)
    return {i: frozenset(v) for i, v in graph.items()}


def validate_graph(ids: tuple[int, ...], graph: Mapping[int, frozenset[int]]) -> None:
    """Check that ``graph`` is a simple undirected graph over exactly ``ids``.

    Errors: ConfigError naming the first offending site.
    """
    idset = set(ids)
    if set(graph) != idset:
        raise ConfigError("graph must have exactly one neighbour set per site id")
    for node, neighbours in graph.items():
        if node in neighbours:
            raise ConfigError(f"graph: site {node} lists itself as a neighbour")
        if not neighbours <= idset:
            raise ConfigError(f"graph: site {node} has neighbours outside the roster")
        for other in neighbours:
            if node not in graph[other]:
                raise ConfigError(f"graph: edge {node}-{other} is not symmetric")


class _SeedStream:
    """Public, deterministic bytes from a 32-byte seed: SHA-256(label || seed || counter) blocks.

    Used only to expand the *public* graph seed into a permutation that every party recomputes; it
    protects nothing secret, so a hash-counter stream is enough (and needs no key handling)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = hashlib.sha256(
                b"secure_fl/secagg/graph-stream\x00" + self._seed + struct.pack(">Q", self._counter)
            ).digest()
            self._counter += 1
            self._buffer += block
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


def derive_graph(
    ids: list[int] | tuple[int, ...], k: int, seed: bytes
) -> dict[int, frozenset[int]]:
    """The masking graph every party recomputes from the public graph ``seed``.

    ``k == len(ids) - 1`` gives the complete graph (no seed needed; ``seed`` is ignored). Otherwise
    the ``k``-regular Harary graph whose ring positions are the Fisher-Yates permutation of the
    sorted ids driven by the seed's expansion. Guarantee: the graph is a deterministic function of
    ``(ids, k, seed)``, so a server that cannot choose the seed cannot choose the graph.

    Errors: ConfigError when ``k`` is not ``len(ids) - 1`` or an even integer in ``[2, len(ids) - 2]``,
    or the seed is not 32 bytes for a sparse graph.
    """
    ordered = sorted(ids)
    if k == len(ordered) - 1:
        return complete_graph(ordered)
    if len(seed) != 32:
        raise ConfigError(f"graph seed must be 32 bytes, got {len(seed)}")
    return harary_graph(ordered, k, _SeedStream(seed))


__all__ = [
    "DEFAULT_ETA",
    "DEFAULT_SIGMA",
    "MaskingParameters",
    "RandomBytes",
    "_warned",
    "assumed_corrupt",
    "binom_cdf",
    "binom_sf",
    "complete_graph",
    "consistency_quorum",
    "derive_graph",
    "harary_graph",
    "minimum_threshold",
    "random_permutation",
    "secagg_parameters",
    "secagg_plus_parameters",
    "validate_graph",
]
