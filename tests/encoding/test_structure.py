"""flatten / unflatten / check_same_spec."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl.encoding import UpdateSpec, check_same_spec, flatten, unflatten
from secure_fl.errors import InvalidUpdateError

FLOAT_DTYPES = [np.float16, np.float32, np.float64]
WIDTHS: dict[Any, Literal[16, 32, 64]] = {np.float16: 16, np.float32: 32, np.float64: 64}


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    return draw(hnp.arrays(dtype, shape, elements=st.floats(-1e4, 1e4, width=WIDTHS[dtype])))


@st.composite
def numpy_updates(draw: st.DrawFn) -> Any:
    arrays = draw(st.lists(numpy_arrays(), min_size=1, max_size=5))
    kind = draw(st.sampled_from(["list", "tuple", "dict", "ordered"]))
    if kind == "list":
        return arrays
    if kind == "tuple":
        return tuple(arrays)
    names = [f"layer{i}.weight" for i in range(len(arrays))]
    pairs = list(zip(names, arrays, strict=True))
    return dict(pairs) if kind == "dict" else OrderedDict(pairs)


def _values(update: Any) -> list[Any]:
    return list(update.values()) if isinstance(update, dict) else list(update)


def _assert_same_update(original: Any, rebuilt: Any) -> None:
    if isinstance(original, dict):
        assert isinstance(rebuilt, dict)
        assert list(rebuilt) == list(original)
    else:
        assert type(rebuilt) is type(original)
    for a, b in zip(_values(original), _values(rebuilt), strict=True):
        assert type(b) is type(a) or (isinstance(a, torch.Tensor) and type(b) is torch.Tensor)
        assert tuple(b.shape) == tuple(a.shape)
        assert b.dtype == a.dtype
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.detach(), b)
        else:
            np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(numpy_updates())
def test_numpy_round_trip_is_exact(update: Any) -> None:
    vector, spec = flatten(update)
    assert vector.dtype == np.float64 and vector.ndim == 1 and vector.flags.c_contiguous
    assert vector.shape[0] == spec.size == sum(a.size for a in _values(update))
    expected = (
        np.concatenate([a.astype(np.float64).ravel() for a in _values(update)])
        if spec.size
        else np.empty(0)
    )
    np.testing.assert_array_equal(vector, expected)
    _assert_same_update(update, unflatten(vector, spec))


def test_flatten_does_not_alias_inputs_and_unflatten_copies() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    vector, spec = flatten([a])
    vector[0] = 99.0
    assert a[0, 0] == 0.0
    rebuilt_list = unflatten(vector, spec)
    assert isinstance(rebuilt_list, list)
    (rebuilt,) = rebuilt_list
    vector[1] = -5.0
    assert rebuilt[0, 1] == 1.0 and rebuilt[0, 0] == 99.0


def test_non_contiguous_and_zero_size_arrays() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    update = {"t": base.T, "empty": np.zeros((0, 5), np.float32), "scalar": np.array(2.5)}
    vector, spec = flatten(update)
    np.testing.assert_array_equal(vector[:12], base.T.ravel())
    assert spec.shapes == ((4, 3), (0, 5), ())
    assert spec.keys == ("t", "empty", "scalar")
    _assert_same_update(update, unflatten(vector, spec))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Linear(3, 2)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_state_dict_round_trip(dtype: torch.dtype) -> None:
    state = _model().to(dtype).state_dict()
    floats = OrderedDict((k, v) for k, v in state.items() if v.is_floating_point())
    vector, spec = flatten(floats, site="h1")
    assert spec.framework == "torch" and spec.kind == "mapping"
    assert spec.dtypes[0] == str(dtype).removeprefix("torch.")
    rebuilt = unflatten(vector, spec)
    assert isinstance(rebuilt, dict)
    _assert_same_update(floats, rebuilt)
    model = _model().to(dtype)
    model.load_state_dict({**state, **rebuilt})  # usable as a state dict


def test_torch_list_of_parameters_round_trip() -> None:
    params = [p for p in _model().parameters()]
    vector, spec = flatten(params)
    assert spec.kind == "list" and spec.framework == "torch"
    rebuilt = unflatten(vector, spec)
    assert isinstance(rebuilt, list)
    assert all(not t.requires_grad for t in rebuilt)
    _assert_same_update(params, rebuilt)


def test_torch_integer_buffer_is_refused_with_hint() -> None:
    state = _model().state_dict()
    with pytest.raises(InvalidUpdateError) as info:
        flatten(state, site="hospital-7")
    message = str(info.value)
    assert "hospital-7" in message and "1.num_batches_tracked" in message
    assert "int64" in message and "exclude" in message


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (np.array([1.0, np.nan, np.nan]), "2 NaN and 0 Inf"),
        (np.array([np.inf, 1.0, -np.inf]), "0 NaN and 2 Inf"),
        (np.array([np.inf, np.nan], dtype=np.float16), "1 NaN and 1 Inf"),
    ],
)
def test_non_finite_values_are_refused_with_counts(bad: np.ndarray, fragment: str) -> None:
    update = {"ok": np.ones(3), "bad.key": bad}
    with pytest.raises(InvalidUpdateError) as info:
        flatten(update, site="s3")
    message = str(info.value)
    assert "s3" in message and "'bad.key'" in message and fragment in message
    assert "'ok'" not in message


def test_non_finite_torch_values_are_refused() -> None:
    update = {"w": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("inf")])}
    with pytest.raises(InvalidUpdateError, match=r"site 'x'.*'w' has 1 NaN.*'b' has 0 NaN and 1"):
        flatten(update, site="x")


def test_huge_but_finite_values_are_accepted() -> None:
    vector, _ = flatten([np.array([1e308, 1e308, -1e308])])
    assert np.isfinite(vector).all()


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ([], "empty"),
        ({}, "empty"),
        ([np.array([1, 2, 3])], "dtype int64"),
        ([np.array([True])], "dtype bool"),
        ([np.array([1j])], "dtype complex128"),
        ([[1.0, 2.0]], "entry 0 is a list"),
        ({"a": 1.5}, "entry 'a' is a float"),
        ([np.ones(2), torch.ones(2)], "mixes numpy arrays and torch tensors"),
        ({1: np.ones(2)}, "keys must be strings"),
        (np.ones(3), "must be a list, a tuple or a mapping"),
    ],
)
def test_malformed_updates_are_refused(update: Any, fragment: str) -> None:
    with pytest.raises(InvalidUpdateError) as info:
        flatten(update, site="site-9")
    assert fragment in str(info.value)
    assert "site-9" in str(info.value)


def test_unflatten_validates_vector() -> None:
    vector, spec = flatten({"a": np.ones((2, 2), np.float32)})
    with pytest.raises(InvalidUpdateError, match="length 3 but the spec needs exactly 4"):
        unflatten(vector[:3], spec)
    with pytest.raises(InvalidUpdateError, match="1-D"):
        unflatten(vector.reshape(2, 2), spec)
    with pytest.raises(InvalidUpdateError, match="NaN"):
        unflatten(np.array([1.0, np.nan, 0.0, 0.0]), spec)
    with pytest.raises(InvalidUpdateError, match="overflows float32"):
        unflatten(np.array([1.0, 1e39, 0.0, 0.0]), spec)
    _, spec16 = flatten([torch.ones(2, dtype=torch.float16)])
    with pytest.raises(InvalidUpdateError, match="overflows float16"):
        unflatten(np.array([1.0, 7e4]), spec16)


def test_unflatten_accepts_read_only_and_float32_vectors() -> None:
    update = {"a": torch.ones(3, dtype=torch.float64)}
    vector, spec = flatten(update)
    vector.flags.writeable = False
    rebuilt = unflatten(vector, spec)
    assert isinstance(rebuilt, dict)
    rebuilt["a"] += 1  # a writable copy: does not touch the read-only vector
    assert vector[0] == 1.0
    rebuilt32 = unflatten(vector.astype(np.float32), spec)
    assert isinstance(rebuilt32, dict) and rebuilt32["a"].dtype == torch.float64


def _spec(**changes: Any) -> UpdateSpec:
    fields: dict[str, Any] = {
        "kind": "mapping",
        "keys": ("a", "b"),
        "shapes": ((2, 3), (4,)),
        "dtypes": ("float32", "float32"),
        "framework": "torch",
        "size": 10,
    }
    fields.update(changes)
    return UpdateSpec(**fields)


def test_check_same_spec_accepts_equal_specs_on_other_devices() -> None:
    reference = _spec(devices=("cpu", "cpu"))
    other = _spec(devices=("cuda:0", "cuda:0"))
    assert reference == other
    check_same_spec(reference, other, site="s1")


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        (_spec(framework="numpy"), "uses numpy but the reference uses torch"),
        (_spec(kind="list", keys=(0, 1)), "is a list but the reference is a mapping"),
        (_spec(keys=("a", "c")), "entry #1 is named 'c' but the reference has 'b'"),
        (_spec(shapes=((3, 2), (4,))), "entry 'a' has shape (3, 2) but the reference has (2, 3)"),
        (_spec(dtypes=("float32", "float64")), "entry 'b' has dtype float64 but the reference"),
        (
            _spec(keys=("a",), shapes=((2, 3),), dtypes=("float32",), size=6),
            "1 entries but the reference has 2 (first missing entry: 'b')",
        ),
        (
            _spec(
                keys=("a", "b", "z"),
                shapes=((2, 3), (4,), ()),
                dtypes=("float32",) * 3,
                size=11,
            ),
            "first unexpected entry: 'z'",
        ),
    ],
)
def test_check_same_spec_names_site_and_first_difference(other: UpdateSpec, fragment: str) -> None:
    with pytest.raises(InvalidUpdateError) as info:
        check_same_spec(_spec(), other, site="clinic-4")
    assert "clinic-4" in str(info.value)
    assert fragment in str(info.value)


def test_real_updates_with_different_dtypes_are_mismatched() -> None:
    _, ref = flatten({"w": np.zeros(3, np.float32)})
    _, other = flatten({"w": np.zeros(3, np.float64)})
    with pytest.raises(InvalidUpdateError, match=r"site 'b'.*dtype float64"):
        check_same_spec(ref, other, site="b")


def test_update_spec_validates_itself() -> None:
    with pytest.raises(InvalidUpdateError, match="size"):
        _spec(size=11)
    with pytest.raises(InvalidUpdateError, match="same length"):
        _spec(dtypes=("float32",))
    with pytest.raises(InvalidUpdateError, match="kind"):
        _spec(kind="set")


def test_torch_is_not_imported_by_the_encoding_package() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import secure_fl.encoding as e\n"
        "v, s = e.flatten({'a': np.ones(2)})\n"
        "e.unflatten(v, s)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
