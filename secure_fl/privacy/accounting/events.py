"""The accountants' input: :class:`PrivacyEvent` (Poisson-subsampled Gaussian steps), the accountant
names and the argument checks every accounting function shares (ConfigError naming the field and
its allowed range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from secure_fl.errors import ConfigError

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
"""Names accepted by ``accountant=``; ``"pld"`` needs the optional ``dp-accounting`` package."""

PRV_EPS_ERROR = 0.01
"""Opacus PRV ``eps_error``: the reported epsilon is the PRV estimate's upper end (estimate + this)."""

PLD_DISCRETIZATION = 1e-4
"""``value_discretization_interval`` of the dp_accounting PLD accountant."""


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
