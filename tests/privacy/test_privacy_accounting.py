"""Accountants against published and independently computed values; composition; calibration."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from secure_fl.errors import ConfigError
from secure_fl.privacy import (
    PrivacyEvent,
    calibrate_noise,
    compute_epsilon,
    epsilon_of_events,
    rdp_poisson_gaussian,
    rdp_to_epsilon,
)
from secure_fl.privacy.accounting import PRV_EPS_ERROR

try:
    import dp_accounting  # noqa: F401

    HAVE_PLD = True
except ImportError:  # pragma: no cover - optional dependency
    HAVE_PLD = False

needs_pld = pytest.mark.skipif(not HAVE_PLD, reason="dp-accounting not installed")


# ---------------------------------------------------------------------------------------------
# published reference values


def test_rdp_matches_tf_privacy_known_answers() -> None:
    """RDP of the sampled Gaussian at single orders.

    Reference: TensorFlow Privacy, ``tensorflow_privacy/privacy/analysis/rdp_accountant_test.py``
    (``test_compute_rdp_scalar``: q=0.1, sigma=2, 10 steps, order 5 -> 0.07737;
    ``test_compute_rdp_sequence``: q=0.01, sigma=2.5, 50 steps, orders 1.5, 2.5, 5, 50, 100 ->
    0.00065, 0.001085, 0.00218075, 0.023846, 167.416307), which TF Privacy checked against
    multi-precision numerical integration. Fractional orders exercise our quadrature, integer ones
    the exact binomial sum.
    """
    assert rdp_poisson_gaussian(2.0, 0.1, 10, [5])[0] == pytest.approx(0.07737, abs=1e-5)
    got = rdp_poisson_gaussian(2.5, 0.01, 50, [1.5, 2.5, 5, 50, 100])
    want = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_abadi_et_al_moments_accountant_figure() -> None:
    """Abadi et al. 2016, "Deep Learning with Differential Privacy" (CCS'16), Sec. 3.1: with
    q = 0.01, sigma = 4, delta = 1e-5 and T = 10,000 steps the moments accountant gives
    epsilon ~ 1.26 (vs ~ 9.34 by the strong composition theorem).

    The moments accountant's bound is RDP at integer orders lambda+1 for lambda <= 32 with the
    classic conversion eps = rdp + log(1/delta)/(alpha-1); TF Privacy's
    ``test_get_privacy_spent_check_target_delta`` pins that computation to 1.258575 at order 20.
    Our default (more orders, the improved conversion of Canonne-Kamath-Steinke 2020) must be
    tighter than the published figure but not below the tight (PRV) value.
    """
    orders = list(range(2, 33))
    rdp = rdp_poisson_gaussian(4.0, 0.01, 10_000, orders)
    eps, order = rdp_to_epsilon(orders, rdp, 1e-5, conversion="classic")
    assert eps == pytest.approx(1.258575, abs=1e-6)
    assert order == 20
    assert round(eps, 2) == 1.26

    default = compute_epsilon(4.0, 0.01, 10_000, 1e-5)
    tight = compute_epsilon(4.0, 0.01, 10_000, 1e-5, accountant="prv")
    assert tight <= default < 1.26
    assert default == pytest.approx(1.0355, abs=5e-4)  # improved conversion, our order grid


def test_heterogeneous_composition_matches_tf_privacy() -> None:
    """TF Privacy ``test_check_composition``: 40,000 steps at (q=1e-4, sigma=0.4) followed by 100
    steps at (q=0.1, sigma=2), delta=1e-5, orders (1.25 ... 256), classic conversion ->
    epsilon 8.509656 at order 2.5. Exercises heterogeneous composition through the public API."""
    orders = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0)
    orders += (20.0, 24.0, 28.0, 32.0, 64.0, 256.0)
    events = [PrivacyEvent(0.4, 1e-4, 40_000), PrivacyEvent(2.0, 0.1, 100)]
    eps = epsilon_of_events(events, 1e-5, "rdp", orders=orders, conversion="classic")
    assert eps == pytest.approx(8.509656, abs=1e-5)


@pytest.mark.parametrize(
    ("sigma", "q"), [(4.0, 0.01), (1.1, 256 / 60_000), (0.7, 0.3), (3.0, 0.5), (100.0, 0.5)]
)
def test_rdp_agrees_with_opacus_independent_implementation(sigma: float, q: float) -> None:
    """Our RDP (binomial sum + quadrature) against Opacus' ``analysis.rdp`` (binomial sum +
    the two-series expansion of Mironov et al. 2019): a different code path for fractional orders."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = [1.1, 1.5, 1.75, 2.0, 2.5, 3.0, 4.5, 8.0, 10.5, 32.0, 64.0]
    ours = rdp_poisson_gaussian(sigma, q, 7, orders)
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=7, orders=orders)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the analytic Gaussian (no subsampling): the exact epsilon is known


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Exact epsilon of ``steps`` Gaussian mechanisms (sensitivity 1, noise std ``sigma``).

    Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
    Calibration and Optimal Denoising", Theorem 8: the Gaussian mechanism with mu = 1/sigma is
    (eps, delta)-DP iff delta >= Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2). T-fold
    composition of Gaussians is a Gaussian with mu = sqrt(T)/sigma (Dong, Roth & Su 2019,
    Gaussian DP). Solved here with scipy, independently of the library.
    """
    mu = math.sqrt(steps) / sigma

    def excess(eps: float) -> float:
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return float(optimize.brentq(excess, 0.0, 200.0, xtol=1e-12))


@pytest.mark.parametrize(("sigma", "steps"), [(2.0, 10), (1.0, 1), (5.0, 100), (0.8, 3)])
def test_no_subsampling_against_analytic_gaussian(sigma: float, steps: int) -> None:
    delta = 1e-5
    exact = exact_gaussian_epsilon(sigma, steps, delta)
    rdp = compute_epsilon(sigma, 1.0, steps, delta, accountant="rdp")
    prv = compute_epsilon(sigma, 1.0, steps, delta, accountant="prv")
    assert rdp >= exact  # RDP is an upper bound
    assert rdp <= exact * 1.25  # ... and not a silly one
    # PRV reports its upper estimate: never below the exact value, within its error bound.
    assert exact - 1e-9 <= prv <= exact + 2 * PRV_EPS_ERROR
    if HAVE_PLD:
        pld = compute_epsilon(sigma, 1.0, steps, delta, accountant="pld")
        assert exact - 1e-9 <= pld <= exact + 2 * PRV_EPS_ERROR


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.0, 0.01, 1000), (1.1, 256 / 60_000, 2000), (0.8, 0.1, 100), (5.0, 0.5, 20)],
)
def test_accountants_agree_within_known_gaps(sigma: float, q: float, steps: int) -> None:
    """PRV (Opacus) and PLD (dp_accounting) are independent tight accountants: they agree within
    PRV's error; RDP is an upper bound, so it is at least PRV's value minus PRV's error."""
    rdp = compute_epsilon(sigma, q, steps, 1e-5, accountant="rdp")
    prv = compute_epsilon(sigma, q, steps, 1e-5, accountant="prv")
    assert rdp >= prv - 2 * PRV_EPS_ERROR
    assert rdp <= 1.5 * prv + 0.1
    if HAVE_PLD:
        pld = compute_epsilon(sigma, q, steps, 1e-5, accountant="pld")
        assert abs(pld - prv) <= 2 * PRV_EPS_ERROR


