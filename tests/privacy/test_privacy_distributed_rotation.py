"""Randomized Hadamard rotation and conditional randomized rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.privacy.discrete import (
    RoundingError,
    conditional_randomized_round,
    rounded_l2_bound,
)
from secure_fl.privacy.rotation import fwht, padded_dimension, rotate, rotation_signs, unrotate


def dense_hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 256, 1024, 4096])
def test_fwht_matches_the_dense_hadamard_matrix(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n)
    assert np.allclose(fwht(x), dense_hadamard(n) @ x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("d", [1, 3, 100, 1000, 5000])
def test_rotation_is_orthonormal_and_inverted(d: int) -> None:
    x = np.random.default_rng(d).standard_normal(d) * 3
    y = rotate(x, 1234)
    assert y.shape == (padded_dimension(d),)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    back = unrotate(y, 1234, dimension=d)
    assert back.shape == (d,)
    assert np.max(np.abs(back - x)) <= 1e-9
    # Inner products are preserved too (orthonormal, not just norm-preserving).
    z = np.random.default_rng(d + 1).standard_normal(d)
    assert rotate(z, 1234) @ y == pytest.approx(z @ x, rel=1e-9, abs=1e-9)


def test_same_seed_same_rotation_other_seed_other_rotation() -> None:
    x = np.random.default_rng(0).standard_normal(300)
    assert np.array_equal(rotate(x, 7), rotate(x, 7))
    assert np.array_equal(rotate(x, b"round-7"), rotate(x, b"round-7"))
    assert not np.allclose(rotate(x, 7), rotate(x, 8))
    assert not np.allclose(rotate(x, b"round-7"), rotate(x, b"round-8"))
    signs = rotation_signs(7, 512)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 0.2


def test_rotation_spreads_a_spike() -> None:
    d = 4096
    spike = np.zeros(d)
    spike[0] = 1.0
    y = rotate(spike, 99)
    # Every Hadamard entry is +-1/sqrt(d): the spike is spread perfectly evenly.
    assert np.allclose(np.abs(y), 1 / math.sqrt(d))
    # A spike at a random position, and a generic dense vector, stay within the sub-Gaussian bound
    # c * sqrt(2 ln(2d/delta) / d) (delta = 1e-6).
    bound = math.sqrt(2 * math.log(2 * d / 1e-6) / d)
    other = np.zeros(d)
    other[1777] = -1.0
    assert np.max(np.abs(rotate(other, 3))) <= bound
    dense = np.random.default_rng(1).standard_normal(d) ** 3
    dense /= np.linalg.norm(dense)
    assert np.max(np.abs(rotate(dense, 5))) <= bound
    assert np.max(np.abs(dense)) > bound  # it was spiky before the rotation


def test_rotation_rejects_bad_input() -> None:
    with pytest.raises(InvalidUpdateError):
        rotate(np.zeros((2, 2)), 1)
    with pytest.raises(InvalidUpdateError):
        rotate(np.array([], dtype=np.float64), 1)
    with pytest.raises(InvalidUpdateError):
        unrotate(np.zeros(6), 1)
    with pytest.raises(ConfigError, match="seed"):
        rotate(np.zeros(4), -1)
    with pytest.raises(ConfigError, match="dimension"):
        unrotate(np.zeros(8), 1, dimension=9)


# -- conditional randomized rounding ------------------------------------------------------------


def test_randomized_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(3)
    v = rng.uniform(-5, 5, 64)
    bound = rounded_l2_bound(float(np.linalg.norm(v)), v.size, math.exp(-0.5))
    trials = 20_000
    total = np.zeros(v.size)
    for _ in range(trials):
        r, _ = conditional_randomized_round(v, bound, rng=rng)
        total += r
    frac = v - np.floor(v)
    stderr = np.sqrt(frac * (1 - frac) / trials) + 1e-12
    assert np.all(np.abs(total / trials - v) <= 5 * stderr + 1e-9)
    # The check has power: round-half-up (deterministic, biased) fails it.
    nearest = np.floor(v + 0.5)
    assert np.any(np.abs(nearest - v) > 5 * stderr + 1e-9)


def test_rounding_always_respects_the_norm_bound_and_counts_retries() -> None:
    rng = np.random.default_rng(4)
    d = 256
    v = np.full(d, 0.5) + rng.integers(-3, 4, d)  # every coordinate has a coin flip
    low = np.floor(v)
    # Tight bound: the expected squared norm, so about half of the draws are rejected.
    bound = math.sqrt(float(np.sum(low**2 + (2 * low + 1) * 0.5)))
    retries = []
    for _ in range(300):
        r, tries = conditional_randomized_round(v, bound, rng=rng)
        assert r.dtype == np.int64
        assert float(r.astype(np.float64) @ r.astype(np.float64)) <= bound * bound
        assert np.all((r == low) | (r == low + 1))
        retries.append(tries)
    assert max(retries) > 0
    assert 0.3 < np.mean(retries) < 3


def test_rounding_gives_up_with_a_clear_error() -> None:
    v = np.full(16, 10.5)
    with pytest.raises(RoundingError, match="L2 bound"):
        conditional_randomized_round(v, 1.0, rng=np.random.default_rng(0), max_retries=5)


def test_rounding_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidUpdateError):
        conditional_randomized_round(np.array([np.nan]), 1.0, rng=rng)
    with pytest.raises(InvalidUpdateError):
        conditional_randomized_round(np.array([2.0**60]), 2.0**61, rng=rng)
    with pytest.raises(ConfigError, match="l2_bound"):
        conditional_randomized_round(np.zeros(3), -1.0, rng=rng)
    with pytest.raises(ConfigError, match="rng"):
        conditional_randomized_round(np.zeros(3), 1.0, rng=None)  # type: ignore[arg-type]


def test_rounded_l2_bound_matches_the_paper() -> None:
    a, d, beta = 100.0, 400, math.exp(-0.5)
    # sqrt(2 ln(1/beta)) = 1 for beta = exp(-1/2).
    assert rounded_l2_bound(a, d, beta) == pytest.approx(math.sqrt(a * a + d / 4 + a + 10))
    assert rounded_l2_bound(a, d, 0.0) == pytest.approx(a + 20)
    assert rounded_l2_bound(0.0, 4, 1e-300) == pytest.approx(2.0)  # capped by a + sqrt(d)
    with pytest.raises(ConfigError, match="beta"):
        rounded_l2_bound(a, d, 1.0)
