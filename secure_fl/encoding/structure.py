"""Flatten a structured model update into one float64 vector, and rebuild it.

A model update is either a list / tuple of arrays, or a mapping ``name -> array`` (a ``dict``, an
``OrderedDict``, a PyTorch ``state_dict``). The arrays are numpy arrays or PyTorch tensors, never
both in one update. Every array must have a floating dtype: integer buffers such as BatchNorm's
``num_batches_tracked`` are refused rather than silently averaged (exclude them before flattening,
for example ``{k: v for k, v in sd.items() if v.is_floating_point()}``, and keep them locally).

torch is never imported at module import time: tensors are recognised by their class hierarchy,
and torch is imported lazily only when an update actually holds tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from secure_fl.errors import InvalidUpdateError

#: A model update: a list or tuple of arrays, or a mapping ``name -> array``. The arrays are
#: ``numpy.ndarray`` or ``torch.Tensor`` with a floating dtype.
Update: TypeAlias = list[Any] | tuple[Any, ...] | Mapping[str, Any]

FloatVector: TypeAlias = npt.NDArray[np.float64]

_KINDS = ("list", "tuple", "mapping")
_FRAMEWORKS = ("numpy", "torch")


@dataclass(frozen=True)
class UpdateSpec:
    """The structure of a model update, without its values.

    ``kind`` is ``"list"``, ``"tuple"`` or ``"mapping"``; ``keys`` are the mapping's names in
    iteration order (or the indices ``0..k-1`` for sequences); ``shapes`` and ``dtypes`` are given
    per key (dtypes as strings such as ``"float32"``, without a ``torch.`` prefix); ``framework``
    is ``"numpy"`` or ``"torch"``; ``size`` is the total element count, i.e. the length of the
    flattened vector.

    Two specs compare equal when the updates have the same structure. ``devices`` (where each
    tensor lived, used by :func:`unflatten` to put tensors back) is deliberately excluded from
    equality: sites training on different hardware still produce compatible updates.

    Errors: InvalidUpdateError if the fields are inconsistent with each other.
    """

    kind: str
    keys: tuple[str | int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    framework: str
    size: int
    devices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidUpdateError(f"UpdateSpec.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.framework not in _FRAMEWORKS:
            raise InvalidUpdateError(
                f"UpdateSpec.framework must be one of {_FRAMEWORKS}, got {self.framework!r}"
            )
        n = len(self.keys)
        if (
            len(self.shapes) != n
            or len(self.dtypes) != n
            or (self.devices and len(self.devices) != n)
        ):
            raise InvalidUpdateError(
                "UpdateSpec.keys, shapes, dtypes and devices must have the same length, got "
                f"{n}, {len(self.shapes)}, {len(self.dtypes)} and {len(self.devices)}"
            )
        total = sum(math.prod(shape) for shape in self.shapes)
        if self.size != total:
            raise InvalidUpdateError(
                f"UpdateSpec.size must equal the total element count {total}, got {self.size}"
            )


def _prefix(site: str | None) -> str:
    return f"site {site!r}: " if site is not None else ""


def _is_torch_tensor(value: object) -> bool:
    """Whether ``value`` is a torch.Tensor (or a subclass such as nn.Parameter), without importing
    torch."""
    return any(
        cls.__name__ == "Tensor" and cls.__module__.split(".")[0] == "torch"
        for cls in type(value).__mro__
    )


def _entries(update: object, site: str | None) -> tuple[str, list[tuple[str | int, Any]]]:
    if isinstance(update, Mapping):
        items: list[tuple[str | int, Any]] = []
        for key, value in update.items():
            if not isinstance(key, str):
                raise InvalidUpdateError(
                    f"{_prefix(site)}update keys must be strings, got {type(key).__name__} {key!r}"
                )
            items.append((key, value))
        return "mapping", items
    if isinstance(update, list | tuple):
        kind = "list" if isinstance(update, list) else "tuple"
        return kind, list(enumerate(update))
    raise InvalidUpdateError(
        f"{_prefix(site)}an update must be a list, a tuple or a mapping of arrays, "
        f"got {type(update).__name__}"
    )


def _non_finite_report(vector: FloatVector, spec: UpdateSpec) -> str | None:
    """Describe the non-finite values of ``vector`` per key; None if all are finite."""
    offset = 0
    parts: list[str] = []
    total = 0
    for key, shape in zip(spec.keys, spec.shapes, strict=True):
        n = math.prod(shape)
        chunk = vector[offset : offset + n]
        offset += n
        nan = int(np.count_nonzero(np.isnan(chunk)))
        inf = int(np.count_nonzero(np.isinf(chunk)))
        if nan or inf:
            total += nan + inf
            parts.append(f"entry {key!r} has {nan} NaN and {inf} Inf")
    if not parts:
        return None
    return f"{'; '.join(parts)} ({total} non-finite values in all)"


def _all_finite(vector: npt.NDArray[Any]) -> bool:
    """Cheap finiteness test: one summation pass, an exact scan only if the sum is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.sum(vector, dtype=np.float64))):
            return True
    return bool(np.isfinite(vector).all())


