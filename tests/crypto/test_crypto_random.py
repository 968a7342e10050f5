"""Tests for secure_fl.crypto.random."""

from __future__ import annotations

import pytest

from secure_fl.crypto import DeterministicRandom, system_random_bytes
from secure_fl.errors import ConfigError


def test_system_random_bytes_length_and_variability() -> None:
    assert len(system_random_bytes(0)) == 0
    draws = {system_random_bytes(32) for _ in range(8)}
    assert all(len(d) == 32 for d in draws)
    assert len(draws) == 8


def test_system_random_bytes_rejects_negative() -> None:
    with pytest.raises(ConfigError):
        system_random_bytes(-1)


def test_deterministic_random_reproducible() -> None:
    assert DeterministicRandom(b"seed")(64) == DeterministicRandom(b"seed")(64)
    assert DeterministicRandom(7)(64) == DeterministicRandom(7)(64)


def test_deterministic_random_independent_of_chunking() -> None:
    a = DeterministicRandom(b"seed")
    b = DeterministicRandom(b"seed")
    assert a(3) + a(0) + a(61) == b(64)


def test_deterministic_random_stream_advances() -> None:
    r = DeterministicRandom(1)
    assert r(32) != r(32)


def test_deterministic_random_seeds_are_separated() -> None:
    outputs = {
        DeterministicRandom(s)(32) for s in (0, 1, -1, b"", b"\x00", b"0", b"1", bytearray(b"2"))
    }
    assert len(outputs) == 8


@pytest.mark.parametrize("seed", [1.5, "abc", None, True])
def test_deterministic_random_rejects_bad_seed(seed: object) -> None:
    with pytest.raises(ConfigError):
        DeterministicRandom(seed)  # type: ignore[arg-type]


def test_deterministic_random_rejects_negative_count() -> None:
    with pytest.raises(ConfigError):
        DeterministicRandom(0)(-1)
