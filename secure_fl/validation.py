"""Small validators shared by every configuration: one place for "a number in this range".

Each helper checks one value and returns it normalised (an ``int`` stays an ``int``, a real
becomes a ``float``), or raises :class:`~secure_fl.errors.ConfigError` naming the field (as the
caller's dotted path, e.g. ``aggregation.clip_range``) and the allowed range. ``bool`` is never
accepted as a number. Nothing here imports numpy or torch, so config loaders stay light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from secure_fl.errors import ConfigError

T = TypeVar("T")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(x: float) -> str:
    return f"{x:g}"


def real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval given by ``low``/``high`` (closed unless
    ``low_open``/``high_open``; None is unbounded).

    Errors: ConfigError naming ``name`` and the interval when it is not a finite real in it."""
    ok = _is_real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        x = float(value)  # type: ignore[arg-type]
        if low is not None and (x < low or (low_open and x == low)):
            ok = False
        if high is not None and (x > high or (high_open and x == high)):
            ok = False
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else _fmt(low)
        hi = "inf" if high is None else _fmt(high)
        raise ConfigError(
            f"{name} must be a finite number in {left}{lo}, {hi}{right}, got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def positive(name: str, value: object) -> float:
    """``value`` as a finite float > 0. Errors: ConfigError naming ``name``."""
    return real(name, value, low=0.0, low_open=True)


def fraction(name: str, value: object, *, high: float = 1.0, high_open: bool = True) -> float:
    """``value`` as a float in ``[0, high)`` (``[0, high]`` with ``high_open=False``).
    Errors: ConfigError naming ``name`` and the interval."""
    return real(name, value, low=0.0, high=high, high_open=high_open)


def integer(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (None: unbounded). Errors: ConfigError naming
    ``name`` and the range (a bool or a float such as ``3.0`` is refused)."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (low is None or value >= low)
        and (high is None or value <= high)
    ):
        return int(value)
    if low is not None and high is not None:
        what = f"an integer in [{low}, {high}]"
    elif low is not None:
        what = f"an integer >= {low}"
    elif high is not None:
        what = f"an integer <= {high}"
    else:
        what = "an integer"
    raise ConfigError(f"{name} must be {what}, got {value!r}")


def boolean(name: str, value: object) -> bool:
    """``value`` when it is exactly True or False. Errors: ConfigError naming ``name``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def choice(name: str, value: object, allowed: Sequence[T]) -> T:
    """``value`` when it is one of ``allowed``. Errors: ConfigError naming ``name`` and listing
    the allowed values."""
    for option in allowed:
        if type(value) is type(option) and value == option:
            return option
    raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def optional(name: str, value: object, check: Callable[[str, object], T]) -> T | None:
    """None, or ``check(name, value)``: e.g. ``optional("l2_clip", v, positive)``.
    Errors: whatever ``check`` raises."""
    if value is None:
        return None
    return check(name, value)


def known_keys(where: str, keys: Collection[str], allowed: Collection[str]) -> None:
    """Refuse any key of ``keys`` outside ``allowed``.

    Errors: ConfigError naming ``where``, the unknown keys and the allowed ones, sorted."""
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) in {where}: {unknown}; allowed: {sorted(allowed)}")


def string(name: str, value: object, *, allow_empty: bool = False) -> str:
    """``value`` when it is a string (non-empty unless ``allow_empty``). Errors: ConfigError."""
    if not isinstance(value, str) or (not allow_empty and not value):
        what = "a string" if allow_empty else "a non-empty string"
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return value


__all__ = [
    "boolean",
    "choice",
    "fraction",
    "integer",
    "known_keys",
    "optional",
    "positive",
    "real",
    "string",
]
