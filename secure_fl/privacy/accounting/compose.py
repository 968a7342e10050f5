"""Composition of heterogeneous events into one epsilon with the chosen accountant (``rdp``,
``prv``, ``pld``), with the documented RDP fallback.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from secure_fl.errors import ConfigError
from secure_fl.privacy.accounting.events import (
    PLD_DISCRETIZATION,
    PRV_EPS_ERROR,
    PrivacyEvent,
    _check_accountant,
    _check_delta,
    _check_real,
)
from secure_fl.privacy.accounting.rdp import DEFAULT_ORDERS, Conversion, _rdp_epsilon


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