def flatten(update: Update, *, site: str | None = None) -> tuple[FloatVector, UpdateSpec]:
    """Flatten ``update`` into one new contiguous float64 vector and describe its structure.

    Guarantee: the vector holds every value of every array, in key order and C order within an
    array, converted exactly to float64 (every floating dtype up to float64 converts exactly).
    The caller's arrays are never modified or aliased. Zero-size arrays are allowed.

    Errors: InvalidUpdateError, naming ``site`` (if given) and the offending key, when the update
    is not a list / tuple / mapping with string keys, is empty, holds something that is not a
    numpy array or torch tensor, mixes numpy and torch, holds a non-floating array (integer, bool,
    complex), or holds NaN or Inf values (the message says how many, and in which keys).
    """
    kind, items = _entries(update, site)
    if not items:
        raise InvalidUpdateError(f"{_prefix(site)}the update is empty: it must hold >= 1 array")
    frameworks: set[str] = set()
    keys: list[str | int] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[str] = []
    devices: list[str] = []
    for key, value in items:
        if isinstance(value, np.ndarray):
            frameworks.add("numpy")
            if not np.issubdtype(value.dtype, np.floating):
                raise InvalidUpdateError(
                    f"{_prefix(site)}entry {key!r} has dtype {value.dtype}; only floating "
                    "dtypes (float16, float32, float64) can be aggregated: exclude integer or "
                    "boolean buffers from the update and keep them locally"
                )
            dtypes.append(str(value.dtype))
            devices.append("cpu")
        elif _is_torch_tensor(value):
            frameworks.add("torch")
            if not value.is_floating_point():
                raise InvalidUpdateError(
                    f"{_prefix(site)}entry {key!r} is a tensor of dtype {value.dtype}; only "
                    "floating dtypes can be aggregated: exclude integer buffers such as "
                    "BatchNorm's num_batches_tracked (e.g. keep only entries with "
                    "v.is_floating_point()) and keep them locally"
                )
            dtypes.append(str(value.dtype).removeprefix("torch."))
            devices.append(str(value.device))
        else:
            raise InvalidUpdateError(
                f"{_prefix(site)}entry {key!r} is a {type(value).__name__}; every entry must be "
                "a numpy array or a torch tensor"
            )
        keys.append(key)
        shapes.append(tuple(int(d) for d in value.shape))
    if len(frameworks) > 1:
        raise InvalidUpdateError(
            f"{_prefix(site)}the update mixes numpy arrays and torch tensors; use one framework"
        )
    spec = UpdateSpec(
        kind=kind,
        keys=tuple(keys),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        framework=frameworks.pop(),
        size=sum(math.prod(shape) for shape in shapes),
        devices=tuple(devices),
    )
    vector = np.empty(spec.size, dtype=np.float64)
    if spec.framework == "torch":
        import torch

        offset = 0
        for (_, value), shape in zip(items, spec.shapes, strict=True):
            n = math.prod(shape)
            torch.from_numpy(vector[offset : offset + n]).view(shape).copy_(value.detach())
            offset += n
    else:
        offset = 0
        for (_, value), shape in zip(items, spec.shapes, strict=True):
            n = math.prod(shape)
            vector[offset : offset + n].reshape(shape)[...] = value
            offset += n
    if not _all_finite(vector):
        report = _non_finite_report(vector, spec)
        if report is not None:
            raise InvalidUpdateError(f"{_prefix(site)}the update holds non-finite values: {report}")
    return vector, spec


