"""Speed of the cryptographic primitives the protocol leans on (pytest-benchmark)."""

from __future__ import annotations

import numpy as np
import pytest

from secure_fl.crypto import MaskPRG, X25519KeyPair, agree_key, combine, split

pytestmark = pytest.mark.slow
SECRET = bytes(range(32))


@pytest.mark.parametrize("bits", [32, 64])
def test_prg_add_into(benchmark, bits: int) -> None:
    prg = MaskPRG(4_800_000, bits)
    acc = np.zeros(4_800_000, dtype=prg.dtype)
    benchmark.group = "PRG, 4.8M values"
    benchmark.name = f"add_into uint{bits}"
    benchmark(prg.add_into, acc, b"\x07" * 32, 1)


def test_prg_expand(benchmark) -> None:
    prg = MaskPRG(4_800_000, 32)
    out = np.empty(4_800_000, dtype=np.uint32)
    benchmark.group = "PRG, 4.8M values"
    benchmark.name = "expand uint32 into a buffer"
    benchmark(prg.expand, b"\x07" * 32, out)


def test_shamir_split_100(benchmark) -> None:
    benchmark.group = "Shamir, 100 holders, t=50"
    benchmark.name = "split"
    benchmark(split, SECRET, threshold=50, xs=list(range(1, 101)))


def test_shamir_combine_100(benchmark) -> None:
    shares = split(SECRET, threshold=50, xs=list(range(1, 101)))
    benchmark.group = "Shamir, 100 holders, t=50"
    benchmark.name = "combine (60 shares, extras verified)"
    benchmark(combine, shares[:60], threshold=50)


def test_key_agreement(benchmark) -> None:
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    benchmark.group = "X25519 + HKDF"
    benchmark.name = "agree_key"
    benchmark(agree_key, a, b.public_bytes, context=b"bench")
