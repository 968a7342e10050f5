"""The encrypted global model (``CKKS_MODEL``) and the site upload (``CKKS_CIPHERTEXT``) payloads.

Pure byte formats (``protocols/ckks.md``, "Wire formats"); nothing here decrypts or imports TenSEAL.

``CKKS_CIPHERTEXT`` (a site's upload) is the frames of :mod:`secure_fl.he.wire` in chunk order,
each preceded by its length (u64, big-endian). ``CKKS_MODEL`` (the encrypted global model,
:func:`encode_model`) is::

    b"SFLCKMD1" | header length u32 | header JSON | CKKS_CIPHERTEXT-style frames (kind 2, sums)

with the header ``{"format", "fingerprint", "round", "share", "contributors",
"chunk_ciphertexts", "tensors": [{"name", "dtype", "shape"}, ...]}``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.he.packing import Layout

LENGTH = struct.Struct(">Q")
_LENGTH = LENGTH
_HEAD_LENGTH = struct.Struct(">I")
# Generous bound on one serialised ciphertext: two components of N coefficients, 8 bytes each,
# per ciphertext-level prime (SEAL's zstd-compressed form is smaller), plus its own header.
_CT_OVERHEAD = 4096
_FRAME_OVERHEAD = 1024
_MAX_HEADER = 16 * 1024 * 1024

MODEL_MAGIC = b"SFLCKMD1"
MODEL_FORMAT = "secure_fl/ckks-model/v1"
_FLOAT_DTYPES = ("float16", "float32", "float64")
# Largest chunk_ciphertexts a site accepts (as aggregation.chunk_ciphertexts).
MAX_CHUNK_CIPHERTEXTS = 4096

#: (name, dtype, shape) of each tensor of the model, in order.
Structure = tuple[tuple[str, str, tuple[int, ...]], ...]


def fingerprint_bytes(fingerprint: str) -> bytes:
    """The 32-byte form of a hex fingerprint. Errors: ConfigError."""
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError as exc:
        raise ConfigError("the CKKS fingerprint must be hex") from exc
    if len(raw) != 32:
        raise ConfigError("the CKKS fingerprint must be 32 bytes (64 hex digits)")
    return raw


def pack_frames(frames: Iterable[bytes]) -> bytes:
    """The payload of ``frames``: each preceded by its length (u64, big-endian)."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(_LENGTH.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def _split_frames(view: memoryview, what: str, *, limit: int | None = None) -> list[bytes]:
    """Split length-prefixed frames (u64 big-endian lengths) that fill ``view`` exactly.

    Errors: RemoteProtocolError (naming ``what``) when a length runs past the end, a frame is
    empty, or more than ``limit`` frames are present.
    """
    frames: list[bytes] = []
    offset = 0
    while offset < len(view):
        if limit is not None and len(frames) == limit:
            raise RemoteProtocolError(f"{what} holds more than {limit} frames")
        if offset + _LENGTH.size > len(view):
            raise RemoteProtocolError(f"{what} ends inside a frame length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if length == 0 or offset + length > len(view):
            raise RemoteProtocolError(f"{what}: a frame is empty or runs past the end")
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    return frames


def unpack_frames(data: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    """Split a payload into exactly ``count`` frames.

    Errors: RemoteProtocolError when a length runs past the end, a frame is empty, or the payload
    holds another number of frames or trailing bytes.
    """
    frames = _split_frames(memoryview(data).cast("B"), "the CKKS payload", limit=count)
    if len(frames) != count:
        raise RemoteProtocolError(f"the CKKS payload holds {len(frames)} frames, expected {count}")
    return frames


def max_payload_bytes(layout: Layout, poly_modulus_degree: int, primes: int) -> int:
    """An upper bound on the size of an honest payload of ``layout`` (checked on the header)."""
    per_ct = 2 * poly_modulus_degree * 8 * max(1, primes) + _CT_OVERHEAD
    return layout.ciphertexts * per_ct + layout.chunks * (_FRAME_OVERHEAD + _LENGTH.size)


def max_frame_bytes(layout: Layout, poly_modulus_degree: int, primes: int) -> int:
    """An upper bound on the size of one honest frame of ``layout`` (a full chunk): a stream that
    announces a longer frame is refused before its bytes are buffered."""
    per_ct = 2 * poly_modulus_degree * 8 * max(1, primes) + _CT_OVERHEAD
    return min(layout.chunk_ciphertexts, layout.ciphertexts) * per_ct + _FRAME_OVERHEAD


def structure_of(model: Mapping[str, np.ndarray]) -> Structure:
    """The public structure of a model: (name, dtype, shape) of each tensor, in order."""
    return tuple(
        (name, str(v.dtype.name), tuple(int(d) for d in v.shape)) for name, v in model.items()
    )


def structure_size(structure: Structure) -> int:
    """Values in a model of ``structure``."""
    return sum(math.prod(shape) for _, _, shape in structure)


@dataclass(frozen=True)
class EncryptedModel:
    """A decoded ``CKKS_MODEL`` payload: the encrypted global model after round ``round_id``.

    ``frames`` are the server's sum frames (kind 2) of ``sum_u Enc(w_u * m_u)`` over
    ``contributors`` sites whose normalised weights add up to ``share``.
    """

    fingerprint: str
    round_id: int
    share: float
    contributors: int
    chunk_ciphertexts: int
    structure: Structure
    frames: tuple[bytes, ...] = field(repr=False)

    @property
    def vector_length(self) -> int:
        return structure_size(self.structure)


def encode_model(model: EncryptedModel) -> bytes:
    """The ``CKKS_MODEL`` payload of ``model`` (the inverse of :func:`decode_model`)."""
    header = {
        "format": MODEL_FORMAT,
        "fingerprint": model.fingerprint,
        "round": model.round_id,
        "share": model.share,
        "contributors": model.contributors,
        "chunk_ciphertexts": model.chunk_ciphertexts,
        "tensors": [
            {"name": name, "dtype": dtype, "shape": list(shape)}
            for name, dtype, shape in model.structure
        ],
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([MODEL_MAGIC, _HEAD_LENGTH.pack(len(head)), head, pack_frames(model.frames)])


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def decode_model(data: bytes | bytearray | memoryview) -> EncryptedModel:
    """Parse a ``CKKS_MODEL`` payload (structure only: nothing is decrypted).

    Errors: RemoteProtocolError naming what is wrong (magic, header, fields out of range, tensor
    list, number of frames).
    """
    view = memoryview(data).cast("B")
    if len(view) < len(MODEL_MAGIC) + _HEAD_LENGTH.size or bytes(view[:8]) != MODEL_MAGIC:
        raise RemoteProtocolError("not an encrypted secure_fl model (bad magic)")
    (head_len,) = _HEAD_LENGTH.unpack_from(view, 8)
    start = 8 + _HEAD_LENGTH.size
    if head_len > min(_MAX_HEADER, len(view) - start):
        raise RemoteProtocolError("the encrypted model's header length is out of range")
    try:
        header = json.loads(bytes(view[start : start + head_len]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError("the encrypted model's header is not JSON") from exc
    if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
        raise RemoteProtocolError(f"the encrypted model's header is not {MODEL_FORMAT!r}")
    fingerprint: Any = header.get("fingerprint")
    round_id: Any = header.get("round")
    share: Any = header.get("share")
    contributors: Any = header.get("contributors")
    chunk_ciphertexts: Any = header.get("chunk_ciphertexts")
    tensors: Any = header.get("tensors")
    if not isinstance(fingerprint, str):
        raise RemoteProtocolError("the encrypted model names no fingerprint")
    fingerprint_bytes_checked(fingerprint)
    if not _is_int(round_id, 0, 2**64 - 1):
        raise RemoteProtocolError(f"the encrypted model's round {round_id!r} is out of range")
    if (
        isinstance(share, bool)
        or not isinstance(share, int | float)
        or not 0 < float(share) <= 1 + 1e-9
    ):
        raise RemoteProtocolError(f"the encrypted model's share {share!r} is not in (0, 1]")
    if not _is_int(contributors, 1, 2**32 - 1):
        raise RemoteProtocolError(f"the encrypted model's contributors {contributors!r} is invalid")
    if not _is_int(chunk_ciphertexts, 1, MAX_CHUNK_CIPHERTEXTS):
        raise RemoteProtocolError(
            f"the encrypted model's chunk_ciphertexts must be in [1, {MAX_CHUNK_CIPHERTEXTS}]"
        )
    if not isinstance(tensors, list) or not tensors:
        raise RemoteProtocolError("the encrypted model names no tensors")
    structure: list[tuple[str, str, tuple[int, ...]]] = []
    for entry in tensors:
        name = entry.get("name") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(name, str)
            or not name
            or dtype not in _FLOAT_DTYPES
            or not isinstance(shape, list)
            or not all(_is_int(d, 0, 2**40) for d in shape)
        ):
            raise RemoteProtocolError("the encrypted model's tensor list is malformed")
        structure.append((name, str(dtype), tuple(int(d) for d in shape)))
    if len({s[0] for s in structure}) != len(structure):
        raise RemoteProtocolError("the encrypted model names a tensor twice")
    frames = _split_frames(view[start + head_len :], "the encrypted model")
    return EncryptedModel(
        fingerprint=fingerprint,
        round_id=int(round_id),
        share=float(share),
        contributors=int(contributors),
        chunk_ciphertexts=int(chunk_ciphertexts),
        structure=tuple(structure),
        frames=tuple(frames),
    )


def fingerprint_bytes_checked(fingerprint: str) -> bytes:
    """As :func:`fingerprint_bytes`, raising RemoteProtocolError (the value came from a peer)."""
    try:
        return fingerprint_bytes(fingerprint)
    except ConfigError as exc:
        raise RemoteProtocolError(str(exc)) from None
