"""Privacy accounting for Poisson-subsampled Gaussian steps: epsilon, composition, noise calibration.

Every differentially private step that secure_fl runs is, for accounting, one *event*: a Gaussian
mechanism with noise multiplier ``sigma`` (noise standard deviation divided by the L2 sensitivity,
i.e. the clip bound) applied to a Poisson subsample with rate ``q``, repeated ``steps`` times.
Sample-level DP-SGD at a site (Opacus), site-level DP-FedAvg (each site included with probability
``q`` per round, one step per round) and the distributed mechanisms (through the Gaussian-equivalent
multiplier that :mod:`secure_fl.privacy.distributed` reports) are all accounted this way. Neighbouring
datasets differ by adding or removing one record (a patient at sample level, an institution at site
level).

Accountants (``accountant=``):

* ``"rdp"`` - Renyi DP of the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019, "Renyi
  Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3: the exact binomial sum for
  integer orders, quadrature of the defining integral for fractional ones), composed additively
  over events and converted to (epsilon, delta) with the conversion of Canonne, Kamath & Steinke
  2020 (arXiv:2004.00010, Prop. 12; also Balle et al. 2020), minimised over a fixed grid of orders.
  Implemented here (numpy/scipy, no torch). Every order gives a valid bound, so the result is an
  *upper bound* on the tight epsilon (never the exact value); it is typically 5-20 % above it.
  Events whose RDP bound is only established at integer orders (``integer_orders=True``: the
  distributed Skellam mechanism) are evaluated at ``ceil(alpha)`` for a fractional order ``alpha``,
  which is valid because Renyi divergence is non-decreasing in the order.
* ``"prv"`` - numerical composition of privacy-loss random variables (Gopi, Lee & Wutschitz 2021)
  through Opacus' ``PRVAccountant``. We report its **upper** estimate (``eps_upper``: the estimate
  at ``delta - delta_error`` plus ``eps_error``), never the point estimate, so the value is not
  below the tight epsilon of the mechanism up to the accountant's own stated error. Default
  ``eps_error`` is :data:`PRV_EPS_ERROR`, ``delta_error = delta / 1000``.
* ``"pld"`` - privacy-loss distributions with pessimistic discretisation (Google's ``dp_accounting``,
  Doroshenko et al. 2022), optional (``pip install dp-accounting``): an upper bound by construction.

Where the PRV/PLD backend cannot evaluate a configuration (for example a delta so small that
floating point error dominates, or an epsilon so close to 0 that the discretised curve never reaches
the target delta) we fall back to the RDP bound - also an upper bound - and emit a ``UserWarning``;
the reported epsilon is therefore never below the tight value.

Known gaps between the accountants (used by the audit): ``prv`` and ``pld`` agree within about
``PRV_EPS_ERROR``; ``rdp`` is at least the tight epsilon, so ``rdp >= prv - 2 * PRV_EPS_ERROR``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import special

from secure_fl.errors import ConfigError

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
"""Names accepted by ``accountant=``; ``"pld"`` needs the optional ``dp-accounting`` package."""

PRV_EPS_ERROR = 0.01
"""Opacus PRV ``eps_error``: the reported epsilon is the PRV estimate's upper end (estimate + this)."""

PLD_DISCRETIZATION = 1e-4
"""``value_discretization_interval`` of the dp_accounting PLD accountant."""

DEFAULT_ORDERS: tuple[float, ...] = (
    *(1.0 + x / 20.0 for x in range(1, 20)),  # 1.05 .. 1.95 (large epsilon)
    *(2.0 + x / 10.0 for x in range(0, 90)),  # 2.0 .. 10.9
    *(float(a) for a in range(11, 64)),
    *(64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0),  # small epsilon
)
"""RDP orders searched by the ``"rdp"`` accountant (any order yields a valid bound)."""

