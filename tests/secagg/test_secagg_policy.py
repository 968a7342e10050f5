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


def test_core_policy_refuses_a_round_where_every_other_site_may_collude() -> None:
    """Finding 5 at the core: the transport passes the colluders it assumes over the roster as a
    fraction of the round (2 of 10 rostered -> 2/3 of a 3-site round). With n - c < 2 the sum
    minus the colluders' inputs is the site's input: the client refuses before sending anything,
    whatever the threshold. Two-site rounds with c = 0 stay allowed."""
    keys = {i: SigningKey.generate() for i in range(1, 5)}
    verify = {i: k.public_bytes for i, k in keys.items()}
    three = make_config(
        [1, 2, 3],
        vector_length=2,
        bits=32,
        threshold=3,
        active=True,
        verify_keys={i: verify[i] for i in (1, 2, 3)},
    )
    with pytest.raises(PolicyError, match=r"assumes 2 may collude.*n - c >= 2"):
        SecAggClient(1, three, signing_key=keys[1], policy=SitePolicy(corrupt_fraction=2 / 3))
    inputs = {i: np.full(2, i, dtype=np.uint32) for i in (1, 2, 3)}
    with pytest.raises(PolicyError):
        run_round(
            three,
            inputs,
            signing_keys=keys,
            policy=SitePolicy(corrupt_fraction=2 / 3),
        )
    SecAggClient(1, three, signing_key=keys[1], policy=SitePolicy(corrupt_fraction=1 / 3))
    two = make_config(
        [1, 2],
        vector_length=2,
        bits=32,
        threshold=2,
        active=True,
        verify_keys={i: verify[i] for i in (1, 2)},
    )
    SecAggClient(1, two, signing_key=keys[1])  # c = 0: allowed
    with pytest.raises(PolicyError, match="n - c >= 2"):
        SecAggClient(1, two, signing_key=keys[1], policy=SitePolicy(corrupt_fraction=0.5))
    assert SitePolicy(corrupt_fraction=2 / 3).colluders(three) == 2


def test_consistency_quorum_is_a_majority_beyond_the_colluders() -> None:
    assert graph_module.consistency_quorum(10, 0.0) == 6
    assert graph_module.consistency_quorum(11, 0.0) == 6
    assert graph_module.consistency_quorum(10, 0.2) == 7  # c = 2: more than 6
    assert graph_module.consistency_quorum(2, 0.0) == 2
    # c / n gives back c (7/25 * 25 is 7.000000000000001 in floating point)
    assert graph_module.assumed_corrupt(25, 7 / 25) == 7
    # for the complete graph the quorum never exceeds the site's minimum threshold
    for n in range(2, 60):
        for f in (0.0, 0.05, 0.1, 0.2, 0.3):
            try:
                t = minimum_threshold(n, n - 1, f)
            except ConfigError:
                continue
            assert graph_module.consistency_quorum(n, f) <= t


def test_secagg_plus_refuses_dropout_rates_the_consistency_quorum_cannot_survive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # more than (n + c) / 2 sites must reach the consistency check whatever k
    with pytest.raises(ConfigError, match=r"dropout_rate=0.5 is too high.*at most 0.47"):
        secagg_plus_parameters(1000, dropout_rate=0.5, corrupt_fraction=0.05)
    graph_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="secure_fl.secagg"):
        secagg_plus_parameters(300, dropout_rate=0.45, corrupt_fraction=0.0)
    assert any("reach the consistency check" in r.getMessage() for r in caplog.records)
    ok = secagg_plus_parameters(1000, dropout_rate=0.05, corrupt_fraction=0.05)
    assert ok.correctness_failure <= 2.0**-30
