"""Speed of the primitives the protocol leans on: PRG, Shamir, key agreement, encoding."""

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


def test_fixed_point_encode(benchmark) -> None:
    from secure_fl.encoding import FixedPointCodec

    codec = FixedPointCodec(bits=32, frac_bits=24, clip_range=10.0)
    x = np.random.default_rng(0).normal(scale=0.01, size=4_800_000)
    rng = np.random.default_rng(1)
    benchmark.group = "encoding, 4.8M values"
    benchmark.name = "encode (clip, scale, stochastic rounding)"
    benchmark(codec.encode, x, weight=0.1, rng=rng)
