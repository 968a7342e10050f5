"""Commitments and the derived SecAgg+ graph."""

from __future__ import annotations

import pytest

from secure_fl.errors import ConfigError, LocalProtocolError
from secure_fl.secagg import commit, derive_graph, make_config


def test_graph_commitment_binds_sender_round_and_nonce() -> None:
    nonce = bytes(range(32))
    base = commit.graph_commitment(b"ctx", 1, nonce)
    assert len(base) == 32
    assert base != commit.graph_commitment(b"ctx", 2, nonce)
    assert base != commit.graph_commitment(b"ctx2", 1, nonce)
    assert base != commit.graph_commitment(b"ctx", 1, bytes(32))


def test_graph_seed_depends_on_every_reveal_but_not_their_order() -> None:
    reveals = {1: b"a" * 32, 2: b"b" * 32, 3: b"c" * 32}
    seed = commit.graph_seed(b"ctx", reveals)
    assert seed == commit.graph_seed(b"ctx", dict(reversed(list(reveals.items()))))
    assert seed != commit.graph_seed(b"ctx", {1: b"a" * 32, 2: b"b" * 32})
    assert seed != commit.graph_seed(b"ctx", {**reveals, 3: b"d" * 32})


def test_share_commitment_is_specific() -> None:
    args = (b"ctx", commit.MASK_KEY, 1, 2, b"s" * 32, b"x" * 37)
    c = commit.share_commitment(*args)
    assert c != commit.share_commitment(b"ctx", commit.SELF_SEED, 1, 2, b"s" * 32, b"x" * 37)
    assert c != commit.share_commitment(b"ctx", commit.MASK_KEY, 2, 1, b"s" * 32, b"x" * 37)
    assert c != commit.share_commitment(b"ctx", commit.MASK_KEY, 1, 2, b"t" * 32, b"x" * 37)
    assert commit.matches(c, commit.share_commitment(*args))


def test_derived_graph_is_regular_symmetric_and_deterministic() -> None:
    ids = list(range(1, 31))
    graph = derive_graph(ids, 6, b"\x07" * 32)
    assert graph == derive_graph(list(reversed(ids)), 6, b"\x07" * 32)
    assert all(len(v) == 6 for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])
    assert derive_graph(ids, 29, b"") == {i: frozenset(ids) - {i} for i in ids}
    with pytest.raises(ConfigError, match="32 bytes"):
        derive_graph(ids, 6, b"short")


def test_sparse_config_has_no_server_chosen_graph() -> None:
    config = make_config(
        list(range(1, 21)), vector_length=2, bits=32, protocol="secagg+", k=4, threshold=3
    )
    assert config.sparse and config.k == 4 and config.degree == 4
    with pytest.raises(LocalProtocolError, match="derived in the round"):
        _ = config.graph
    complete = make_config([1, 2, 3], vector_length=2, bits=32, threshold=2)
    assert not complete.sparse and complete.k == 2
    assert dict(complete.graph) == {
        1: frozenset({2, 3}),
        2: frozenset({1, 3}),
        3: frozenset({1, 2}),
    }
    with pytest.raises(ConfigError, match="even integer"):
        make_config(
            list(range(1, 21)), vector_length=2, bits=32, protocol="secagg+", k=5, threshold=3
        )
