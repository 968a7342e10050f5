"""The frame that carries one chunk of ciphertexts, from a site to the server or back.

Layout (version 1, big-endian)::

    b"SFLCKKSF" | version u8 = 1 | kind u8 (1 site contribution, 2 server sum)
    | fingerprint 32 bytes | round u64 | chunk u32 | values u32 | count u32 | contributors u32
    | count x (length u32 | TenSEAL-serialised CKKS vector)
    | SHA-256 of everything before

``values`` is the number of real values in the chunk, ``count`` the number of ciphertexts and
``contributors`` the number of site contributions summed into it (1 for a site's frame).

The digest detects accidental corruption and truncation (a flipped bit in transit or storage), not
a malicious server: CKKS ciphertexts are malleable, and a server can always add what it likes to the
sum. The fingerprint binds a frame to one federation's parameters and key; the round and chunk
numbers stop a frame from being replayed into another round or position.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Final

from secure_fl.errors import RemoteProtocolError

MAGIC: Final = b"SFLCKKSF"
VERSION: Final = 1
KIND_SITE: Final = 1
KIND_SUM: Final = 2
_HEADER: Final = struct.Struct(">8sBB32sQIIII")
_LENGTH: Final = struct.Struct(">I")
_DIGEST_LEN: Final = 32

#: Bytes a frame adds to its ciphertexts: header, one length per ciphertext, digest.
FRAME_OVERHEAD: Final = _HEADER.size + _DIGEST_LEN


@dataclass(frozen=True)
class Frame:
    """A decoded, digest-checked frame. ``fingerprint`` is hex; ``blobs`` are the ciphertexts."""

    kind: int
    fingerprint: str
    round_id: int
    chunk: int
    values: int
    contributors: int
    blobs: tuple[bytes, ...] = field(repr=False)


def encode_frame(
    *,
    kind: int,
    fingerprint: str,
    round_id: int,
    chunk: int,
    values: int,
    contributors: int,
    blobs: list[bytes],
) -> bytes:
    """Serialise one frame (the inverse of :func:`decode_frame`)."""
    head = _HEADER.pack(
        MAGIC,
        VERSION,
        kind,
        bytes.fromhex(fingerprint),
        round_id,
        chunk,
        values,
        len(blobs),
        contributors,
    )
    parts = [head]
    for blob in blobs:
        parts.append(_LENGTH.pack(len(blob)))
        parts.append(blob)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def peek_chunk(data: bytes | bytearray | memoryview) -> int | None:
    """The chunk index a frame's header claims, read without checking anything else (None when
    ``data`` is too short or not a frame). For ordering only: :func:`decode_frame` checks it."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < _HEADER.size:
        return None
    if bytes(data[:8]) != MAGIC:
        return None
    return int(_HEADER.unpack_from(data)[5])


def decode_frame(data: bytes) -> Frame:
    """Parse and digest-check one frame.

    Errors: RemoteProtocolError, saying what is wrong, when ``data`` is not bytes, is truncated or
    padded, has another magic or version, an unknown kind, lengths that do not add up, or a digest
    that does not match (corruption).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError(f"a ciphertext frame must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size + _DIGEST_LEN:
        raise RemoteProtocolError(f"ciphertext frame truncated: {len(view)} bytes")
    if bytes(view[:8]) != MAGIC:
        raise RemoteProtocolError("not a secure_fl CKKS ciphertext frame (bad magic)")
    expected = hashlib.sha256(view[:-_DIGEST_LEN]).digest()
    if not hmac.compare_digest(expected, bytes(view[-_DIGEST_LEN:])):
        raise RemoteProtocolError(
            "ciphertext frame corrupted or truncated: its SHA-256 digest does not match"
        )
    _, version, kind, fingerprint, round_id, chunk, values, count, contributors = (
        _HEADER.unpack_from(view)
    )
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported ciphertext frame version {version}")
    if kind not in (KIND_SITE, KIND_SUM):
        raise RemoteProtocolError(f"unknown ciphertext frame kind {kind}")
    end = len(view) - _DIGEST_LEN
    offset = _HEADER.size
    blobs: list[bytes] = []
    for _ in range(count):
        if offset + _LENGTH.size > end:
            raise RemoteProtocolError("ciphertext frame truncated: fewer ciphertexts than declared")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > end:
            raise RemoteProtocolError("ciphertext frame truncated inside a ciphertext")
        blobs.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != end:
        raise RemoteProtocolError("ciphertext frame has trailing bytes after its ciphertexts")
    return Frame(kind, fingerprint.hex(), round_id, chunk, values, contributors, tuple(blobs))
