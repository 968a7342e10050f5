"""The site's own threshold rule, its policy, and small federations."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_fl.crypto import SigningKey
from secure_fl.errors import ConfigError, PolicyError
from secure_fl.secagg import (
    SecAggClient,
    SitePolicy,
    make_config,
    minimum_threshold,
    run_round,
    secagg_parameters,
    secagg_plus_parameters,
)
from secure_fl.secagg import graph as graph_module


def test_minimum_threshold_complete_graph_follows_bonawitz() -> None:
    # active: 2t > n + c; semi-honest: t > c
    assert minimum_threshold(10, 9, 0.0) == 6
    assert minimum_threshold(10, 9, 0.2) == 7  # c = 2: 2t > 12
    assert minimum_threshold(9, 8, 0.0) == 5
    assert minimum_threshold(10, 9, 0.2, active=False) == 3
    assert minimum_threshold(10, 9, 0.0, active=False) == 2  # never below 2
    assert minimum_threshold(2, 1, 0.0) == 2
    assert minimum_threshold(2, 1, 0.4) == 2


def test_minimum_threshold_sparse_graph() -> None:
    # no corruption: a strict majority of the k + 1 holders
    assert minimum_threshold(1000, 10, 0.0) == 6
    t = minimum_threshold(1000, 40, 0.05)
    assert 2 * t > 41 and t <= 41
    # many corrupt sites: only "all holders" is safe (the owner never reveals both secrets)
    assert minimum_threshold(1000, 4, 0.3) == 5


@given(
    n=st.integers(min_value=3, max_value=400),
    dropout=st.sampled_from([0.0, 0.01, 0.05, 0.1]),
    corrupt=st.sampled_from([0.0, 0.01, 0.05, 0.1]),
)
def test_parameter_choice_meets_the_site_minimum(n: int, dropout: float, corrupt: float) -> None:
    try:
        params = secagg_plus_parameters(n, dropout_rate=dropout, corrupt_fraction=corrupt)
    except ConfigError:
        return
    assert params.threshold >= minimum_threshold(n, params.k, corrupt)


def test_minimum_threshold_names_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="num_sites"):
        minimum_threshold(1, 1, 0.0)
    with pytest.raises(ConfigError, match="k must be"):
        minimum_threshold(5, 5, 0.0)
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        minimum_threshold(5, 4, 1.0)


def test_policy_refuses_low_threshold_and_semi_honest() -> None:
    keys = {i: SigningKey.generate() for i in range(1, 6)}
    verify = {i: k.public_bytes for i, k in keys.items()}
    low = make_config(
        [1, 2, 3, 4, 5], vector_length=2, bits=32, threshold=2, active=True, verify_keys=verify
    )
    with pytest.raises(PolicyError, match="threshold 2 is below this site's minimum 3"):
        SecAggClient(1, low, signing_key=keys[1])
    semi = make_config([1, 2, 3, 4, 5], vector_length=2, bits=32, threshold=3)
    with pytest.raises(PolicyError, match="require_active=False"):
        SecAggClient(1, semi)
    assert SitePolicy(corrupt_fraction=0.2).required_threshold(low) == 4
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        SitePolicy(corrupt_fraction=1.5)


def test_two_sites_use_threshold_two_and_warn(caplog: pytest.LogCaptureFixture) -> None:
    graph_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="secure_fl.secagg"):
        params = secagg_parameters(2, dropout_rate=0.05, corrupt_fraction=0.05)
        secagg_parameters(2, dropout_rate=0.05, corrupt_fraction=0.05)
    assert params.threshold == 2 and params.k == 1
    warnings = [r for r in caplog.records if "derive the other's update" in r.getMessage()]
    assert len(warnings) == 1  # logged once
    assert secagg_plus_parameters(2).threshold == 2
    keys = {i: SigningKey.generate() for i in (1, 2)}
    config = make_config(
        [1, 2],
        vector_length=3,
        bits=32,
        protocol="secagg+",
        active=True,
        verify_keys={i: k.public_bytes for i, k in keys.items()},
    )
    inputs = {1: np.array([1, 2, 3], dtype=np.uint32), 2: np.array([10, 20, 30], dtype=np.uint32)}
    result = run_round(config, inputs, signing_keys=keys)
    assert list(result.total) == [11, 22, 33]


def test_small_federation_falls_back_to_all_sites(caplog: pytest.LogCaptureFixture) -> None:
    graph_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="secure_fl.secagg"):
        params = secagg_parameters(3, dropout_rate=0.05, corrupt_fraction=0.05)
    assert params.threshold == 3
    assert any("no dropout tolerance" in r.getMessage() for r in caplog.records)
    # a dropout rate that means real dropouts is still refused rather than silently ignored
    with pytest.raises(ConfigError, match="no safe threshold"):
        secagg_parameters(10, dropout_rate=0.6, corrupt_fraction=0.0)
