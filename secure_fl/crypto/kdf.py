"""HKDF-SHA256 key derivation (RFC 5869)."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_fl.errors import ConfigError

__all__ = ["HKDF_SHA256_MAX_LENGTH", "hkdf_sha256"]

HKDF_SHA256_MAX_LENGTH = 255 * 32
"""Largest output length RFC 5869 allows with SHA-256 (255 blocks of 32 bytes)."""


def _check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ConfigError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """Derive ``length`` bytes with HKDF-SHA256 (RFC 5869 extract-then-expand).

    ``salt=None`` and ``salt=b""`` give the same output: RFC 5869 replaces a missing salt by
    32 zero bytes, and HMAC zero-pads any key shorter than its block size, so an empty salt
    and the all-zero salt are the same HMAC key. ``info`` binds the output to its purpose;
    distinct purposes must use distinct ``info`` strings.

    Raises:
        ConfigError: ``ikm``, ``salt`` or ``info`` is not bytes, or ``length`` is not an int in
            ``[1, 8160]``.
    """
    ikm_b = _check_bytes("ikm", ikm)
    salt_b = None if salt is None else _check_bytes("salt", salt)
    info_b = _check_bytes("info", info)
    if isinstance(length, bool) or not isinstance(length, int):
        raise ConfigError(f"length must be an int in [1, {HKDF_SHA256_MAX_LENGTH}]")
    if not 1 <= length <= HKDF_SHA256_MAX_LENGTH:
        raise ConfigError(f"length must be in [1, {HKDF_SHA256_MAX_LENGTH}], got {length}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt_b, info=info_b).derive(ikm_b)