INTEGER_ORDERS: tuple[float, ...] = tuple(a for a in DEFAULT_ORDERS if a == math.floor(a))
"""The integer orders of :data:`DEFAULT_ORDERS` (for mechanisms bounded at integer orders only)."""

Conversion = Literal["improved", "classic"]


@dataclass(frozen=True)
class PrivacyEvent:
    """``steps`` Poisson-subsampled Gaussian steps with one noise multiplier and sampling rate.

    ``noise_multiplier`` is the noise standard deviation divided by the L2 sensitivity (0 means no
    noise: infinite epsilon); ``sample_rate`` is the Poisson inclusion probability in [0, 1] (1: no
    subsampling); ``steps`` is a non-negative integer. ``integer_orders``: the mechanism's RDP
    bound ``alpha / (2 sigma**2)`` is only established at integer orders (the distributed Skellam
    mechanism); the accountants then evaluate a fractional order at its ceiling, and PRV/PLD
    (which would need the whole privacy-loss distribution) fall back to RDP for it. Invalid
    values raise :class:`ConfigError`.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    integer_orders: bool = False

    def __post_init__(self) -> None:
        _check_real("noise_multiplier", self.noise_multiplier, low=0.0, low_open=False)
        _check_real("sample_rate", self.sample_rate, low=0.0, low_open=False, high=1.0)
        _check_int("steps", self.steps, low=0)
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))
        if not isinstance(self.integer_orders, bool):
            raise ConfigError(f"integer_orders must be a bool, got {self.integer_orders!r}")


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    low_open: bool = True,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    allowed = f"{lo or '(-inf'}, {hi or 'inf)'}"
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, in {allowed}; got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ConfigError(f"{name} must be in {allowed}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ConfigError(f"{name} must be in {allowed}, got {value!r}")
    return v


def _check_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if int(value) < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_delta(delta: object) -> float:
    return _check_real("delta", delta, low=0.0, high=1.0, high_open=True)


def _check_accountant(accountant: object) -> str:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return str(accountant)


# ---------------------------------------------------------------------------------------------
# RDP of the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019)


def _log_binom_int(alpha: int) -> NDArray[np.float64]:
    k = np.arange(alpha + 1, dtype=np.float64)
    return np.asarray(
        special.gammaln(alpha + 1.0) - special.gammaln(k + 1.0) - special.gammaln(alpha - k + 1.0)
    )


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha: a finite binomial expansion (Mironov et al. 2019, Sec. 3.3)."""
    k = np.arange(alpha + 1, dtype=np.float64)
    terms = (
        _log_binom_int(alpha)
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2.0 * sigma * sigma)
    )
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alphas: NDArray[np.float64]) -> NDArray[np.float64]:
    """log A_alpha for fractional orders, by quadrature of its defining integral.

    A_alpha = E_{z ~ N(0, s^2)} [ ((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha ] (Mironov et al.
    2019, Sec. 3.3). The log-integrand is a smooth function whose mass lies within 12 s of
    [0, alpha] (for large z it is a Gaussian centred at alpha); a uniform grid with step s/24 and
    the trapezoid rule (summed in log space) is then accurate to far below 1e-9 relative - the
    test suite checks it against Opacus' independent series. The series of Mironov et al. converges
    only polynomially near q = 1/2, which made it too slow for site-level sampling rates.
    """
    half_width = 12.0 * sigma + 1.0
    lo, hi = -half_width, float(alphas.max()) + half_width
    step = sigma / 24.0
    n = int(min(max(math.ceil((hi - lo) / step), 2000), 400_000))
    z, dz = np.linspace(lo, hi, n, retstep=True)
    log_mu0 = -(z * z) / (2.0 * sigma * sigma) - math.log(sigma * math.sqrt(2.0 * math.pi))
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2.0 * z - 1.0) / (2.0 * sigma * sigma))
    integrand = log_mu0[None, :] + alphas[:, None] * log_ratio[None, :]
    return np.asarray(special.logsumexp(integrand, axis=1) + math.log(dz))


