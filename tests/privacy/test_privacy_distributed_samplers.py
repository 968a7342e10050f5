"""Statistical tests of the integer noise samplers, with their power shown on wrong samplers.

Every test uses a fixed seed, so it is deterministic; the thresholds (5 standard errors, chi-square
p-value 1e-6) are chosen so that a correct sampler passes for essentially every seed while the
deliberately wrong samplers below fail by a wide margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from secure_fl.errors import ConfigError
from secure_fl.privacy.discrete import (
    DG_SIGMA_MAX,
    POISSON_MU_MAX,
    sample_discrete_gaussian,
    sample_skellam,
)

N = 200_000


def discrete_gaussian_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact pmf of N_Z(0, sigma^2) on a range holding all but ~1e-30 of its mass."""
    half = math.ceil(12 * sigma) + 2
    ks = np.arange(-half, half + 1)
    weights = np.exp(-(ks.astype(np.float64) ** 2) / (2 * sigma * sigma))
    return ks, weights / weights.sum()


def skellam_pmf(mu: float) -> tuple[np.ndarray, np.ndarray]:
    half = math.ceil(12 * math.sqrt(2 * mu)) + 5
    ks = np.arange(-half, half + 1)
    return ks, stats.skellam.pmf(ks, mu, mu)


def check_against_pmf(samples: np.ndarray, ks: np.ndarray, pmf: np.ndarray) -> None:
    """Mean, variance (5 standard errors) and a chi-square goodness of fit against ``pmf``."""
    n = samples.shape[0]
    assert samples.dtype == np.int64
    mean = float(np.sum(ks * pmf))
    var = float(np.sum((ks - mean) ** 2 * pmf))
    m4 = float(np.sum((ks - mean) ** 4 * pmf))
    assert abs(samples.mean() - mean) <= 5 * math.sqrt(var / n), "mean"
    assert abs(samples.var() - var) <= 5 * math.sqrt((m4 - var * var) / n), "variance"
    expected = pmf * n
    keep = expected >= 20
    lo, hi = ks[keep][0], ks[keep][-1]
    observed = np.bincount(np.clip(samples, lo - 1, hi + 1) - (lo - 1), minlength=hi - lo + 3)
    exp_bins = np.concatenate([[pmf[ks < lo].sum() * n], expected[keep], [pmf[ks > hi].sum() * n]])
    # Pool the two tail bins into their neighbours when they are too small to test.
    if exp_bins[0] < 5:
        exp_bins[1] += exp_bins[0]
        observed[1] += observed[0]
        exp_bins, observed = exp_bins[1:], observed[1:]
    if exp_bins[-1] < 5:
        exp_bins[-2] += exp_bins[-1]
        observed[-2] += observed[-1]
        exp_bins, observed = exp_bins[:-1], observed[:-1]
    exp_bins *= observed.sum() / exp_bins.sum()
    assert stats.chisquare(observed, exp_bins).pvalue > 1e-6, "chi-square"


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.3, 20.0])
def test_discrete_gaussian_matches_exact_pmf(sigma: float) -> None:
    samples = sample_discrete_gaussian(sigma, N, np.random.default_rng(11))
    ks, pmf = discrete_gaussian_pmf(sigma)
    check_against_pmf(samples, ks, pmf)


def test_discrete_gaussian_variance_is_sigma_squared_for_sigma_at_least_one() -> None:
    for sigma in (1.0, 2.5):
        ks, pmf = discrete_gaussian_pmf(sigma)
        assert float(np.sum(ks**2 * pmf)) == pytest.approx(sigma**2, rel=1e-6)


def test_discrete_gaussian_large_sigma_variance() -> None:
    sigma = 2.0**20
    samples = sample_discrete_gaussian(sigma, N, np.random.default_rng(5))
    ratio = samples.var() / sigma**2
    assert abs(ratio - 1) <= 5 * math.sqrt(2 / N)
    assert abs(samples.mean()) <= 5 * sigma / math.sqrt(N)


