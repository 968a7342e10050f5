"""Test helpers: random inputs, a recorder of the derived graph, and a model of which sites
survive each phase."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from secure_fl.secagg import Phase, RevealSet, SecAggConfig, commit, derive_graph
from secure_fl.secagg.messages import ServerMessage

Graph = Mapping[int, frozenset[int]]


def random_inputs(config: SecAggConfig, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if config.bits == 32 else np.uint64
    high = np.iinfo(dtype).max
    return {
        site: rng.integers(0, high, size=config.vector_length, dtype=dtype, endpoint=True)
        for site in config.site_ids
    }


def modular_sum(inputs: Mapping[int, np.ndarray], sites: frozenset[int], bits: int) -> np.ndarray:
    dtype = np.uint32 if bits == 32 else np.uint64
    length = len(next(iter(inputs.values())))
    total = np.zeros(length, dtype=dtype)
    for site in sites:
        total += inputs[site]  # unsigned numpy arithmetic wraps modulo 2**bits
    return total


class GraphRecorder:
    """An honest interceptor that records the graph the round derives (from the RevealSet)."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.graph: Graph | None = None if config.sparse else config.graph

    def __call__(self, phase: Phase, site: int, message: ServerMessage) -> ServerMessage:
        if isinstance(message, RevealSet) and self.graph is None:
            seed = commit.graph_seed(self.config.context("graph-seed"), dict(message.reveals))
            self.graph = derive_graph(self.config.site_ids, self.config.degree, seed)
        return message


def predict(
    config: SecAggConfig, dropouts: Mapping[int, Phase], graph: Graph | None = None
) -> frozenset[int] | None:
    """Survivor set U3 when the round should succeed, None when it must abort.

    Follows the specification in protocols/secagg.md: each site checks that at least ``threshold``
    of its share holders remain, in its own view; the server needs ``threshold`` answers in every
    phase and ``threshold`` verified shares of every secret it must reconstruct; a sparse round
    aborts when a site of U1 does not reveal its graph nonce. ``graph`` is the derived graph (needed
    for a sparse round that gets past the reveal phase).
    """
    t = config.threshold

    def alive(site: int, phase: Phase) -> bool:
        gone = dropouts.get(site)
        return gone is None or phase.value < gone.value

    u1 = frozenset(s for s in config.site_ids if alive(s, Phase.ADVERTISE_KEYS))
    if len(u1) < t:
        return None
    if config.sparse and any(not alive(s, Phase.REVEAL_NONCE) for s in u1):
        return None
    if graph is None:
        graph = config.graph

    def holders(site: int) -> frozenset[int]:
        return graph[site] | {site}

    u2 = frozenset(s for s in u1 if alive(s, Phase.SHARE_KEYS) and len(u1 & holders(s)) >= t)
    if len(u2) < t:
        return None
    u3 = frozenset(s for s in u2 if alive(s, Phase.MASKED_INPUT) and len(u2 & holders(s)) >= t)
    if len(u3) < t:
        return None

    def own_view_ok(site: int) -> bool:
        return len(u3 & holders(site)) >= t

    last = u3
    if config.active:
        last = frozenset(s for s in u3 if alive(s, Phase.CONSISTENCY_CHECK) and own_view_ok(s))
        if len(last) < t:
            return None
    # Active: each site counts the consistency signatures of its own share holders only.
    u5 = frozenset(
        s
        for s in last
        if alive(s, Phase.UNMASKING)
        and own_view_ok(s)
        and (not config.active or len(last & holders(s)) >= t)
    )
    if len(u5) < t:
        return None
    for owner in u2:
        if len(holders(owner) & u2 & u5) < t:
            return None
    return u3