# ---------------------------------------------------------------------------------------------
# properties


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.5, 20.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 5000),
    extra=st.integers(1, 5000),
)
def test_more_steps_never_less_epsilon(sigma: float, q: float, steps: int, extra: int) -> None:
    assert compute_epsilon(sigma, q, steps + extra, 1e-5) >= compute_epsilon(sigma, q, steps, 1e-5)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.5, 20.0), q=st.floats(1e-3, 0.99), factor=st.floats(1.01, 3.0))
def test_larger_sample_rate_never_less_epsilon(sigma: float, q: float, factor: float) -> None:
    larger = min(q * factor, 1.0)
    assert compute_epsilon(sigma, larger, 100, 1e-5) >= compute_epsilon(sigma, q, 100, 1e-5)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.5, 20.0), q=st.floats(1e-3, 1.0), factor=st.floats(1.01, 3.0))
def test_larger_noise_never_more_epsilon(sigma: float, q: float, factor: float) -> None:
    assert compute_epsilon(sigma * factor, q, 100, 1e-5) <= compute_epsilon(sigma, q, 100, 1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_heterogeneous_equals_homogeneous_and_ignores_order(accountant: str) -> None:
    same = [PrivacyEvent(1.2, 0.02, 100)] * 3
    assert epsilon_of_events(same, 1e-5, accountant) == compute_epsilon(
        1.2, 0.02, 300, 1e-5, accountant
    )
    mixed = [
        PrivacyEvent(1.2, 0.02, 100),
        PrivacyEvent(0.9, 0.05, 40),
        PrivacyEvent(2.0, 0.02, 250),
        PrivacyEvent(1.2, 0.02, 60),
    ]
    base = epsilon_of_events(mixed, 1e-5, accountant)
    rng = random.Random(4)
    for _ in range(3):
        shuffled = mixed[:]
        rng.shuffle(shuffled)
        assert epsilon_of_events(shuffled, 1e-5, accountant) == base
    # composing more never costs less than any part alone
    assert base >= max(epsilon_of_events([e], 1e-5, accountant) for e in mixed)


def test_edge_cases() -> None:
    assert compute_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert compute_epsilon(1.0, 0.0, 100, 1e-5) == 0.0
    assert epsilon_of_events([], 1e-5) == 0.0
    assert compute_epsilon(0.0, 0.1, 1, 1e-5) == math.inf
    assert compute_epsilon(0.0, 0.1, 1, 1e-5, accountant="prv") == math.inf


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_compute_epsilon_rejects_out_of_range(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 10,
        "delta": 1e-5,
        "accountant": "rdp",
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        compute_epsilon(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# calibration


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [
        (1.0, 0.01, 1000, "rdp"),
        (8.0, 0.004, 5000, "rdp"),
        (3.0, 1.0, 10, "rdp"),
        (2.0, 0.1, 50, "prv"),
    ],
)
def test_calibration_round_trip(target: float, q: float, steps: int, accountant: str) -> None:
    tol = 1e-3
    sigma = calibrate_noise(target, q, steps, 1e-5, accountant, tolerance=tol)
    eps = compute_epsilon(sigma, q, steps, 1e-5, accountant)
    assert target - tol <= eps <= target
    # the smallest such multiplier: a slightly smaller one exceeds the target
    assert compute_epsilon(sigma * 0.99, q, steps, 1e-5, accountant) > target


def test_calibration_errors_name_the_argument() -> None:
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_noise(1e-6, 1.0, 1_000_000, 1e-5)
    with pytest.raises(ConfigError, match="target_epsilon"):
        calibrate_noise(0.0, 0.01, 100, 1e-5)
    with pytest.raises(ConfigError, match="sample_rate"):
        calibrate_noise(1.0, 0.0, 100, 1e-5)
    with pytest.raises(ConfigError, match="steps"):
        calibrate_noise(1.0, 0.01, 0, 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        calibrate_noise(1.0, 0.01, 100, 2.0)
    with pytest.raises(ConfigError, match="tolerance"):
        calibrate_noise(1.0, 0.01, 100, 1e-5, tolerance=0.0)


@needs_pld
def test_pld_accountant_is_available_and_tight() -> None:
    pld = compute_epsilon(4.0, 0.01, 10_000, 1e-5, accountant="pld")
    prv = compute_epsilon(4.0, 0.01, 10_000, 1e-5, accountant="prv")
    assert abs(pld - prv) <= 2 * PRV_EPS_ERROR
    assert pld < compute_epsilon(4.0, 0.01, 10_000, 1e-5, accountant="rdp")


def test_prv_falls_back_to_the_rdp_bound_with_a_warning() -> None:
    """Where Opacus' PRV cannot evaluate (here: delta so small that float error dominates), the
    RDP upper bound is reported instead - never a smaller number - and the caller is warned."""
    with pytest.warns(UserWarning, match="RDP upper bound"):
        value = compute_epsilon(1.0, 0.01, 1000, 1e-14, accountant="prv")
    assert value == compute_epsilon(1.0, 0.01, 1000, 1e-14, accountant="rdp")


def test_integer_order_events_are_charged_at_integer_orders() -> None:
    """Skellam's RDP bound alpha / (2 z**2) is stated for integer orders only: the accountant must
    not use it at a fractional order (where the optimum of this history lies)."""
    sigma, delta = 1.0, 1e-5
    all_orders = epsilon_of_events([PrivacyEvent(sigma, 1.0, 1)], delta)
    charged = epsilon_of_events([PrivacyEvent(sigma, 1.0, 1, integer_orders=True)], delta)
    ints = [float(a) for a in range(2, 1025)]
    rdp = [a / (2 * sigma**2) for a in ints]
    best_integer = rdp_to_epsilon(ints, rdp, delta)[0]
    assert charged >= best_integer - 1e-12
    assert charged > all_orders  # the fractional optimum is no longer available
    assert compute_epsilon(sigma, 1.0, 1, delta, integer_orders=True) == charged
    # PRV/PLD of the Gaussian does not bound such a mechanism: the RDP bound is returned
    event = PrivacyEvent(sigma, 1.0, 1, integer_orders=True)
    assert epsilon_of_events([event], delta, "prv") == charged
    # calibration for such a mechanism meets the target as it will be counted
    z = calibrate_noise(4.0, 1.0, 3, delta, integer_orders=True)
    assert compute_epsilon(z, 1.0, 3, delta, integer_orders=True) <= 4.0
    # composition keeps the two kinds apart
    mixed = [PrivacyEvent(sigma, 1.0, 1), PrivacyEvent(sigma, 1.0, 1, integer_orders=True)]
    assert epsilon_of_events(mixed, delta) > epsilon_of_events([PrivacyEvent(sigma, 1.0, 2)], delta)
