"""The one module of small validators: each names the field and the allowed range."""

from __future__ import annotations

import math

import pytest

from secure_fl import validation as v
from secure_fl.errors import ConfigError


def test_reals_and_their_intervals() -> None:
    assert v.real("x", 3) == 3.0 and isinstance(v.real("x", 3), float)
    assert v.positive("x", 1e-300) == 1e-300
    assert v.fraction("x", 0.0) == 0.0
    for bad in (True, "1", None, math.inf, math.nan):
        with pytest.raises(ConfigError, match=r"^x must be a finite number"):
            v.real("x", bad)
    with pytest.raises(ConfigError, match=r"a\.b must be a finite number in \(0, inf\), got 0"):
        v.positive("a.b", 0)
    with pytest.raises(ConfigError, match=r"in \[0, 0\.5\), got 0\.5"):
        v.fraction("f", 0.5, high=0.5)
    assert v.fraction("f", 1.0, high_open=False) == 1.0


def test_integers_choices_booleans_optionals_strings() -> None:
    assert v.integer("n", 5, low=1, high=5) == 5
    for bad in (0, 6, 5.0, True, "5"):
        with pytest.raises(ConfigError, match=r"^n must be an integer in \[1, 5\]"):
            v.integer("n", bad, low=1, high=5)
    with pytest.raises(ConfigError, match="n must be an integer <= 3"):
        v.integer("n", 4, high=3)
    assert v.choice("c", 64, (32, 64)) == 64
    with pytest.raises(ConfigError, match=r"c must be one of \[32, 64\], got True"):
        v.choice("c", True, (32, 64))  # True == 1 but is no bit width
    assert v.boolean("b", False) is False
    with pytest.raises(ConfigError, match="b must be true or false"):
        v.boolean("b", 0)
    assert v.optional("o", None, v.positive) is None
    assert v.optional("o", 2, v.positive) == 2.0
    with pytest.raises(ConfigError, match="s must be a non-empty string"):
        v.string("s", "")
    assert v.string("s", "", allow_empty=True) == ""


def test_unknown_keys_are_listed_with_the_allowed_ones() -> None:
    v.known_keys("sec", ["a"], ["a", "b"])
    with pytest.raises(
        ConfigError, match=r"unknown option\(s\) in sec: \['c'\]; allowed: \['a', 'b'\]"
    ):
        v.known_keys("sec", ["c", "a"], ["b", "a"])
