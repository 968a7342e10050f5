"""Integer noise samplers and conditional randomized rounding for distributed DP.

* :func:`sample_discrete_gaussian` -- the discrete Gaussian ``N_Z(0, sigma**2)`` (pmf proportional to
  ``exp(-x**2 / (2 sigma**2))`` on the integers), by Algorithm 3 of Canonne, Kamath & Steinke 2020
  ("The Discrete Gaussian for Differential Privacy", NeurIPS): discrete Laplace proposals accepted
  with probability ``exp(-(|y| - sigma**2/t)**2 / (2 sigma**2))``, ``t = floor(sigma) + 1``.
* :func:`sample_skellam` -- ``Poisson(mu) - Poisson(mu)`` (variance ``2 mu``), the noise of
  Agarwal, Kairouz & Liu 2021 ("The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS). Skellam is closed under summation: the sum of ``n`` shares with parameter
  ``mu`` is Skellam with parameter ``n mu``.
* :func:`conditional_randomized_round` -- unbiased randomized rounding to the integers, redrawn
  until the rounded vector's L2 norm is within a bound (Kairouz, Liu & Steinke 2021, "The
  Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML,
  Algorithm 1, Proposition 22), and :func:`rounded_l2_bound`, that bound.

**Exactness.** The samplers implement the exact algorithms (no rounded continuous Gaussian, no
truncation), with float64 arithmetic where the papers use exact rational arithmetic: a geometric
draw is numpy's inversion of a float64 exponential, a Bernoulli(exp(-x)) is ``U < exp(-x)`` with
a 53-bit uniform, and numpy's Poisson sampler (PTRS for large means) evaluates log-factorials in
float64. The resulting relative error in any probability is below about ``sigma * 2**-52`` for the
discrete Gaussian and ``mu * log(mu) * 2**-52`` for the Poisson draws; the parameter caps
:data:`DG_SIGMA_MAX` (2**24) and :data:`POISSON_MU_MAX` (2**27) keep both below about 1e-6 (the
caps the mechanism planner respects). Beyond them the float64 samplers are no longer trustworthy
(numpy's PTRS at a mean of 1e16 has log-probability errors of order 10), so they are refused.

Randomness is injected (``rng``); the noise must be unpredictable to the server and to the other
sites, so in production pass a generator seeded from the OS CSPRNG (``np.random.default_rng()``
with no seed does that), one per site and round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, InvalidUpdateError, SecureFLError

IntArray = npt.NDArray[np.int64]

#: Largest discrete Gaussian parameter sampled (see the module docstring on exactness).
DG_SIGMA_MAX = float(2**24)
#: Largest Poisson mean sampled by :func:`sample_skellam` (Skellam std ``sqrt(2 mu)`` <= 2**14).
POISSON_MU_MAX = float(2**27)
#: Default cap on conditional-rounding redraws: with the paper's bound each draw fails with
#: probability <= beta (<= 0.61 for the default beta = exp(-0.5)), so 100 failures in a row have
#: probability <= 0.61**100 < 1e-21; reaching the cap means the input broke the norm assumption.
MAX_ROUNDING_RETRIES = 100


class RoundingError(SecureFLError):
    """Conditional randomized rounding found no rounding within the norm bound in the allowed
    number of draws (the input's norm exceeds what the bound was computed for)."""


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or int(size) < 0:
        raise ConfigError(f"size must be an integer >= 0, got {size!r}")
    return int(size)


def _check_scale(name: str, value: object, cap: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(float(value))
        or not 0.0 <= float(value) <= cap
    ):
        raise ConfigError(f"{name} must be a finite number in [0, {cap:.6g}], got {value!r}")
    return float(value)


def sample_discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> IntArray:
    """``size`` independent draws from the discrete Gaussian ``N_Z(0, sigma**2)`` (int64).

    Guarantee: each value ``x`` has probability ``exp(-x**2 / (2 sigma**2)) / Z`` (Canonne, Kamath
    & Steinke 2020, Algorithm 3; float64 evaluation as described in the module docstring). Its
    variance is slightly below ``sigma**2`` (by a relative < 1e-6 for sigma >= 1, computed exactly
    by summing the pmf). ``sigma == 0`` gives zeros. Draws are vectorised: rejection runs on whole
    batches (acceptance rate >= 0.5 for every sigma) until ``size`` values are accepted.

    Errors: ConfigError if ``sigma`` is not in [0, DG_SIGMA_MAX], ``size`` is not an integer >= 0
    or ``rng`` is not a ``numpy.random.Generator``.
    """
    s = _check_scale("sigma", sigma, DG_SIGMA_MAX)
    n = _check_size(size)
    gen = _check_rng(rng)
    out = np.zeros(n, dtype=np.int64)
    if s == 0.0 or n == 0:
        return out
    t = math.floor(s) + 1
    # Discrete Laplace with scale t as the difference of two geometrics (pmf ~ q**|y|, q = e^{-1/t}).
    p = -math.expm1(-1.0 / t)
    s2 = s * s
    centre = s2 / t
    filled = 0
    accept_rate = 0.5
    while filled < n:
        need = n - filled
        batch = int(need / accept_rate * 1.05) + 32
        proposal = gen.geometric(p, size=batch).astype(np.int64)
        proposal -= gen.geometric(p, size=batch)
        gap = np.abs(proposal).astype(np.float64)
        gap -= centre
        np.square(gap, out=gap)
        gap *= -0.5 / s2
        np.exp(gap, out=gap)  # acceptance probability
        accepted = proposal[gen.random(batch) < gap]
        take = min(need, accepted.shape[0])
        out[filled : filled + take] = accepted[:take]
        filled += take
        accept_rate = max(0.25, accepted.shape[0] / batch)
    return out


def sample_skellam(mu: float, size: int, rng: np.random.Generator) -> IntArray:
    """``size`` independent draws of ``Poisson(mu) - Poisson(mu)`` (int64): mean 0, variance ``2 mu``.

    Guarantee: exactly the symmetric Skellam distribution with parameter ``mu`` per value (up to
    numpy's float64 Poisson sampler, see the module docstring); ``mu == 0`` gives zeros.

    Errors: ConfigError if ``mu`` is not in [0, POISSON_MU_MAX], ``size`` is not an integer >= 0
    or ``rng`` is not a ``numpy.random.Generator``.
    """
    m = _check_scale("mu", mu, POISSON_MU_MAX)
    n = _check_size(size)
    gen = _check_rng(rng)
    if m == 0.0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    out = gen.poisson(m, size=n).astype(np.int64)
    out -= gen.poisson(m, size=n)
    return out


def rounded_l2_bound(scaled_norm: float, dimension: int, beta: float) -> float:
    """L2 bound enforced on a randomized rounding of a vector of norm <= ``scaled_norm`` in Z^d.

    Kairouz, Liu & Steinke 2021, Theorem 1 and Proposition 22 (the bound of their Algorithm 1, as in
    TFF's ``rounded_l2_norm_bound``)::

        bound = min( a + sqrt(d),
                     sqrt(a**2 + d/4 + sqrt(2 ln(1/beta)) * (a + sqrt(d)/2)) )   (beta > 0)
        bound = a + sqrt(d)                                                      (beta == 0)

    with ``a = scaled_norm`` and ``d = dimension``. The first term always holds (each coordinate
    moves by < 1); the second holds for an unconditioned rounding with probability >= 1 - beta,
    so conditioning on it costs at most 1/(1-beta) redraws on average.

    Errors: ConfigError for a negative/non-finite ``scaled_norm``, ``dimension`` < 1 or ``beta``
    outside [0, 1).
    """
    a = _check_scale("scaled_norm", scaled_norm, math.inf)
    if isinstance(dimension, bool) or not isinstance(dimension, int | np.integer) or dimension < 1:
        raise ConfigError(f"dimension must be an integer >= 1, got {dimension!r}")
    b = _check_beta(beta)
    root_d = math.sqrt(int(dimension))
    bound_1 = a + root_d
    if b == 0.0:
        return bound_1
    bound_2 = math.sqrt(
        a * a + 0.25 * int(dimension) + math.sqrt(2.0 * math.log(1.0 / b)) * (a + 0.5 * root_d)
    )
    return min(bound_1, bound_2)


def _check_beta(beta: object) -> float:
    if (
        isinstance(beta, bool)
        or not isinstance(beta, int | float | np.integer | np.floating)
        or not 0.0 <= float(beta) < 1.0
    ):
        raise ConfigError(f"beta must be a number in [0, 1), got {beta!r}")
    return float(beta)


def conditional_randomized_round(
    scaled: npt.NDArray[Any],
    l2_bound: float,
    *,
    rng: np.random.Generator,
    max_retries: int = MAX_ROUNDING_RETRIES,
) -> tuple[IntArray, int]:
    """Round ``scaled`` to integers, unbiasedly per coordinate, redrawing until ``||r||_2 <= l2_bound``.

    Each coordinate ``v`` becomes ``floor(v) + 1`` with probability ``v - floor(v)``, else
    ``floor(v)``: unbiased (``E[r] = v``) before conditioning. The conditioning (redraw the whole
    vector while its norm exceeds the bound) introduces a bias only through the rejected draws,
    which with :func:`rounded_l2_bound`'s bound happen with probability <= beta and in practice
    far less. Returns ``(r, retries)``, ``retries`` the number of rejected draws.

    Guarantee: ``float64(r @ r) <= l2_bound**2`` for the returned ``r`` (the float64 sum of
    squares of integers below 2**53; its relative error is below ``len(r) * 2**-53``, which the
    privacy accounting of :mod:`secure_fl.privacy.distributed` adds to the sensitivity).

    Errors: RoundingError after ``max_retries`` rejected draws; InvalidUpdateError if ``scaled``
    is not a 1-D finite real array with every ``|v| < 2**52``; ConfigError for a bad bound,
    ``max_retries`` or ``rng``.
    """
    gen = _check_rng(rng)
    bound = _check_scale("l2_bound", l2_bound, math.inf)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if not isinstance(scaled, np.ndarray) or scaled.ndim != 1:
        raise InvalidUpdateError("scaled must be a 1-D numpy array")
    values = np.asarray(scaled, dtype=np.float64)
    if values.size and not float(np.max(np.abs(values))) < 2.0**52:
        raise InvalidUpdateError("scaled must be finite with every |value| < 2**52")
    low = np.floor(values)
    frac = values - low  # exact, in [0, 1)
    limit = bound * bound
    rounded = np.empty_like(low)
    for attempt in range(max_retries + 1):
        np.less(gen.random(values.shape[0]), frac, out=rounded)
        rounded += low
        if float(np.dot(rounded, rounded)) <= limit:
            return rounded.astype(np.int64), attempt
    raise RoundingError(
        f"no randomized rounding within L2 bound {bound:.6g} after {max_retries + 1} draws "
        f"(input norm {float(np.linalg.norm(values)):.6g}); the input exceeds the norm the "
        "bound was computed for"
    )
