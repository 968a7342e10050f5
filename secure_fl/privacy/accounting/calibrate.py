"""Noise calibration: the smallest noise multiplier that meets a target epsilon, by geometric
bisection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from secure_fl.errors import ConfigError
from secure_fl.privacy.accounting.compose import compute_epsilon
from secure_fl.privacy.accounting.events import (
    _check_accountant,
    _check_delta,
    _check_int,
    _check_real,
)

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
