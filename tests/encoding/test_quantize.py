"""FixedPointCodec: fixed point with unbiased stochastic rounding modulo 2**bits."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from secure_fl.encoding import FixedPointCodec, plan_bit_width
from secure_fl.errors import ConfigError, InvalidUpdateError


class _FixedUniform(np.random.Generator):
    """A Generator whose uniforms are all ``u``: u=0 always rounds up, u=1-2**-53 always down."""

    def __init__(self, u: float) -> None:
        super().__init__(np.random.PCG64(0))
        self._u = u

    def random(self, size: Any = None, dtype: Any = np.float64, out: Any = None) -> Any:
        if out is None:
            return np.full(size, self._u)
        out[...] = self._u
        return out


ROUND_UP = _FixedUniform(0.0)
ROUND_DOWN = _FixedUniform(1.0 - 2.0**-53)


def _scaled(codec: FixedPointCodec, x: np.ndarray, weight: float) -> np.ndarray:
    """v = fl(clip(x) * fl(weight * scale)), the value the codec rounds stochastically."""
    c = codec.clip_range
    return np.clip(x.astype(np.float64), -c, c) * (weight * codec.scale)


# --- construction --------------------------------------------------------------------------------


def test_properties() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=16, clip_range=4.0)
    assert codec.scale == 65536.0
    assert codec.dtype is np.uint32 and codec.modulus == 2**32 and codec.max_int == 2**31 - 1
    codec64 = FixedPointCodec(bits=64, frac_bits=40, clip_range=4.0)
    assert codec64.dtype is np.uint64 and codec64.modulus == 2**64
    assert codec64.max_abs_encoded(1.0) == 4 * 2**40
    assert codec64.max_abs_encoded(0.3) == math.ceil(4.0 * (0.3 * 2.0**40))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"bits": 16, "frac_bits": 8, "clip_range": 1.0}, "bits must be 32 or 64"),
        ({"bits": True, "frac_bits": 8, "clip_range": 1.0}, "bits must be 32 or 64"),
        ({"bits": 32, "frac_bits": -1, "clip_range": 1.0}, "frac_bits must be an integer in [0,"),
        ({"bits": 32, "frac_bits": 2.0, "clip_range": 1.0}, "frac_bits must be an integer"),
        ({"bits": 32, "frac_bits": 8, "clip_range": 0.0}, "clip_range must be a finite number > 0"),
        ({"bits": 32, "frac_bits": 8, "clip_range": math.inf}, "clip_range must be a finite"),
        ({"bits": 32, "frac_bits": 8, "clip_range": math.nan}, "clip_range must be a finite"),
        ({"bits": 32, "frac_bits": 31, "clip_range": 1.0}, "exceeds bits=32"),
        ({"bits": 64, "frac_bits": 62, "clip_range": 2.0}, "exceeds bits=64"),
        ({"bits": 64, "frac_bits": 1000, "clip_range": 1e300}, "overflows float64"),
    ],
)
def test_invalid_codecs_are_refused(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        FixedPointCodec(**kwargs)
    assert fragment in str(info.value)


def test_largest_codec_that_fits() -> None:
    FixedPointCodec(bits=32, frac_bits=30, clip_range=1.0 - 2.0**-30)  # 2**30 - 1 units
    FixedPointCodec(bits=32, frac_bits=0, clip_range=2.0**31 - 1)


# --- encode / decode -----------------------------------------------------------------------------


@st.composite
def codecs(draw: st.DrawFn) -> FixedPointCodec:
    bits = draw(st.sampled_from([32, 64]))
    frac_bits = draw(st.integers(0, bits - 12))
    log_c = draw(st.integers(-8, bits - 3 - frac_bits))
    clip_range = draw(st.floats(2.0 ** (log_c - 1), 2.0**log_c))
    return FixedPointCodec(bits=bits, frac_bits=frac_bits, clip_range=clip_range)


@settings(max_examples=300, deadline=None)
@given(
    codecs(),
    hnp.arrays(
        np.float64,
        st.integers(1, 40),
        elements=st.floats(-2.0, 2.0) | st.floats(-1e250, 1e250),
    ),
    st.floats(1e-6, 1.0),
    st.integers(0, 2**32),
)
def test_round_trip_within_one_unit(
    codec: FixedPointCodec, x: np.ndarray, weight: float, seed: int
) -> None:
    x = x * codec.clip_range  # values inside the range, just outside and far outside
    result = codec.encode(x, weight=weight, rng=np.random.default_rng(seed))
    assert result.values.dtype == codec.dtype and result.values.shape == x.shape
    assert result.clipped == int(np.sum(np.abs(x) > codec.clip_range))
    v = _scaled(codec, x, weight)
    r = codec.decode_int(result.values)
    # r is floor(v) or ceil(v): exact comparisons, no tolerance
    assert np.all((r == np.floor(v)) | (r == np.ceil(v)))
    assert np.all(np.abs(r) <= codec.max_abs_encoded(weight))
    decoded = codec.decode(result.values)
    target = np.clip(x, -codec.clip_range, codec.clip_range) * weight
    assert np.all(np.abs(decoded - target) <= 1.0 / codec.scale * (1 + 2.0**-40))


def test_encode_examples_and_two_complement() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=2, clip_range=8.0)
    x = np.array([0.0, 1.0, -1.0, -0.25, 8.0, -8.0, 100.0, -100.0])
    result = codec.encode(x, rng=np.random.default_rng(0))
    expected = np.array([0, 4, -4, -1, 32, -32, 32, -32])
    np.testing.assert_array_equal(codec.decode_int(result.values), expected)
    np.testing.assert_array_equal(result.values, (expected % 2**32).astype(np.uint32))
    assert result.clipped == 2
    np.testing.assert_array_equal(codec.decode(result.values), expected / 4)


def test_encode_keeps_shape_and_does_not_modify_input() -> None:
    codec = FixedPointCodec(bits=64, frac_bits=20, clip_range=1.0)
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    before = x.copy()
    result = codec.encode(x, weight=0.5, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(x, before)
    assert result.values.shape == (3, 4, 5)
    empty = codec.encode(np.zeros((0, 3)), rng=np.random.default_rng(1))
    assert empty.values.shape == (0, 3) and empty.clipped == 0


def test_encode_float32_and_float16_inputs_count_clipping_exactly() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=10, clip_range=0.99995)
    x16 = np.array([1.0, -1.0, 0.5], dtype=np.float16)  # 1.0 > 0.99995 although fp16(0.99995) == 1
    result = codec.encode(x16, rng=np.random.default_rng(0))
    assert result.clipped == 2
    x32 = np.array([0.1, 2.0], dtype=np.float32)
    r32 = codec.decode_int(codec.encode(x32, rng=ROUND_DOWN).values)
    assert r32[0] == math.floor(float(np.float32(0.1)) * 1024)  # float64 product, not float32


def test_encode_is_reproducible_for_a_seed_and_independent_of_blocking() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=12, clip_range=3.0)
    x = np.random.default_rng(5).normal(size=100_003)
    a = codec.encode(x, weight=0.7, rng=np.random.default_rng(9)).values
    b = codec.encode(x, weight=0.7, rng=np.random.default_rng(9)).values
    np.testing.assert_array_equal(a, b)
    # one generator stream, consumed in order: the same as one whole-array draw
    u = np.random.default_rng(9).random(x.size)
    v = np.clip(x, -3.0, 3.0) * (0.7 * codec.scale)
    expected = np.floor(v) + (u < v - np.floor(v))
    np.testing.assert_array_equal(codec.decode_int(a), expected.astype(np.int64))


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (np.array([1.0, np.nan, np.nan]), "2 NaN and 0 Inf"),
        (np.array([np.inf, 0.0]), "0 NaN and 1 Inf"),
        (np.array(["a"]), "real numpy array"),
        ([1.0, 2.0], "real numpy array"),
    ],
)
def test_encode_refuses_bad_vectors(x: Any, fragment: str) -> None:
    codec = FixedPointCodec(bits=32, frac_bits=8, clip_range=1.0)
    with pytest.raises(InvalidUpdateError) as info:
        codec.encode(x, rng=np.random.default_rng(0))
    assert fragment in str(info.value)


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5, math.nan, math.inf, True])
def test_encode_refuses_bad_weights(weight: Any) -> None:
    codec = FixedPointCodec(bits=32, frac_bits=8, clip_range=1.0)
    with pytest.raises(ConfigError, match=r"weight must be a finite number in \(0, 1\]"):
        codec.encode(np.ones(3), weight=weight, rng=np.random.default_rng(0))


def test_encode_requires_a_generator() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=8, clip_range=1.0)
    with pytest.raises(ConfigError, match=r"rng must be a numpy\.random\.Generator"):
        codec.encode(np.ones(3), rng=np.random.RandomState(0))  # type: ignore[arg-type]


def test_decode_int_is_the_centred_lift() -> None:
    for bits in (32, 64):
        codec = FixedPointCodec(bits=bits, frac_bits=0, clip_range=1.0)
        half = 2 ** (bits - 1)
        values = np.array([0, 1, half - 1, half, 2**bits - 1], dtype=codec.dtype)
        np.testing.assert_array_equal(codec.decode_int(values), [0, 1, half - 1, -half, -1])
        assert codec.decode_int(values).dtype == np.int64


def test_decode_refuses_other_dtypes() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=8, clip_range=1.0)
    with pytest.raises(InvalidUpdateError, match="dtype uint32 for bits=32, got int64"):
        codec.decode(np.array([1, 2], dtype=np.int64))
    with pytest.raises(InvalidUpdateError, match="dtype uint32"):
        codec.decode_int(np.array([1, 2], dtype=np.uint64))


# --- unbiasedness --------------------------------------------------------------------------------

DRAWS = 400_000


def _rounding_z_scores(rounder: Callable[[np.ndarray], np.ndarray], v: float) -> float:
    """z-score of the mean rounding error of DRAWS independent roundings of v.

    Under unbiased stochastic rounding of a value with fractional part f, the error has mean 0
    and standard deviation sqrt(f (1 - f)) / sqrt(DRAWS), so |z| < 6 except with probability
    ~2e-9. A rounder biased by b units has |z| ~ b * sqrt(DRAWS) / sqrt(f (1 - f)): for the
    fractional parts used here (>= 0.1 away from 0 and 1), b >= 0.05 gives |z| > 100.
    """
    r = rounder(np.full(DRAWS, v))
    f = v - math.floor(v)
    err = float(np.mean(r - math.floor(v))) - f  # exact: integers minus an integer
    return err / math.sqrt(f * (1 - f) / DRAWS)


UNBIASED_CASES = [
    (bits, k + f)
    for bits, magnitudes in ((32, (0, -3, 12345, -(2**28))), (64, (0, -(2**40), 2**44)))
    for k in magnitudes
    for f in (0.1, 0.25, 0.5, 0.75, 0.9)
]


@pytest.mark.parametrize(("bits", "v"), UNBIASED_CASES)
def test_stochastic_rounding_is_unbiased(bits: int, v: float) -> None:
    codec = FixedPointCodec(bits=bits, frac_bits=0, clip_range=2.0 ** (bits - 2))
    rng = np.random.default_rng(abs(int(v * 4)) + bits)

    def rounder(values: np.ndarray) -> np.ndarray:
        return codec.decode_int(codec.encode(values, rng=rng).values)

    assert abs(_rounding_z_scores(rounder, v)) < 6


@pytest.mark.parametrize(
    "biased",
    [
        lambda a: np.floor(a + 0.5),  # round half up
        np.round,  # round half to even
        np.floor,
        lambda a: np.floor(a + np.random.default_rng(0).random(a.shape, dtype=np.float32) * 0.9),
    ],
)
def test_the_unbiasedness_criterion_rejects_biased_rounders(biased: Any) -> None:
    assert max(abs(_rounding_z_scores(biased, v)) for v in (3.25, 3.5, 3.75)) > 50


def test_expectation_of_weighted_encoding_matches_weighted_value() -> None:
    codec = FixedPointCodec(bits=32, frac_bits=3, clip_range=4.0)
    x = 1.2345
    weight = 0.37
    v = x * (weight * codec.scale)
    rng = np.random.default_rng(17)
    r = codec.decode_int(codec.encode(np.full(DRAWS, x), weight=weight, rng=rng).values)
    f = v - math.floor(v)
    z = (float(np.mean(r)) - v) / math.sqrt(f * (1 - f) / DRAWS)
    assert abs(z) < 6
    assert set(np.unique(r).tolist()) == {math.floor(v), math.floor(v) + 1}


# --- modular sums --------------------------------------------------------------------------------


@st.composite
def rounds(draw: st.DrawFn) -> tuple[Any, ...]:
    num_sites = draw(st.integers(1, 8))
    weights = draw(
        st.none() | st.lists(st.floats(1e-3, 1e6), min_size=num_sites, max_size=num_sites)
    )
    clip_range = draw(st.floats(1e-3, 1e4))
    precision = clip_range * 2.0 ** -draw(st.integers(0, 60))
    bits = draw(st.sampled_from([None, 32, 64]))
    length = draw(st.integers(1, 12))
    xs = [
        draw(hnp.arrays(np.float64, length, elements=st.floats(-2 * clip_range, 2 * clip_range)))
        for _ in range(num_sites)
    ]
    seed = draw(st.integers(0, 2**32))
    return num_sites, weights, clip_range, precision, bits, xs, seed


def _modular_sum(values: list[np.ndarray], dtype: Any) -> np.ndarray:
    total = np.zeros_like(values[0], dtype=dtype)
    for v in values:
        total += v  # wraps modulo 2**bits
    return total


@settings(max_examples=200, deadline=None)
@given(rounds())
def test_masked_modular_sum_decodes_to_weighted_sum(params: tuple[Any, ...]) -> None:
    num_sites, weights, clip_range, precision, bits, xs, seed = params
    try:
        plan = plan_bit_width(
            num_sites=num_sites,
            weights=weights,
            clip_range=clip_range,
            precision=precision,
            bits=bits,
        )
    except ConfigError:
        event("refused")
        return  # refusals are tested in test_planning.py
    event(f"planned bits={plan.bits}")
    codec = plan.codec()
    rng = np.random.default_rng(seed)
    encoded = [
        codec.encode(x, weight=w, rng=rng).values for x, w in zip(xs, plan.weights, strict=True)
    ]
    # pairwise masks that cancel in the sum: site i adds m_ij, site j subtracts it
    masked = [e.copy() for e in encoded]
    for i in range(num_sites):
        for j in range(i + 1, num_sites):
            mask = rng.integers(0, codec.modulus, size=xs[0].shape, dtype=codec.dtype)
            masked[i] += mask
            masked[j] -= mask
    total = _modular_sum(masked, codec.dtype)
    np.testing.assert_array_equal(total, _modular_sum(encoded, codec.dtype))
    exact = [sum(int(codec.decode_int(e)[k]) for e in encoded) for k in range(xs[0].size)]
    np.testing.assert_array_equal(codec.decode_int(total), exact)  # no wrap
    # against the exact weighted sum of the float64 products the sites encoded
    for k in range(xs[0].size):
        v = sum(
            Fraction(float(_scaled(codec, x[k : k + 1], w)[0]))
            for x, w in zip(xs, plan.weights, strict=True)
        )
        assert abs(exact[k] - v) < num_sites
    decoded = codec.decode(total)
    target = sum(
        np.clip(x, -clip_range, clip_range) * w for x, w in zip(xs, plan.weights, strict=True)
    )
    mean_error = np.abs(decoded - target) / sum(plan.weights)
    slack = 1e-12 * clip_range
    assert np.all(mean_error <= plan.mean_error_bound(sum(plan.weights), num_sites) + slack)