@lru_cache(maxsize=4096)
def _rdp_vector_cached(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """RDP of one Poisson-subsampled Gaussian step at each order (a cached, immutable tuple)."""
    a = np.asarray(orders, dtype=np.float64)
    if q == 0.0:
        return tuple(0.0 for _ in orders)
    if sigma == 0.0:
        return tuple(math.inf for _ in orders)
    if q == 1.0:
        return tuple((a / (2.0 * sigma * sigma)).tolist())
    log_a = np.empty_like(a)
    is_int = a == np.round(a)
    for idx in np.flatnonzero(is_int):
        log_a[idx] = _log_a_int(q, sigma, int(a[idx]))
    if (~is_int).any():
        log_a[~is_int] = _log_a_frac(q, sigma, a[~is_int])
    return tuple((np.maximum(log_a, 0.0) / (a - 1.0)).tolist())


def rdp_poisson_gaussian(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> NDArray[np.float64]:
    """RDP epsilons, one per order (> 1), of ``steps`` Poisson-subsampled Gaussian steps.

    Exact for integer orders and by quadrature for fractional ones (Mironov et al. 2019); ``q = 1`` gives ``steps * alpha / (2 sigma^2)``, ``q = 0`` gives 0. Raises ConfigError for
    out-of-range inputs or an order <= 1.
    """
    event = PrivacyEvent(noise_multiplier, sample_rate, steps)
    orders_t = _check_orders(orders)
    per_step = np.array(_rdp_vector_cached(event.sample_rate, event.noise_multiplier, orders_t))
    if event.steps == 0:
        return np.zeros_like(per_step)
    return per_step * event.steps


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in orders)
    if not out or any(not math.isfinite(a) or a <= 1.0 for a in out):
        raise ConfigError(
            f"orders must be a non-empty list of finite RDP orders > 1, got {orders!r}"
        )
    return out


def rdp_to_epsilon(
    orders: Sequence[float],
    rdp: Sequence[float] | NDArray[np.float64],
    delta: float,
    *,
    conversion: Conversion = "improved",
) -> tuple[float, float]:
    """(epsilon, best order) from RDP values at ``orders``: the minimum over orders.

    ``"improved"``: eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1) (Canonne, Kamath &
    Steinke 2020, Prop. 12; Balle et al. 2020). ``"classic"``: eps = rdp + log(1/delta)/(a-1)
    (Mironov 2017, Prop. 3), which reproduces the moments-accountant figures of Abadi et al. 2016.
    Both are valid upper bounds; the improved one is never larger.
    """
    delta = _check_delta(delta)
    a = np.asarray(_check_orders(orders))
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != a.shape:
        raise ConfigError(f"rdp must have one value per order ({a.size}), got shape {r.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        if conversion == "classic":
            eps = r + math.log(1.0 / delta) / (a - 1.0)
        elif conversion == "improved":
            eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
        else:
            raise ConfigError(f"conversion must be 'improved' or 'classic', got {conversion!r}")
    eps = np.where(np.isnan(eps), np.inf, eps)
    idx = int(np.argmin(eps))
    return max(float(eps[idx]), 0.0), float(a[idx])


# ---------------------------------------------------------------------------------------------
# composition


def canonical_events(events: Iterable[PrivacyEvent]) -> tuple[PrivacyEvent, ...]:
    """Events merged by (noise multiplier, sample rate, integer_orders), zero-step and q = 0 events
    dropped, sorted.

    Composition is commutative, so this canonical form makes every accountant's result independent
    of the order in which rounds were recorded (the PRV/PLD numerics would otherwise differ in the
    last digits).
    """
    merged: dict[tuple[float, float, bool], int] = {}
    for e in events:
        if not isinstance(e, PrivacyEvent):
            raise ConfigError(f"events must be PrivacyEvent instances, got {type(e).__name__}")
        if e.steps == 0 or e.sample_rate == 0.0:
            continue
        key = (e.noise_multiplier, e.sample_rate, e.integer_orders)
        merged[key] = merged.get(key, 0) + e.steps
    return tuple(PrivacyEvent(s, q, n, i) for (s, q, i), n in sorted(merged.items()))


def _rdp_epsilon(
    events: tuple[PrivacyEvent, ...],
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    conversion: Conversion = "improved",
) -> float:
    total = np.zeros(len(orders))
    # Renyi divergence is non-decreasing in the order: a bound at ceil(alpha) bounds alpha too.
    ceiled = tuple(float(math.ceil(a)) for a in orders)
    for e in events:
        at = ceiled if e.integer_orders else orders
        total = total + rdp_poisson_gaussian(e.noise_multiplier, e.sample_rate, e.steps, at)
    return rdp_to_epsilon(orders, total, delta, conversion=conversion)[0]


def _prv_epsilon(events: tuple[PrivacyEvent, ...], delta: float, eps_error: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)  # Opacus RDP's "optimal order" notes
        return float(acc.get_epsilon(delta, eps_error=eps_error))


def _pld_epsilon(events: tuple[PrivacyEvent, ...], delta: float) -> float:
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "accountant='pld' needs the optional package dp-accounting (pip install dp-accounting)"
        ) from exc
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for e in events:
        inner = dp_accounting.PoissonSampledDpEvent(
            e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
        )
        acc.compose(dp_accounting.SelfComposedDpEvent(inner, e.steps))
    return float(acc.get_epsilon(delta))


def epsilon_of_events(
    events: Iterable[PrivacyEvent],
    delta: float,
    accountant: str = "rdp",
    *,
    eps_error: float = PRV_EPS_ERROR,
    orders: Sequence[float] = DEFAULT_ORDERS,
    conversion: Conversion = "improved",
) -> float:
    """Epsilon at ``delta`` of the sequential composition of heterogeneous ``events``.

    Events may differ in noise multiplier, sampling rate and steps (noise schedules, changing
    participation); the result does not depend on their order. A history holding an
    ``integer_orders`` event is evaluated with ``"rdp"`` whatever ``accountant`` says (only an RDP
    bound is known for it). An empty history (or only zero-step
    events) gives 0.0; any event with noise multiplier 0 and q > 0 gives ``math.inf``.

    Guarantee: the value is an upper bound on the tight epsilon of the composed mechanism - exactly
    so for ``"rdp"`` and ``"pld"`` (pessimistic), and up to the PRV accountant's stated numerical
    error for ``"prv"`` (whose *upper* estimate is returned). ``eps_error`` is PRV's error
    parameter; ``orders`` and ``conversion`` configure ``"rdp"``.

    Raises ConfigError for an unknown accountant or out-of-range delta.
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    canon = canonical_events(events)
    if not canon:
        return 0.0
    if any(e.noise_multiplier == 0.0 for e in canon):
        return math.inf
    if accountant == "rdp" or any(e.integer_orders for e in canon):
        # integer_orders events have an RDP bound only: PRV/PLD of the Gaussian would not bound them.
        return _rdp_epsilon(canon, delta, orders, conversion)
    try:
        if accountant == "prv":
            _check_real("eps_error", eps_error, low=0.0)
            return _prv_epsilon(canon, delta, eps_error)
        return _pld_epsilon(canon, delta)
    except (RuntimeError, ValueError, FloatingPointError, OverflowError) as exc:
        if isinstance(exc, ConfigError):
            raise
        # Documented fallback: the RDP bound is also an upper bound on the tight epsilon.
        warnings.warn(
            f"accountant {accountant!r} could not evaluate these events ({exc}); "
            "reporting the RDP upper bound instead",
            UserWarning,
            stacklevel=2,
        )
        return _rdp_epsilon(canon, delta, orders, conversion)


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    integer_orders: bool = False,
    **options: object,
) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps.

    ``noise_multiplier`` >= 0 (noise std / clip bound), ``sample_rate`` in [0, 1], ``steps`` >= 0,
    ``delta`` in (0, 1), ``accountant`` in :data:`ACCOUNTANTS`; ``integer_orders`` as in
    :class:`PrivacyEvent`. Usable without any training. The result is an upper bound on the tight
    epsilon (see :func:`epsilon_of_events`, which takes the same keyword ``options``). Raises
    ConfigError naming the offending argument.
    """
    event = PrivacyEvent(noise_multiplier, sample_rate, steps, integer_orders)
    return epsilon_of_events([event], delta, accountant, **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# calibration

_SIGMA_MIN = 1e-3
_SIGMA_MAX = 1e4


def calibrate_noise(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    tolerance: float = 0.01,
    **options: object,
) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps at ``delta`` is <= target.

    Bisection on log(sigma) over [1e-3, 1e4] with the chosen accountant. Guarantee: the returned
    ``sigma`` satisfies ``compute_epsilon(sigma, ...) <= target_epsilon`` (checked by recomputing
    before returning), and either ``compute_epsilon(sigma, ...) >= target_epsilon - tolerance`` or
    ``sigma`` is within a relative 1e-6 of a multiplier whose epsilon exceeds the target, so no
    noticeably smaller multiplier meets the target. ``tolerance`` is an absolute tolerance on
    epsilon (> 0).

    Raises ConfigError for out-of-range inputs (naming the argument and its range), for
    ``steps == 0`` (any noise meets the target), and when the target is unreachable with
    ``sigma <= 1e4``.
    """
    target = _check_real("target_epsilon", target_epsilon, low=0.0)
    _check_real("sample_rate", sample_rate, low=0.0, high=1.0)
    steps = _check_int("steps", steps, low=1)
    _check_delta(delta)
    _check_accountant(accountant)
    tol = _check_real("tolerance", tolerance, low=0.0)

    def eps(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, steps, delta, accountant, **options)  # type: ignore[arg-type]

    if eps(_SIGMA_MAX) > target:
        raise ConfigError(
            f"target_epsilon={target:g} is unreachable at delta={delta:g} with sample_rate="
            f"{sample_rate:g} and steps={steps} (needs noise_multiplier > {_SIGMA_MAX:g}); "
            "raise target_epsilon or delta, or lower sample_rate or steps"
        )
    # bracket: eps(lo) > target >= eps(hi)
    if eps(1.0) > target:
        lo, hi = 1.0, 4.0
        while eps(hi) > target:
            lo, hi = hi, min(hi * 4.0, _SIGMA_MAX)
    else:
        lo, hi = 0.25, 1.0
        while eps(lo) <= target:
            if lo <= _SIGMA_MIN:
                return _verified(lo, eps, target)
            lo, hi = max(lo / 4.0, _SIGMA_MIN), lo
    return _verified(bisect_geometric(eps, lo, hi, target, tol), eps, target)


def bisect_geometric(
    eps: Callable[[float], float], lo: float, hi: float, target: float, tolerance: float
) -> float:
    """The smallest ``x`` in ``[lo, hi]`` (to relative 1e-6, or to within ``tolerance`` of
    ``target``) with ``eps(x) <= target``, for ``eps`` decreasing in ``x``, bisecting geometrically
    from the bracket ``eps(lo) > target >= eps(hi)``. Used for noise multipliers and noise scales.
    """
    eps_hi = eps(hi)
    while target - eps_hi > tolerance and (hi - lo) > 1e-6 * hi:
        mid = math.sqrt(lo * hi)
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


def _verified(sigma: float, eps: Callable[[float], float], target: float) -> float:
    value = eps(sigma)
    if not value <= target:  # pragma: no cover - a bisection invariant
        raise ConfigError(
            f"calibration failed: sigma={sigma:g} gives epsilon {value:g} > {target:g}"
        )
    return sigma
