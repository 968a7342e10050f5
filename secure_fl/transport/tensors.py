"""A small, pickle-free serialisation of named float tensors (models and plain updates).

Layout: ``b"SFLTENS1"`` (8 bytes), the header length ``h`` (8 bytes, little endian), ``h`` bytes
of UTF-8 JSON ``{"tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}``, then the raw
little-endian data of each tensor, back to back, in header order.

Guarantee: :func:`loads` either returns exactly the tensors :func:`dumps` was given (same names,
order, dtypes, shapes and bits) or raises; it never unpickles, never reads outside the buffer and
refuses dtypes other than float16/float32/float64.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from secure_fl.errors import InvalidUpdateError

MAGIC = b"SFLTENS1"
#: Domain of :func:`content_digest` (version 1: values upcast to float64).
CONTENT_DOMAIN = b"secure_fl/model-content/v1\x00"
#: Domain of :func:`content_digest_v2` (version 2: values rounded to float32).
CONTENT_DOMAIN_V2 = b"secure_fl/model-content/v2-float32\x00"
#: Bytes of one digest in a :func:`release_key`.
DIGEST_BYTES = 32
_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}
_MAX_HEADER = 16 * 1024 * 1024
_MAX_TENSORS = 100_000
_MAX_NAME = 512
_DIGEST_PIECE = 32 * 1024  # float64 values hashed per piece by content_digest (256 KiB)

#: A model or update: tensor name -> float array, in a fixed order.
Tensors = dict[str, np.ndarray]


def dumps(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialise ``tensors`` (name -> float16/32/64 numpy array) in the layout above.

    The tensor data is copied once, straight into the result (no intermediate ``tobytes``).

    Errors: InvalidUpdateError for a non-string or overlong name, a non-array value or a dtype
    other than float16/float32/float64.
    """
    entries: list[dict[str, Any]] = []
    views: list[memoryview] = []
    offset = 0
    for name, array in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
            raise InvalidUpdateError(f"tensor names must be strings of 1..{_MAX_NAME} characters")
        if not isinstance(array, np.ndarray) or array.dtype.name not in _DTYPES:
            raise InvalidUpdateError(
                f"tensor {name!r} must be a numpy array of dtype {sorted(_DTYPES)}, got "
                f"{getattr(array, 'dtype', type(array).__name__)}"
            )
        # A view when the array is already C-contiguous little-endian (the usual case).
        data = np.ascontiguousarray(array, dtype=_DTYPES[array.dtype.name]).reshape(-1)
        view = data.view(np.uint8).data
        entries.append(
            {
                "name": name,
                "dtype": array.dtype.name,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": view.nbytes,
            }
        )
        views.append(view)
        offset += view.nbytes
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return b"".join([MAGIC, len(header).to_bytes(8, "little"), header, *views])


def _fail(reason: str) -> InvalidUpdateError:
    return InvalidUpdateError(f"malformed tensors payload: {reason}")


