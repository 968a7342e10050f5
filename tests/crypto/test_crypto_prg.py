"""Tests for secure_fl.crypto.prg: AES-256-CTR keystream vectors and mask arithmetic."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from secure_fl.crypto import DeterministicRandom, MaskPRG, expand_mask
from secure_fl.crypto.prg import CHUNK_BYTES, _keystream, sum_into
from secure_fl.errors import ConfigError, InvalidKeyError

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
CTR: dict[str, Any] = json.loads((VECTORS / "sp800_38a_ctr_aes256.json").read_text())
REGRESSION: dict[str, Any] = json.loads((VECTORS / "prg_regression.json").read_text())

SEED = bytes(range(32))
DTYPES = {32: np.uint32, 64: np.uint64}


def test_sp800_38a_ctr_aes256_keystream() -> None:
    key = bytes.fromhex(CTR["key"])
    icb = bytes.fromhex(CTR["initial_counter_block"])
    blocks = CTR["blocks"]
    pt = b"".join(bytes.fromhex(b["plaintext"]) for b in blocks)
    ct = b"".join(bytes.fromhex(b["ciphertext"]) for b in blocks)
    expected = bytes(p ^ c for p, c in zip(pt, ct, strict=True))
    assert _keystream(key, icb, 16 * len(blocks)) == expected
    assert expected == b"".join(bytes.fromhex(b["output_block"]) for b in blocks)
    # A prefix that is not a whole number of blocks is the prefix of the keystream.
    assert _keystream(key, icb, 37) == expected[:37]


def test_keystream_matches_ecb_of_counter_blocks() -> None:
    """Independent definition of CTR: E_k(ctr), E_k(ctr + 1), ... (128-bit big-endian)."""
    ecb = Cipher(algorithms.AES(SEED), modes.ECB()).encryptor()
    n_blocks = 300  # crosses a carry out of the low counter byte
    counters = b"".join(i.to_bytes(16, "big") for i in range(n_blocks))
    assert _keystream(SEED, bytes(16), 16 * n_blocks) == ecb.update(counters)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("length", [1, 3, 4, 5, 1000, 4097])
def test_expand_equals_keystream_little_endian(bits: int, length: int) -> None:
    mask = MaskPRG(length, bits).expand(SEED)
    assert mask.dtype == DTYPES[bits]
    assert mask.shape == (length,)
    nbytes = length * bits // 8
    reference = np.frombuffer(_keystream(SEED, bytes(16), nbytes), dtype=f"<u{bits // 8}")
    np.testing.assert_array_equal(mask, reference)


def test_regression_vector() -> None:
    seed = bytes.fromhex(REGRESSION["seed"])
    assert seed == SEED
    assert _keystream(seed, bytes(16), 32).hex() == REGRESSION["keystream_first_32_bytes"]
    assert expand_mask(seed, 8, 32).tolist() == REGRESSION["uint32_first_8"]
    assert expand_mask(seed, 4, 64).tolist() == REGRESSION["uint64_first_4"]
    # Longer masks start with the same words.
    assert expand_mask(seed, 1001, 32)[:8].tolist() == REGRESSION["uint32_first_8"]


def test_expand_into_out() -> None:
    prg = MaskPRG(100, 32)
    out = np.zeros(100, dtype=np.uint32)
    result = prg.expand(SEED, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expand_mask(SEED, 100, 32))


def test_different_seeds_give_different_masks() -> None:
    prg = MaskPRG(64, 64)
    a = prg.expand(bytes(32))
    b = prg.expand(bytes(31) + b"\x01")
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("sign", [1, -1])
def test_add_into_matches_reference(bits: int, sign: int) -> None:
    length = 2049
    rng = np.random.default_rng(1234)
    dtype = DTYPES[bits]
    acc = rng.integers(0, 2**bits, size=length, dtype=dtype, endpoint=False)
    original = acc.copy()
    prg = MaskPRG(length, bits)
    prg.add_into(acc, SEED, sign)
    mask = [int(v) for v in expand_mask(SEED, length, bits)]
    modulus = 2**bits
    expected = [(int(a) + sign * m) % modulus for a, m in zip(original, mask, strict=True)]
    assert [int(v) for v in acc] == expected


@pytest.mark.parametrize("bits", [32, 64])
def test_masks_cancel(bits: int) -> None:
    length = 1000
    prg = MaskPRG(length, bits)
    rng = DeterministicRandom(b"cancel")
    x = np.arange(length, dtype=DTYPES[bits])
    acc = x.copy()
    seeds = [rng(32) for _ in range(5)]
    for s in seeds:
        prg.add_into(acc, s, 1)
    assert not np.array_equal(acc, x)
    for s in reversed(seeds[1:]):
        prg.add_into(acc, s, -1)
    prg.add_into(acc, seeds[0], -1)
    np.testing.assert_array_equal(acc, x)


def test_add_into_allocates_no_vector_sized_scratch() -> None:
    """Masks are generated chunk by chunk: no buffer of the vector's size is allocated."""
    length = 1 << 20  # 4 MiB of uint32
    acc = np.zeros(length, dtype=np.uint32)
    MaskPRG(length, 32, threads=2).add_into(acc, SEED)  # warm-up: thread pool, zero chunk
    prg = MaskPRG(length, 32, threads=2)  # a fresh instance: any per-instance buffer counts
    tracemalloc.start()
    try:
        prg.add_into(acc, bytes(32), -1)
        prg.add_many_into(acc, [(SEED, 1), (bytes(32), 1)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two threads, each with two chunk-sized buffers, and small change: a third of the vector.
    assert peak < 4 * CHUNK_BYTES + (1 << 18) < 4 * length


def _reference_sum(base: np.ndarray, terms: list[tuple[bytes, int]], bits: int) -> np.ndarray:
    acc = base.copy()
    prg = MaskPRG(base.shape[0], bits, threads=1)
    for seed, sign in terms:
        prg.add_into(acc, seed, sign)
    return acc


# (length, chunk_bytes, threads): partial last chunks, single chunks, and vectors of >= 1 MiB
# that are split into slabs across threads (slab boundaries resume the keystream mid-mask).
SHAPES = [
    (1, 64, 1),
    (7, 64, 2),
    (9, 64, 1),
    (1000, 64, 1),
    (1000, 80, 2),
    (4097, 4096, 1),
    (300_001, 4096, 2),
    (300_001, 48_000, 3),
    (150_003, 16_384, 2),
]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(("length", "chunk_bytes", "threads"), SHAPES)
def test_add_many_into_equals_one_add_into_per_term(
    bits: int, length: int, chunk_bytes: int, threads: int
) -> None:
    rng = DeterministicRandom(b"many")
    terms = [(rng(32), sign) for sign in (1, -1, -1, 1, 1)]
    base = np.random.default_rng(7).integers(0, 2**bits, size=length, dtype=DTYPES[bits])
    expected = _reference_sum(base, terms, bits)
    prg = MaskPRG(length, bits, threads=threads, chunk_bytes=chunk_bytes)
    out = np.empty_like(base)
    prg.add_many_into(out, terms, base=base)
    np.testing.assert_array_equal(out, expected)
    acc = base.copy()
    prg.add_many_into(acc, terms)
    np.testing.assert_array_equal(acc, expected)
    same = base.copy()
    prg.add_many_into(same, terms, base=same)  # base is acc itself: in place
    np.testing.assert_array_equal(same, expected)
    reference = np.frombuffer(
        _keystream(terms[0][0], bytes(16), length * bits // 8), f"<u{bits // 8}"
    )
    np.testing.assert_array_equal(prg.expand(terms[0][0]), reference)


def test_add_many_into_without_terms_copies_base() -> None:
    base = np.arange(100, dtype=np.uint32)
    out = np.zeros(100, dtype=np.uint32)
    MaskPRG(100, 32).add_many_into(out, [], base=base)
    np.testing.assert_array_equal(out, base)


def test_add_many_into_validation() -> None:
    prg = MaskPRG(8, 32)
    acc = np.zeros(8, dtype=np.uint32)
    with pytest.raises(ConfigError, match=r"terms\[1\] sign"):
        prg.add_many_into(acc, [(SEED, 1), (SEED, 0)])
    with pytest.raises(ConfigError, match=r"terms\[0\]"):
        prg.add_many_into(acc, [SEED])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="seed"):
        prg.add_many_into(acc, [(bytes(31), 1)])
    with pytest.raises(ConfigError, match="base"):
        prg.add_many_into(acc, [(SEED, 1)], base=np.zeros(8, dtype=np.uint64))
    wide = np.zeros(9, dtype=np.uint32)
    with pytest.raises(ConfigError, match="base"):
        prg.add_many_into(wide[:8], [(SEED, 1)], base=wide[1:])  # overlaps acc, is not acc
    np.testing.assert_array_equal(acc, 0)  # nothing written on a refused call


def test_discard_checks_seeds_and_writes_nothing() -> None:
    prg = MaskPRG(300_001, 32, threads=2, chunk_bytes=4096)
    prg.discard([SEED, bytes(32)])
    with pytest.raises(InvalidKeyError, match="seed"):
        prg.discard([SEED, b"short"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threads": 0}, "threads"),
        ({"threads": True}, "threads"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"chunk_bytes": 100}, "chunk_bytes"),
        ({"chunk_bytes": 48}, "chunk_bytes"),
    ],
)
def test_constructor_validation_of_threads_and_chunk(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MaskPRG(8, 32, **kwargs)


@pytest.mark.parametrize("bits", [32, 64])
def test_sum_into_equals_sequential_adds(bits: int) -> None:
    rng = np.random.default_rng(3)
    length = 300_001
    vectors = [rng.integers(0, 2**bits, size=length, dtype=DTYPES[bits]) for _ in range(5)]
    acc = rng.integers(0, 2**bits, size=length, dtype=DTYPES[bits])
    expected = acc.copy()
    for v in vectors:
        np.add(expected, v, out=expected)
    sum_into(acc, vectors, threads=2)
    np.testing.assert_array_equal(acc, expected)


def test_sum_into_validation() -> None:
    acc = np.zeros(8, dtype=np.uint32)
    with pytest.raises(ConfigError, match=r"vectors\[1\]"):
        sum_into(acc, [np.zeros(8, dtype=np.uint32), np.zeros(8, dtype=np.uint64)])
    with pytest.raises(ConfigError, match=r"vectors\[0\]"):
        sum_into(acc, [np.zeros(9, dtype=np.uint32)])
    with pytest.raises(ConfigError, match="acc"):
        sum_into(np.zeros(8, dtype=np.int32), [])


@pytest.mark.parametrize("seed", [b"", bytes(16), bytes(31), bytes(33), "0" * 32])
def test_seed_must_be_32_bytes(seed: Any) -> None:
    prg = MaskPRG(8, 32)
    with pytest.raises(InvalidKeyError, match="seed"):
        prg.expand(seed)
    with pytest.raises(InvalidKeyError, match="seed"):
        prg.add_into(np.zeros(8, dtype=np.uint32), seed)


@pytest.mark.parametrize(
    ("length", "bits", "field"),
    [(0, 32, "length"), (-3, 32, "length"), (1.5, 32, "length"), (8, 16, "bits"), (8, 128, "bits")],
)
def test_constructor_validation(length: Any, bits: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MaskPRG(length, bits)


@pytest.mark.parametrize(
    "acc",
    [
        np.zeros(8, dtype=np.uint64),
        np.zeros(8, dtype=np.int32),
        np.zeros(9, dtype=np.uint32),
        np.zeros((2, 4), dtype=np.uint32),
        [0] * 8,
    ],
)
def test_add_into_rejects_bad_acc(acc: Any) -> None:
    with pytest.raises(ConfigError, match="acc"):
        MaskPRG(8, 32).add_into(acc, SEED)


def test_add_into_rejects_read_only_acc() -> None:
    acc = np.zeros(8, dtype=np.uint32)
    acc.flags.writeable = False
    with pytest.raises(ConfigError, match="acc"):
        MaskPRG(8, 32).add_into(acc, SEED)


@pytest.mark.parametrize("sign", [0, 2, -2, True])
def test_add_into_rejects_bad_sign(sign: Any) -> None:
    with pytest.raises(ConfigError, match="sign"):
        MaskPRG(8, 32).add_into(np.zeros(8, dtype=np.uint32), SEED, sign)


def test_expand_rejects_bad_out() -> None:
    prg = MaskPRG(8, 32)
    for bad in (np.zeros(8, dtype=np.uint64), np.zeros(7, dtype=np.uint32)):
        with pytest.raises(ConfigError, match="out"):
            prg.expand(SEED, out=bad)
    strided = np.zeros(16, dtype=np.uint32)[::2]
    with pytest.raises(ConfigError, match="out"):
        prg.expand(SEED, out=strided)


@pytest.mark.parametrize("bits", [32, 64])
def test_chi_square_uniformity(bits: int) -> None:
    """Byte-level histograms of a long mask are consistent with uniform (fixed seed, so stable)."""
    words = expand_mask(b"\x42" * 32, 1 << 18, bits)
    shift_top = bits - 8
    for shift in (0, 8, shift_top):
        values = ((words >> DTYPES[bits](shift)) & DTYPES[bits](0xFF)).astype(np.int64)
        counts = np.bincount(values, minlength=256)
        result = stats.chisquare(counts)
        assert result.pvalue > 1e-4, (shift, result)
    # Sanity of the test itself: a biased stream (top bit cleared) must fail it.
    biased = (words >> DTYPES[bits](shift_top)).astype(np.int64) & 0x7F
    assert stats.chisquare(np.bincount(biased, minlength=256)).pvalue < 1e-10