def unflatten(vector: npt.NDArray[Any], spec: UpdateSpec) -> Update:
    """Rebuild an update of structure ``spec`` from ``vector`` (as produced by :func:`flatten`).

    Guarantee: the result has the same container kind (a list, a tuple, or a ``dict`` in key order
    for mappings), the same keys, shapes and dtypes, and the same framework (torch tensors are put
    back on their original device, detached). Every array is a new copy: nothing aliases
    ``vector``. Values are rounded to nearest when the dtype is narrower than float64.

    Errors: InvalidUpdateError if ``vector`` is not a 1-D real array of length ``spec.size``, holds
    NaN or Inf, or holds a value that overflows the target dtype (e.g. > 65504 for float16).
    """
    if not isinstance(vector, np.ndarray):
        raise InvalidUpdateError(f"vector must be a numpy array, got {type(vector).__name__}")
    if vector.ndim != 1:
        raise InvalidUpdateError(f"vector must be 1-D, got shape {vector.shape}")
    if not (np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)):
        raise InvalidUpdateError(f"vector must have a real dtype, got {vector.dtype}")
    if vector.shape[0] != spec.size:
        raise InvalidUpdateError(
            f"vector has length {vector.shape[0]} but the spec needs exactly {spec.size}"
        )
    vec = np.ascontiguousarray(vector, dtype=np.float64)
    if not _all_finite(vec):
        raise InvalidUpdateError(f"vector holds non-finite values: {_non_finite_report(vec, spec)}")
    arrays: list[Any] = []
    offset = 0
    if spec.framework == "torch":
        import torch

        if not vec.flags.writeable:
            vec = vec.copy()  # torch.from_numpy warns on read-only memory; we never write to it
        devices = spec.devices or ("cpu",) * len(spec.keys)
        for key, shape, dtype, device in zip(
            spec.keys, spec.shapes, spec.dtypes, devices, strict=True
        ):
            n = math.prod(shape)
            target = getattr(torch, dtype, None)
            if not isinstance(target, torch.dtype) or not target.is_floating_point:
                raise InvalidUpdateError(f"entry {key!r}: unknown torch floating dtype {dtype!r}")
            tensor = torch.empty(shape, dtype=target, device=device)
            tensor.copy_(torch.from_numpy(vec[offset : offset + n]).view(shape))
            offset += n
            if target != torch.float64 and n and not bool(torch.isfinite(tensor).all()):
                raise InvalidUpdateError(
                    f"entry {key!r}: a value overflows {dtype} (largest finite value "
                    f"{torch.finfo(target).max})"
                )
            arrays.append(tensor)
    else:
        for key, shape, dtype in zip(spec.keys, spec.shapes, spec.dtypes, strict=True):
            n = math.prod(shape)
            target_np = np.dtype(dtype)
            if not np.issubdtype(target_np, np.floating):
                raise InvalidUpdateError(f"entry {key!r}: dtype {dtype!r} is not floating")
            with np.errstate(over="ignore"):
                array = vec[offset : offset + n].astype(target_np).reshape(shape)
            offset += n
            if target_np.itemsize < 8 and n and not _all_finite(array):
                raise InvalidUpdateError(
                    f"entry {key!r}: a value overflows {dtype} (largest finite value "
                    f"{np.finfo(target_np).max})"
                )
            arrays.append(array)
    if spec.kind == "mapping":
        return {str(key): array for key, array in zip(spec.keys, arrays, strict=True)}
    if spec.kind == "tuple":
        return tuple(arrays)
    return arrays


def check_same_spec(reference: UpdateSpec, other: UpdateSpec, *, site: str) -> None:
    """Check that ``other`` (the update of ``site``) has exactly the structure of ``reference``.

    Guarantee: returns only if container kind, framework, keys, shapes and dtypes all agree
    (device placement is ignored). Mismatched dtypes between sites are an error.

    Errors: InvalidUpdateError naming ``site`` and the first difference (and the expected value).
    """
    p = _prefix(site)
    if other.framework != reference.framework:
        raise InvalidUpdateError(
            f"{p}update uses {other.framework} but the reference uses {reference.framework}"
        )
    if other.kind != reference.kind:
        raise InvalidUpdateError(
            f"{p}update is a {other.kind} but the reference is a {reference.kind}"
        )
    for index, (ref_key, key) in enumerate(zip(reference.keys, other.keys, strict=False)):
        if key != ref_key:
            raise InvalidUpdateError(
                f"{p}entry #{index} is named {key!r} but the reference has {ref_key!r}"
            )
        ref_shape, shape = reference.shapes[index], other.shapes[index]
        if shape != ref_shape:
            raise InvalidUpdateError(
                f"{p}entry {key!r} has shape {shape} but the reference has {ref_shape}"
            )
        ref_dtype, dtype = reference.dtypes[index], other.dtypes[index]
        if dtype != ref_dtype:
            raise InvalidUpdateError(
                f"{p}entry {key!r} has dtype {dtype} but the reference has {ref_dtype}"
            )
    if len(other.keys) != len(reference.keys):
        longer, missing = (
            (other, "unexpected")
            if len(other.keys) > len(reference.keys)
            else (reference, "missing")
        )
        extra = longer.keys[min(len(other.keys), len(reference.keys))]
        raise InvalidUpdateError(
            f"{p}update has {len(other.keys)} entries but the reference has "
            f"{len(reference.keys)} (first {missing} entry: {extra!r})"
        )
