"""CKKS rounds over the federation transport: the payload format and the context loading shared
by the server and the sites (``protocols/federation.md``, section "CKKS rounds").

A CKKS payload (kinds ``CKKS_CIPHERTEXT`` and ``CKKS_SUM``) is the frames of
:mod:`secure_fl.he.wire` in chunk order, each preceded by its length as a big-endian u64. A decrypted
mean (``CKKS_MEAN``) is little-endian float64 values. The artefacts are loaded with their
fingerprint checked against the federation's: the server only ever loads the public context
(:class:`secure_fl.he.PublicContext` refuses the secret artefact and any context holding a secret
key), a site only the secret one.

TenSEAL is imported only when a context is loaded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.transport.config import CkksFiles

if TYPE_CHECKING:
    from secure_fl.he import Layout, PublicContext, SecretContext

_LENGTH = struct.Struct(">Q")
# Generous bound on one serialised ciphertext: two components of N coefficients, 8 bytes each,
# per ciphertext-level prime (SEAL's zstd-compressed form is smaller), plus its own header.
_CT_OVERHEAD = 4096
_FRAME_OVERHEAD = 1024


def fingerprint_bytes(fingerprint: str) -> bytes:
    """The 32-byte form of a hex fingerprint. Errors: ConfigError."""
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError as exc:
        raise ConfigError("the CKKS fingerprint must be hex") from exc
    if len(raw) != 32:
        raise ConfigError("the CKKS fingerprint must be 32 bytes (64 hex digits)")
    return raw


def load_public(files: CkksFiles | None) -> PublicContext:
    """The server's public context, checked against the federation's fingerprint.

    Errors: ConfigError when there is no ``ckks`` section, the artefact is the secret one (or holds
    a secret key), is unreadable or corrupted, or has another fingerprint.
    """
    if files is None:
        raise ConfigError(
            "aggregation.protocol 'ckks' needs a 'ckks' section (the public context artefact and "
            "the federation's fingerprint, as written by secure-fl provision)"
        )
    from secure_fl.he import PublicContext

    fingerprint_bytes(files.fingerprint)
    return PublicContext.load(files.context, expected_fingerprint=files.fingerprint)


def load_secret(files: CkksFiles | None) -> SecretContext:
    """A site's secret context, checked against the federation's fingerprint.

    Errors: ConfigError when there is no ``ckks`` section, the artefact is the public one, is
    readable by group or others, unreadable, corrupted, or has another fingerprint.
    """
    if files is None:
        raise ConfigError("this federation aggregates with CKKS but the site config has no 'ckks'")
    from secure_fl.he import SecretContext

    fingerprint_bytes(files.fingerprint)
    return SecretContext.load(files.context, expected_fingerprint=files.fingerprint)


def pack_frames(frames: Iterable[bytes]) -> bytes:
    """The payload of ``frames``: each preceded by its length (u64, big-endian)."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(_LENGTH.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def unpack_frames(data: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    """Split a payload into exactly ``count`` frames.

    Errors: RemoteProtocolError when a length runs past the end, a frame is empty, or the payload
    holds another number of frames or trailing bytes.
    """
    view = memoryview(data).cast("B")
    frames: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(frames) == count:
            raise RemoteProtocolError(f"the CKKS payload holds more than {count} frames")
        if offset + _LENGTH.size > len(view):
            raise RemoteProtocolError("the CKKS payload ends inside a frame length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if length == 0 or offset + length > len(view):
            raise RemoteProtocolError("a CKKS frame length is zero or runs past the payload")
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    if len(frames) != count:
        raise RemoteProtocolError(f"the CKKS payload holds {len(frames)} frames, expected {count}")
    return frames


def max_payload_bytes(layout: Layout, poly_modulus_degree: int, primes: int) -> int:
    """An upper bound on the size of an honest payload of ``layout`` (checked on the header)."""
    per_ct = 2 * poly_modulus_degree * 8 * max(1, primes) + _CT_OVERHEAD
    return layout.ciphertexts * per_ct + layout.chunks * (_FRAME_OVERHEAD + _LENGTH.size)


def mean_to_bytes(mean: npt.NDArray[np.float64]) -> bytes:
    return np.ascontiguousarray(mean, dtype="<f8").tobytes()


def mean_from_bytes(data: bytes | bytearray | memoryview, length: int) -> npt.NDArray[np.float64]:
    """The decrypted mean: ``length`` finite float64 values. Errors: RemoteProtocolError."""
    if len(data) != 8 * length:
        raise RemoteProtocolError(f"the mean must be {8 * length} bytes, got {len(data)}")
    mean = np.frombuffer(bytes(data), dtype="<f8").astype(np.float64)
    if not np.isfinite(mean).all():
        raise RemoteProtocolError("the decrypted mean holds NaN or Inf")
    return mean


def contributor_names(ids: Sequence[int], names: dict[int, str]) -> list[str]:
    """Site names for the summer (which identifies contributions by name)."""
    return [names[i] for i in ids]
