"""plan_bit_width: plans never wrap, and refusals are necessary and explained."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from secure_fl.encoding import BitPlan, FixedPointCodec, plan_bit_width
from secure_fl.errors import ConfigError


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


def _worst_case_sums(
    codec: FixedPointCodec, weights: tuple[float, ...], clip_range: float
) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
    """Encode the adversarial inputs at every site with worst-case rounding.

    Coordinates: +clip_range, far above it (clipped), just below it. The positive ones are
    rounded up at every site, the negated inputs rounded down: the largest possible magnitudes.
    Returns the exact integer sums (Python ints, from each site's own encoding) and the modular
    sums of the encodings.
    """
    x = np.array([clip_range, 4.0 * clip_range, math.nextafter(clip_range, 0.0)])
    up = [codec.encode(x, weight=w, rng=ROUND_UP) for w in weights]
    down = [codec.encode(-x, weight=w, rng=ROUND_DOWN) for w in weights]
    assert all(e.clipped == 1 for e in up + down)
    exact_up = [sum(int(codec.decode_int(e.values)[k]) for e in up) for k in range(3)]
    exact_down = [sum(int(codec.decode_int(e.values)[k]) for e in down) for k in range(3)]
    mod_up = np.sum([e.values for e in up], axis=0, dtype=codec.dtype)
    mod_down = np.sum([e.values for e in down], axis=0, dtype=codec.dtype)
    return exact_up, exact_down, mod_up, mod_down


def _assert_never_wraps(plan: BitPlan) -> None:
    codec = plan.codec()
    exact_up, exact_down, mod_up, mod_down = _worst_case_sums(codec, plan.weights, plan.clip_range)
    # the worst case reaches the planned bound exactly (the bound is tight) ...
    assert exact_up[0] == plan.max_abs_sum == -exact_down[0]
    assert max(map(abs, exact_up + exact_down)) <= plan.max_abs_sum <= codec.max_int
    # ... and the modular sums decode to the exact sums: no wrap
    np.testing.assert_array_equal(codec.decode_int(mod_up), exact_up)
    np.testing.assert_array_equal(codec.decode_int(mod_down), exact_down)
    # every subset of survivors also decodes (prefix subsets)
    for m in range(1, plan.num_sites):
        partial = plan_codec_sum(codec, plan.weights[:m], plan.clip_range)
        assert abs(int(codec.decode_int(partial)[0])) <= plan.max_abs_sum


def plan_codec_sum(codec: FixedPointCodec, weights: tuple[float, ...], c: float) -> np.ndarray:
    x = np.array([c])
    encoded = [codec.encode(x, weight=w, rng=ROUND_UP).values for w in weights]
    return np.asarray(np.sum(encoded, axis=0, dtype=codec.dtype))


@st.composite
def weight_lists(draw: st.DrawFn, num_sites: int) -> Sequence[float] | None:
    return draw(
        st.none()
        | st.lists(st.floats(1e-3, 1e9), min_size=num_sites, max_size=num_sites)
        | st.lists(st.integers(1, 10**6), min_size=num_sites, max_size=num_sites)
    )


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_plans_never_wrap_on_adversarial_inputs(data: st.DataObject) -> None:
    num_sites = data.draw(st.integers(1, 16), label="num_sites")
    weights = data.draw(weight_lists(num_sites), label="weights")
    clip_range = data.draw(st.floats(1e-6, 1e12), label="clip_range")
    precision = clip_range * data.draw(st.floats(2.0**-70, 1.0), label="precision / clip_range")
    bits = data.draw(st.sampled_from([None, 32, 64]), label="bits")
    try:
        plan = plan_bit_width(
            num_sites=num_sites,
            weights=weights,
            clip_range=clip_range,
            precision=precision,
            bits=bits,
        )
    except ConfigError as error:
        event("refused")
        assert "needs" in str(error)
        return
    event(f"bits={plan.bits}")
    assert plan.resolution <= precision
    assert plan.resolution == 2.0**-plan.frac_bits
    if precision <= 1:
        assert 2 * plan.resolution > precision  # the coarsest step that meets the precision
    assert plan.bits_needed <= plan.bits and plan.headroom_bits >= 0
    assert math.isclose(math.fsum(plan.weights), 1.0, rel_tol=1e-12)
    _assert_never_wraps(plan)


@st.composite
def boundary_configs(draw: st.DrawFn) -> tuple[int, Sequence[float] | None, float, float, int]:
    """Configurations whose worst case lies within a few units of 2**(bits-1) - 1."""
    bits = draw(st.sampled_from([32, 64]))
    num_sites = draw(st.integers(1, 12))
    weights = draw(weight_lists(num_sites))
    frac_bits = draw(st.integers(0, bits - 8))
    delta = draw(st.integers(-2 * num_sites - 3, 3))
    limit = 2 ** (bits - 1) - 1
    clip_range = float(limit - num_sites + delta) / 2.0**frac_bits
    return num_sites, weights, clip_range, 2.0**-frac_bits, bits


@settings(max_examples=250, deadline=None)
@given(boundary_configs())
def test_refusals_at_the_boundary_are_necessary(config: tuple[Any, ...]) -> None:
    """At the edge of the range: an accepted plan never wraps, and a refused one really would."""
    num_sites, weights, clip_range, precision, bits = config
    try:
        plan = plan_bit_width(
            num_sites=num_sites,
            weights=weights,
            clip_range=clip_range,
            precision=precision,
            bits=bits,
        )
    except ConfigError as error:
        event("refused")
        needed = int(re.search(r"needs (\d+) bits", str(error)).group(1))  # type: ignore[union-attr]
        assert needed == bits + 1
        frac_bits = -math.frexp(precision)[1] + 1
        try:
            codec = FixedPointCodec(bits=bits, frac_bits=frac_bits, clip_range=clip_range)
        except ConfigError:
            return  # even one full-weight encoding would not fit
        raw = [Fraction(w) for w in weights] if weights is not None else [Fraction(1)] * num_sites
        normalised = tuple(float(w / sum(raw)) for w in raw)
        exact_up, _, _, _ = _worst_case_sums(codec, normalised, clip_range)
        assert exact_up[0] > codec.max_int  # this input would wrap
        return
    event("accepted")
    assert plan.bits == bits
    _assert_never_wraps(plan)


@pytest.mark.parametrize(
    ("precision", "frac_bits"),
    [(1.0, 0), (0.5, 1), (0.3, 2), (0.25, 2), (2.0**-20, 20), (1e-6, 20), (3.0, 0), (2.0**-60, 60)],
)
def test_frac_bits_from_precision(precision: float, frac_bits: int) -> None:
    plan = plan_bit_width(num_sites=2, weights=None, clip_range=4.0, precision=precision, bits=64)
    assert plan.frac_bits == frac_bits
    assert plan.resolution == 2.0**-frac_bits


def test_32_bits_chosen_when_they_fit_else_64() -> None:
    small = plan_bit_width(num_sites=10, weights=None, clip_range=1.0, precision=2.0**-20)
    assert small.bits == 32 and small.bits_needed == 22 and small.headroom_bits == 10
    large = plan_bit_width(num_sites=10, weights=None, clip_range=1.0, precision=2.0**-40)
    assert large.bits == 64 and large.bits_needed == 42
    assert plan_bit_width(num_sites=10, weights=None, clip_range=1.0, precision=2.0**-20, bits=64)


def test_bound_for_equal_and_unequal_weights() -> None:
    plan = plan_bit_width(num_sites=4, weights=None, clip_range=1.0, precision=2.0**-10)
    assert plan.weights == (0.25,) * 4
    assert plan.max_abs_sum == 1024  # exact products: no rounding term
    plan3 = plan_bit_width(num_sites=3, weights=[1, 1, 1], clip_range=1.0, precision=2.0**-10)
    assert plan3.max_abs_sum == 3 * math.ceil(1024 / 3)
    skewed = plan_bit_width(num_sites=3, weights=[100, 200, 700], clip_range=2.0, precision=0.01)
    assert skewed.weights == pytest.approx((0.1, 0.2, 0.7))
    assert skewed.max_abs_sum <= 2.0 * 128 + 3
    assert skewed.codec() == FixedPointCodec(bits=32, frac_bits=7, clip_range=2.0)


def test_boundary_just_fits_and_just_misses() -> None:
    # one site at full weight with integer products: the bound is clip_range * scale exactly
    ok = plan_bit_width(num_sites=1, weights=None, clip_range=2.0**31 - 1, precision=1.0)
    assert ok.bits == 32 and ok.max_abs_sum == 2**31 - 1 and ok.headroom_bits == 0
    up = plan_bit_width(num_sites=1, weights=None, clip_range=2.0**31, precision=1.0)
    assert up.bits == 64 and up.bits_needed == 33
    # two sites at half weight, products not integers: each site may round up once
    with pytest.raises(ConfigError, match="needs 33 bits; bits=32 was requested"):
        plan_bit_width(num_sites=2, weights=None, clip_range=2.0**31 - 1.5, precision=1.0, bits=32)


def test_refusal_message_names_fields_and_gives_fixes_that_work() -> None:
    with pytest.raises(ConfigError) as info:
        plan_bit_width(num_sites=10, weights=None, clip_range=100.0, precision=1e-18)
    message = str(info.value)
    for field in ("precision=1e-18", "clip_range=100.0", "num_sites=10", "needs 68 bits"):
        assert field in message
    assert "the maximum is 64" in message
    precision = float(re.search(r"raise precision to >= (\S+)", message).group(1))  # type: ignore[union-attr]
    clip_range = float(re.search(r"lower clip_range to <= (\S+)", message).group(1))  # type: ignore[union-attr]
    assert plan_bit_width(num_sites=10, weights=None, clip_range=100.0, precision=precision)
    assert plan_bit_width(num_sites=10, weights=None, clip_range=clip_range, precision=1e-18)
    with pytest.raises(ConfigError):
        plan_bit_width(num_sites=10, weights=None, clip_range=100.0, precision=precision / 2.01)


def test_refusal_for_bits_32_suggests_64() -> None:
    with pytest.raises(ConfigError) as info:
        plan_bit_width(num_sites=5, weights=None, clip_range=10.0, precision=1e-9, bits=32)
    message = str(info.value)
    assert "bits=32 was requested" in message and "use bits=64" in message
    assert "precision=1e-09" in message and "clip_range=10.0" in message
    assert "num_sites=5 needs 35 bits" in message  # 10 * 2**30 + 5 > 2**33
    precision = float(re.search(r"raise precision to >= (\S+)", message).group(1))  # type: ignore[union-attr]
    clip_range = float(re.search(r"lower clip_range to <= (\S+)", message).group(1))  # type: ignore[union-attr]
    assert plan_bit_width(num_sites=5, weights=None, clip_range=10.0, precision=precision, bits=32)
    assert plan_bit_width(num_sites=5, weights=None, clip_range=clip_range, precision=1e-9, bits=32)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_sites": 0}, "num_sites must be an integer >= 1"),
        ({"num_sites": True}, "num_sites must be an integer >= 1"),
        ({"num_sites": 2.0}, "num_sites must be an integer >= 1"),
        ({"weights": [1.0]}, "weights must have exactly num_sites=3 entries, got 1"),
        ({"weights": [1.0, -1.0, 2.0]}, "weights[1] must be a finite number > 0"),
        ({"weights": [1.0, 0.0, 2.0]}, "weights[1] must be a finite number > 0"),
        ({"weights": [1.0, 1.0, math.nan]}, "weights[2] must be a finite number > 0"),
        ({"weights": [math.inf, 1.0, 1.0]}, "weights[0] must be a finite number > 0"),
        ({"weights": "abc"}, "weights must be a sequence"),
        ({"weights": [1e-300, 1e300, 1.0]}, "underflows to 0"),
        ({"clip_range": 0.0}, "clip_range must be a finite number > 0"),
        ({"clip_range": math.inf}, "clip_range must be a finite number > 0"),
        ({"precision": 0.0}, "precision must be a finite number > 0"),
        ({"precision": math.nan}, "precision must be a finite number > 0"),
        ({"precision": 2.0}, "precision must be in [2**-1023, clip_range=1.0]"),
        ({"precision": 1e-310}, "precision must be in [2**-1023"),
        ({"bits": 16}, "bits must be 32, 64 or None"),
        ({"bits": True}, "bits must be 32, 64 or None"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, Any], fragment: str) -> None:
    arguments: dict[str, Any] = {
        "num_sites": 3,
        "weights": None,
        "clip_range": 1.0,
        "precision": 0.01,
    }
    arguments.update(kwargs)
    with pytest.raises(ConfigError) as info:
        plan_bit_width(**arguments)
    assert fragment in str(info.value)


def test_mean_error_bound() -> None:
    plan = plan_bit_width(num_sites=4, weights=[1, 1, 1, 1], clip_range=1.0, precision=2.0**-10)
    assert plan.mean_error_bound(1.0, 4) == 4 * 2.0**-10
    assert plan.mean_error_bound(0.5, 2) == 2 * 2.0**-10 / 0.5
    bad_arguments: list[tuple[Any, Any]] = [(0.0, 2), (math.nan, 2), (1.0, 0), (1.0, 5), (1.0, 2.0)]
    for bad in bad_arguments:
        with pytest.raises(ConfigError, match="surviv"):
            plan.mean_error_bound(*bad)


def test_mean_error_bound_holds_for_survivor_subsets() -> None:
    plan = plan_bit_width(num_sites=6, weights=[5, 1, 3, 2, 8, 1], clip_range=1.5, precision=1e-3)
    codec = plan.codec()
    rng = np.random.default_rng(3)
    xs = rng.uniform(-2, 2, size=(6, 1000))
    survivors = [0, 2, 3, 5]
    total = np.sum(
        [codec.encode(xs[i], weight=plan.weights[i], rng=rng).values for i in survivors],
        axis=0,
        dtype=codec.dtype,
    )
    weight = sum(plan.weights[i] for i in survivors)
    mean = codec.decode(total) / weight
    exact = sum(np.clip(xs[i], -1.5, 1.5) * plan.weights[i] for i in survivors) / weight
    error = np.abs(mean - exact)
    bound = plan.mean_error_bound(weight, len(survivors))
    assert np.all(error <= bound)
    assert error.max() > bound / 20  # the bound is not vacuous
