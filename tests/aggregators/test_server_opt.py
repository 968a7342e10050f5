"""Server optimisers (FedAvg, FedAvgM, FedAdam): known values, state round trip, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from secure_fl.aggregators.server_opt import (
    SERVER_OPTIMIZERS,
    make_server_optimizer,
    server_optimizer_from_mapping,
)
from secure_fl.errors import ConfigError, InvalidUpdateError


def test_fedavg_scales_by_the_server_learning_rate() -> None:
    opt = make_server_optimizer("fedavg", lr=0.5)
    np.testing.assert_array_equal(opt.step(np.array([2.0, -4.0])), [1.0, -2.0])
    assert opt.options() == {"lr": 0.5}
    assert opt.steps == 1


def test_fedavgm_known_values() -> None:
    opt = make_server_optimizer("fedavgm", lr=0.5, momentum=0.9)
    d = np.array([1.0, -2.0])
    # m1 = d; m2 = 0.9 d + d = 1.9 d; m3 = 0.9 * 1.9 d + 0 = 1.71 d
    np.testing.assert_allclose(opt.step(d), 0.5 * d)
    np.testing.assert_allclose(opt.step(d), 0.5 * 1.9 * d)
    np.testing.assert_allclose(opt.step(np.zeros(2)), 0.5 * 1.71 * d)


def test_fedadam_known_values() -> None:
    """Reddi et al. 2021, Algorithm 2, computed by hand for three steps (no bias correction)."""
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = make_server_optimizer("fedadam", lr=lr, beta1=b1, beta2=b2, tau=tau)
    deltas = [np.array([1.0, -0.5]), np.array([0.5, 0.0]), np.array([-1.0, 2.0])]
    m = np.zeros(2)
    v = np.zeros(2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        np.testing.assert_allclose(opt.step(d), lr * m / (np.sqrt(v) + tau), rtol=1e-12)
    # The first step in closed form: 0.1 * 0.1 d / (0.1 |d| + 1e-3) = 0.1 * sign(d) * |d|/(|d|+0.01)
    first = make_server_optimizer("fedadam", lr=0.1).step(np.array([1.0]))
    assert first[0] == pytest.approx(0.1 * 0.1 / (0.1 + 1e-3))


def test_fedadam_defaults_follow_the_paper() -> None:
    assert make_server_optimizer("fedadam").options() == {
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_round_trip_gives_the_same_next_steps(name: str) -> None:
    rng = np.random.default_rng(7)
    deltas = [rng.standard_normal(5) for _ in range(4)]
    a = make_server_optimizer(name)
    for d in deltas[:2]:
        a.step(d)
    saved = a.state_dict()
    b = make_server_optimizer(name)
    b.load_state_dict(saved)
    assert b.steps == 2
    for d in deltas[2:]:
        np.testing.assert_array_equal(a.step(d), b.step(d))
    # state_dict is a copy: stepping a changed nothing in saved
    c = make_server_optimizer(name)
    c.load_state_dict(saved)
    assert c.steps == 2


def test_a_state_of_another_optimiser_or_shape_is_refused() -> None:
    adam = make_server_optimizer("fedadam")
    adam.step(np.ones(3))
    with pytest.raises(ConfigError, match="fedadam"):
        make_server_optimizer("fedavgm").load_state_dict(adam.state_dict())
    bad = adam.state_dict()
    bad["m"] = np.ones(4)
    fresh = make_server_optimizer("fedadam")
    with pytest.raises(ConfigError, match="m must be"):
        fresh.load_state_dict(bad)
    assert fresh.steps == 0
    bad = adam.state_dict()
    del bad["v"]
    with pytest.raises(ConfigError, match="lacks 'v'"):
        fresh.load_state_dict(bad)


def test_bad_deltas_are_refused_and_leave_the_state() -> None:
    opt = make_server_optimizer("fedavgm")
    opt.step(np.ones(3))
    with pytest.raises(InvalidUpdateError, match="3"):
        opt.step(np.ones(4))
    with pytest.raises(InvalidUpdateError, match="NaN"):
        opt.step(np.array([1.0, math.nan, 0.0]))
    with pytest.raises(InvalidUpdateError, match="flat"):
        opt.step(np.ones((3, 1)))
    assert opt.steps == 1


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("sgd", {}, r"server_optimizer.name must be one of \('fedavg', 'fedavgm', 'fedadam'\)"),
        ("fedavg", {"lr": 0.0}, r"server_optimizer.lr must be a number in \(0, inf\)"),
        ("fedavg", {"lr": math.inf}, r"server_optimizer.lr"),
        ("fedavg", {"momentum": 0.9}, r"server_optimizer.momentum .*allowed: lr"),
        ("fedavgm", {"momentum": 1.0}, r"server_optimizer.momentum must be a number in \[0, 1\)"),
        ("fedadam", {"beta2": -0.1}, r"server_optimizer.beta2 must be a number in \[0, 1\)"),
        ("fedadam", {"tau": 0}, r"server_optimizer.tau must be a number in \(0, inf\)"),
        ("fedadam", {"lr": True}, r"server_optimizer.lr"),
        ("fedadam", {"eps": 1e-8}, r"allowed: lr, beta1, beta2, tau"),
    ],
)
def test_bad_options_name_the_option_and_range(name: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_server_optimizer(name, **options)


def test_from_mapping_names_the_config_key() -> None:
    assert server_optimizer_from_mapping(None).name == "fedavg"
    opt = server_optimizer_from_mapping({"name": "fedadam", "lr": 0.1}, where="s.o")
    assert opt.options()["lr"] == 0.1
    assert json.loads(json.dumps(opt.options())) == opt.options()
    with pytest.raises(ConfigError, match=r"s\.o\.tau"):
        server_optimizer_from_mapping({"name": "fedadam", "tau": -1}, where="s.o")


@settings(max_examples=50, deadline=None)
@given(
    arrays(
        np.float64,
        st.integers(1, 40),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    ),
    st.integers(1, 3),
)
def test_fedavg_with_lr_1_is_the_identity(delta: np.ndarray, repeats: int) -> None:
    opt = make_server_optimizer("fedavg", lr=1.0)
    for _ in range(repeats):
        out = opt.step(delta)
        assert out.dtype == np.float64
        np.testing.assert_array_equal(out, delta)
        assert out is not delta