def _rounded_continuous(sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.round(rng.normal(0.0, sigma, n)).astype(np.int64)


def _biased(sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return sample_discrete_gaussian(sigma, n, rng) + (rng.random(n) < 0.1)


def _scaled(sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return sample_discrete_gaussian(1.1 * sigma, n, rng)


@pytest.mark.parametrize("wrong", [_rounded_continuous, _biased, _scaled])
def test_discrete_gaussian_checks_reject_wrong_samplers(wrong: object) -> None:
    sigma = 1.0
    ks, pmf = discrete_gaussian_pmf(sigma)
    samples = wrong(sigma, N, np.random.default_rng(11))  # type: ignore[operator]
    with pytest.raises(AssertionError):
        check_against_pmf(samples, ks, pmf)


@pytest.mark.parametrize("mu", [0.3, 4.0, 250.0])
def test_skellam_matches_exact_pmf(mu: float) -> None:
    samples = sample_skellam(mu, N, np.random.default_rng(12))
    ks, pmf = skellam_pmf(mu)
    assert float(np.sum(ks**2 * pmf)) == pytest.approx(2 * mu, rel=1e-9)
    check_against_pmf(samples, ks, pmf)


def test_skellam_variance_at_the_cap() -> None:
    mu = POISSON_MU_MAX
    samples = sample_skellam(mu, N, np.random.default_rng(6))
    assert abs(samples.var() / (2 * mu) - 1) <= 5 * math.sqrt(2 / N)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda mu, n, rng: rng.poisson(mu, n) - rng.poisson(1.2 * mu, n),  # biased
        lambda mu, n, rng: sample_skellam(1.2 * mu, n, rng),  # scaled
        lambda mu, n, rng: np.round(rng.normal(0, math.sqrt(2 * mu), n)).astype(np.int64),
    ],
    ids=["biased", "scaled", "rounded-gaussian"],
)
def test_skellam_checks_reject_wrong_samplers(wrong: object) -> None:
    mu = 4.0
    ks, pmf = skellam_pmf(mu)
    samples = np.asarray(wrong(mu, N, np.random.default_rng(12)), dtype=np.int64)  # type: ignore[operator]
    with pytest.raises(AssertionError):
        check_against_pmf(samples, ks, pmf)


def test_samplers_are_deterministic_given_the_generator_and_handle_zero() -> None:
    a = sample_discrete_gaussian(3.0, 1000, np.random.default_rng(1))
    b = sample_discrete_gaussian(3.0, 1000, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_discrete_gaussian(3.0, 1000, np.random.default_rng(2)))
    assert np.array_equal(sample_discrete_gaussian(0.0, 5, np.random.default_rng(1)), np.zeros(5))
    assert np.array_equal(sample_skellam(0.0, 5, np.random.default_rng(1)), np.zeros(5))
    assert sample_skellam(1.0, 0, np.random.default_rng(1)).shape == (0,)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda rng: sample_discrete_gaussian(-1.0, 3, rng), "sigma"),
        (lambda rng: sample_discrete_gaussian(math.nan, 3, rng), "sigma"),
        (lambda rng: sample_discrete_gaussian(2 * DG_SIGMA_MAX, 3, rng), "sigma"),
        (lambda rng: sample_discrete_gaussian(1.0, -3, rng), "size"),
        (lambda rng: sample_discrete_gaussian(1.0, 3, 42), "rng"),
        (lambda rng: sample_skellam(-0.5, 3, rng), "mu"),
        (lambda rng: sample_skellam(2 * POISSON_MU_MAX, 3, rng), "mu"),
        (lambda rng: sample_skellam(1.0, 2.5, rng), "size"),
    ],
)
def test_sampler_arguments_are_validated(call: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        call(np.random.default_rng(0))  # type: ignore[operator]
