"""Parameter choice for SecAgg / SecAgg+ and configuration checks."""

from __future__ import annotations

import pytest

from secure_fl.crypto import DeterministicRandom
from secure_fl.errors import ConfigError
from secure_fl.secagg import harary_graph, make_config, secagg_parameters, secagg_plus_parameters
from secure_fl.secagg.graph import binom_cdf, binom_sf


def test_secagg_threshold_is_a_safe_majority() -> None:
    p = secagg_parameters(10, dropout_rate=0.1, corrupt_fraction=0.0)
    assert p.k == 9 and p.threshold == 6
    p = secagg_parameters(10, dropout_rate=0.1, corrupt_fraction=0.2)
    assert 2 * p.threshold > 10 + 2


def test_secagg_refuses_impossible_rates() -> None:
    with pytest.raises(ConfigError, match="dropout_rate"):
        secagg_parameters(10, dropout_rate=0.6, corrupt_fraction=0.0)
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        secagg_parameters(10, dropout_rate=0.1, corrupt_fraction=1.5)


def test_secagg_plus_neighbourhood_grows_logarithmically() -> None:
    small = secagg_plus_parameters(1000, dropout_rate=0.05, corrupt_fraction=0.05)
    large = secagg_plus_parameters(100_000, dropout_rate=0.05, corrupt_fraction=0.05)
    assert small.k < 1000 / 5
    assert large.k < small.k + 20  # 100x more sites, only a few more neighbours
    for p in (small, large):
        assert p.security_failure <= 2.0**-40
        assert p.correctness_failure <= 2.0**-30
        assert p.connectivity_failure <= 2.0**-40
        assert 2 * p.threshold > p.holders  # a majority of holders


def test_secagg_plus_falls_back_to_complete_graph_for_small_federations() -> None:
    p = secagg_plus_parameters(10, dropout_rate=0.1, corrupt_fraction=0.1)
    assert p.complete and p.k == 9


def test_binomial_tails() -> None:
    assert binom_sf(10, 0, 0.3) == 1.0
    assert binom_sf(10, 11, 0.3) == 0.0
    assert binom_cdf(10, 10, 0.3) == 1.0
    assert abs(binom_sf(4, 2, 0.5) - 11 / 16) < 1e-12
    assert abs(binom_cdf(4, 1, 0.5) - 5 / 16) < 1e-12


def test_harary_graph_is_regular_and_symmetric() -> None:
    ids = list(range(1, 31))
    graph = harary_graph(ids, 6, DeterministicRandom(1))
    assert all(len(v) == 6 for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])
    other = harary_graph(ids, 6, DeterministicRandom(2))
    assert graph != other  # positions are randomly permuted
    with pytest.raises(ConfigError, match="even"):
        harary_graph(ids, 5, DeterministicRandom(1))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        make_config([1, 2, 3], vector_length=4, bits=32, threshold=4)
    with pytest.raises(ConfigError, match="bits"):
        make_config([1, 2, 3], vector_length=4, bits=16, threshold=2)
    with pytest.raises(ConfigError, match="vector_length"):
        make_config([1, 2, 3], vector_length=0, bits=32, threshold=2)
    with pytest.raises(ConfigError, match="site_ids"):
        make_config([0, 1, 2], vector_length=4, bits=32, threshold=2)
    with pytest.raises(ConfigError, match="protocol"):
        make_config([1, 2, 3], vector_length=4, bits=32, protocol="secagg++")
    with pytest.raises(ConfigError, match="verify_keys"):
        make_config([1, 2, 3], vector_length=4, bits=32, threshold=2, active=True)
