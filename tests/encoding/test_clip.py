"""l2_clip / clip_update."""

from __future__ import annotations

import math
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl.encoding import ClipResult, clip_update, flatten, l2_clip
from secure_fl.errors import ConfigError, InvalidUpdateError

vectors = hnp.arrays(
    np.float64,
    st.integers(1, 64),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False),
)
clip_norms = st.floats(1e-3, 1e5)


def _norm(x: Any) -> float:
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64).ravel()))


@settings(max_examples=300, deadline=None)
@given(vectors, clip_norms)
def test_l2_clip_bounds_norm_and_preserves_direction(x: np.ndarray, clip_norm: float) -> None:
    before = x.copy()
    out, report = l2_clip(x, clip_norm)
    np.testing.assert_array_equal(x, before)  # never in place
    assert out is not x and out.dtype == np.float64
    norm = _norm(x)
    assert report.norm == pytest.approx(norm, rel=1e-12)
    assert report.clip_norm == clip_norm
    assert _norm(out) <= clip_norm  # exactly, not "up to rounding"
    if norm <= clip_norm:
        assert not report.clipped and report.factor == 1.0
        np.testing.assert_array_equal(out, x)
    else:
        assert report.clipped
        assert 0 < report.factor < 1
        assert report.factor == pytest.approx(clip_norm / norm, rel=1e-12)
        np.testing.assert_array_equal(out, x * report.factor)  # same direction
        assert _norm(out) == pytest.approx(clip_norm, rel=1e-12)


def test_l2_clip_exact_cases() -> None:
    out, report = l2_clip(np.array([3.0, 4.0]), 1.0)
    np.testing.assert_allclose(out, [0.6, 0.8])
    assert report == ClipResult(norm=5.0, clip_norm=1.0, factor=0.2, clipped=True)
    out, report = l2_clip(np.array([3.0, 4.0]), 5.0)
    assert not report.clipped and report.factor == 1.0
    np.testing.assert_array_equal(out, [3.0, 4.0])
    out, report = l2_clip(np.zeros(4), 1.0)
    assert report.norm == 0.0 and not report.clipped
    out, report = l2_clip(np.array([], dtype=np.float64), 1.0)
    assert out.size == 0 and report.norm == 0.0


def test_l2_clip_huge_values_do_not_overflow_the_norm() -> None:
    x = np.array([1e200, -1e200, 1e200])
    out, report = l2_clip(x, 2.0)
    assert report.norm == pytest.approx(math.sqrt(3) * 1e200)
    assert _norm(out) <= 2.0
    assert _norm(out) == pytest.approx(2.0)


def test_l2_clip_accepts_float32_and_returns_float64() -> None:
    x = np.array([30.0, 40.0], dtype=np.float32)
    out, _ = l2_clip(x, 10.0)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [6.0, 8.0])


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_l2_clip_rejects_bad_clip_norm(clip_norm: Any) -> None:
    with pytest.raises(ConfigError, match="clip_norm must be a finite number > 0"):
        l2_clip(np.ones(3), clip_norm)


def test_l2_clip_rejects_non_finite_vectors() -> None:
    with pytest.raises(InvalidUpdateError, match="1 NaN/Inf"):
        l2_clip(np.array([1.0, math.nan]), 1.0)
    with pytest.raises(InvalidUpdateError):
        l2_clip(np.array(["a"]), 1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([np.float16, np.float32, np.float64]),
    st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=1, max_size=20),
    st.floats(1e-2, 1e3),
)
def test_clip_update_bounds_the_stored_norm(dtype: Any, values: list[float], clip: float) -> None:
    update = {"a": np.array(values, dtype=dtype), "b": np.array([values[0]], dtype=dtype)}
    clipped, report = clip_update(update, clip, site="s")
    assert isinstance(clipped, dict)
    assert list(clipped) == ["a", "b"]
    assert all(clipped[k].dtype == dtype and clipped[k].shape == update[k].shape for k in update)
    assert _norm(flatten(clipped)[0]) <= clip  # as stored in the narrow dtype
    assert report.norm == pytest.approx(_norm(flatten(update)[0]))
    assert report.clipped == (report.norm > clip)


def test_clip_update_torch_float32() -> None:
    torch.manual_seed(1)
    update = {"w": torch.randn(50, 40) * 10, "b": torch.randn(40)}
    original = {k: v.clone() for k, v in update.items()}
    clipped, report = clip_update(update, 1.0)
    assert isinstance(clipped, dict)
    assert report.clipped and report.norm > 1.0
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in clipped.values())
    assert _norm(flatten(clipped)[0]) <= 1.0
    assert all(torch.equal(update[k], original[k]) for k in update)  # input untouched
    torch.testing.assert_close(clipped["w"], update["w"] * report.factor)


def test_clip_update_names_site_on_malformed_update() -> None:
    with pytest.raises(InvalidUpdateError, match="site 'h2'"):
        clip_update([np.array([1, 2])], 1.0, site="h2")
    with pytest.raises(ConfigError, match="clip_norm"):
        clip_update([np.ones(2)], -1.0)