def loads(data: bytes | bytearray | memoryview) -> Tensors:
    """Parse the output of :func:`dumps`; the arrays returned are fresh, writable copies.

    Errors: InvalidUpdateError naming what is wrong (magic, header, dtype, shape, offsets, size).
    """
    buf = memoryview(data).cast("B")
    if len(buf) < 16 or bytes(buf[:8]) != MAGIC:
        raise _fail("bad magic")
    hlen = int.from_bytes(buf[8:16], "little")
    if hlen > min(_MAX_HEADER, len(buf) - 16):
        raise _fail(f"header length {hlen} exceeds the payload")
    try:
        header = json.loads(bytes(buf[16 : 16 + hlen]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail("header is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise _fail("header has no tensor list")
    entries = header["tensors"]
    if len(entries) > _MAX_TENSORS:
        raise _fail(f"more than {_MAX_TENSORS} tensors")
    body = buf[16 + hlen :]
    out: Tensors = {}
    expected_offset = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise _fail("tensor entry is not an object")
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        offset, nbytes = entry.get("offset"), entry.get("nbytes")
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME or name in out:
            raise _fail("tensor names must be distinct strings")
        if dtype not in _DTYPES:
            raise _fail(f"tensor {name!r}: dtype must be one of {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(f"tensor {name!r}: shape must be a list of integers >= 0")
        size = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if offset != expected_offset or nbytes != size:
            raise _fail(f"tensor {name!r}: offset or size inconsistent with its shape")
        if offset + size > len(body):
            raise _fail(f"tensor {name!r} extends past the end of the payload")
        array = np.frombuffer(body[offset : offset + size], dtype=_DTYPES[dtype]).reshape(shape)
        out[name] = array.astype(dtype, copy=True)
        expected_offset += size
    if expected_offset != len(body):
        raise _fail(f"{len(body) - expected_offset} trailing bytes")
    return out


def same_structure(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """True when ``a`` and ``b`` have the same names in the same order, shapes and dtypes."""
    return list(a) == list(b) and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a
    )


def _flat_tensor(name: Any, array: Any) -> np.ndarray:
    """``array`` flattened in C order (a view when C-contiguous), after checking that ``name``
    is a non-empty string and ``array`` a numpy array of an accepted float dtype.
    Errors: InvalidUpdateError naming the tensor."""
    if not isinstance(name, str) or not name:
        raise InvalidUpdateError("tensor names must be non-empty strings")
    if not isinstance(array, np.ndarray) or array.dtype.name not in _DTYPES:
        raise InvalidUpdateError(
            f"tensor {name!r} must be a numpy array of dtype {sorted(_DTYPES)}"
        )
    flat: np.ndarray = array.reshape(-1)
    return flat


def content_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The SHA-256 of what a model *is*, independent of how it was serialised or presented
    (version 1: values upcast to float64; kept for records written by older versions and for
    callers that hash exact values; the release guard keys by :func:`release_key`, whose first
    digest is :func:`content_digest_v2`).

    Guarantee (against a malicious server): two models get the same digest whenever they hold
    the same numbers, however the server re-encoded them. Not enough for a float32 task: a
    float64 copy nudged below float32 resolution is other numbers here, the same model to the
    task (use :func:`content_digest_v2`). Hashed, under the domain
    :data:`CONTENT_DOMAIN`: the number of tensors, then for each tensor **sorted by name** its
    UTF-8 name and its values flattened in C order, upcast exactly to little-endian float64,
    with -0.0 written as 0.0 (each part length-prefixed). Deliberately left out, because a server
    can change them without changing the numbers: the serialised bytes and JSON header, the order
    of the tensors, their dtype (float16/32 values are exact in float64) and their shape. So a
    re-typed, re-ordered or re-shaped copy of a model counts as the same model. (Two honest models
    that differ only in those never occur in one federation.)

    The float64 values are produced and hashed in cache-sized pieces: no float64 copy of the
    model is ever held (the digest is the same as hashing the whole float64 vector at once).

    Errors: InvalidUpdateError for a non-float array, a name that is not a non-empty string, or
    NaN / infinite values (such a model has no canonical content and is refused).
    """
    digest = hashlib.sha256(CONTENT_DOMAIN)
    digest.update(len(tensors).to_bytes(8, "little"))
    buf = np.empty(_DIGEST_PIECE, dtype="<f8")
    for name in sorted(tensors):
        array = tensors[name]
        flat = _flat_tensor(name, array)
        raw_name = name.encode()
        digest.update(len(raw_name).to_bytes(8, "little"))
        digest.update(raw_name)
        digest.update(flat.size.to_bytes(8, "little"))
        for start in range(0, flat.size, _DIGEST_PIECE):
            piece = buf[: min(_DIGEST_PIECE, flat.size - start)]
            piece[...] = flat[start : start + piece.size]  # exact upcast to float64
            if not np.isfinite(piece).all():
                raise InvalidUpdateError(f"tensor {name!r} holds NaN or infinite values")
            # x + 0.0 == x for every finite x except -0.0, which becomes 0.0 (one canonical zero).
            np.add(piece, 0.0, out=piece)
            digest.update(piece.data.cast("B"))
    return digest.digest()


def _float32_digests(tensors: Mapping[str, np.ndarray], *, with_v1: bool) -> tuple[bytes, bytes]:
    """One pass over ``tensors``: :func:`content_digest_v2` and (``with_v1``; else b"") the
    :func:`content_digest` of the model rounded to float32. Errors: as content_digest_v2."""
    v2 = hashlib.sha256(CONTENT_DOMAIN_V2)
    v1 = hashlib.sha256(CONTENT_DOMAIN) if with_v1 else None
    count = len(tensors).to_bytes(8, "little")
    buf32 = np.empty(_DIGEST_PIECE, dtype="<f4")
    buf64 = np.empty(_DIGEST_PIECE, dtype="<f8") if with_v1 else None
    v2.update(count)
    if v1 is not None:
        v1.update(count)
    for name in sorted(tensors):
        array = tensors[name]
        flat = _flat_tensor(name, array)
        raw_name = name.encode()
        for h in (v2,) if v1 is None else (v2, v1):
            h.update(len(raw_name).to_bytes(8, "little"))
            h.update(raw_name)
            h.update(flat.size.to_bytes(8, "little"))
        for start in range(0, flat.size, _DIGEST_PIECE):
            piece = buf32[: min(_DIGEST_PIECE, flat.size - start)]
            source = flat[start : start + piece.size]
            with np.errstate(over="ignore"):
                piece[...] = source  # float64 rounded to nearest float32; float16/32 exact
            if not np.isfinite(piece).all():
                if np.isfinite(source).all():
                    raise InvalidUpdateError(
                        f"tensor {name!r} holds values beyond the float32 range "
                        f"(|x| <= {float(np.finfo(np.float32).max):.4g})"
                    )
                raise InvalidUpdateError(f"tensor {name!r} holds NaN or infinite values")
            np.add(piece, np.float32(0.0), out=piece)  # -0.0 -> 0.0 (one canonical zero)
            v2.update(piece.data.cast("B"))
            if v1 is not None and buf64 is not None:
                wide = buf64[: piece.size]
                wide[...] = piece  # exact
                v1.update(wide.data.cast("B"))
    return v2.digest(), b"" if v1 is None else v1.digest()


def content_digest_v2(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The SHA-256 of a model as a float32 task holds it (version 2 of :func:`content_digest`).

    Guarantee (against a malicious server): two models whose values are equal after rounding to
    float32 get the same digest, however the server typed, ordered, shaped or serialised them.
    So a float64 copy of a float32 model nudged below float32 resolution (``w * (1 + 2**-40)``),
    which a float32 task (``torch`` ``load_state_dict`` casts) trains on bit for bit, is the
    same model; version 1 (values upcast to float64) gave it a new digest and thereby a second
    release. Hashed, under the domain :data:`CONTENT_DOMAIN_V2`: the number of tensors, then for
    each tensor **sorted by name** its UTF-8 name, its number of values and its values flattened
    in C order, rounded to nearest float32 (float16 and float32 values are exact) and written as
    little-endian float32 with -0.0 as 0.0 (name and count length-prefixed). Hashing half the
    bytes of version 1, it is also faster.

    Not protected by any digest: a task that trains in float64 on a model perturbed by less
    than float32 resolution (a different model for that task, the same digest here, so no
    harm), or perturbed visibly (a new digest: the multi-round differencing residual of
    ``protocols/security.md``, which only differential privacy bounds).

    Errors: InvalidUpdateError for a name that is not a non-empty string, a non-float array,
    NaN / infinite values, or a finite value beyond the float32 range (no float32 task can hold
    it; such a model is refused).
    """
    return _float32_digests(tensors, with_v1=False)[0]


def release_key(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The key of the one-release-per-model guard (:mod:`secure_fl.transport.replay`): the
    digests by which a site may have recorded a release of this model, 32 bytes each
    (:data:`DIGEST_BYTES`), the first the one to record.

    Guarantee: the key is :func:`content_digest_v2`, then :func:`content_digest` (version 1,
    which versions before this one recorded) of the model rounded to float32, then, only when
    it differs (a float64 model that float32 does not hold exactly), version 1 of the model as
    given. So a model released and recorded by an older version under version 1 is still
    refused when re-sent as a nudged float64 copy (its float32 rounding is the released model)
    or as is. The first two are computed in one pass.

    Errors: InvalidUpdateError, as :func:`content_digest_v2`.
    """
    v2, v1_rounded = _float32_digests(tensors, with_v1=True)
    key = v2 + v1_rounded
    if any(a.dtype == np.float64 for a in tensors.values() if isinstance(a, np.ndarray)):
        v1_given = content_digest(tensors)
        if v1_given != v1_rounded:
            key += v1_given
    return key
