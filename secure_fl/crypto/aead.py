"""AES-256-GCM authenticated encryption of secret shares between parties.

Ciphertexts are ``nonce (12) || ciphertext || tag (16)``. The nonce is always drawn fresh from
the OS CSPRNG inside :func:`seal`; callers cannot supply one, so nonce reuse cannot be caused by
a caller bug. With random 96-bit nonces a single key must encrypt fewer than 2**32 messages
(NIST SP 800-38D section 8.3); the protocol uses each pairwise key for a handful of messages.

The associated data binds a ciphertext to its protocol, round, sender and receiver
(:class:`ShareAD`), so a share cannot be replayed into another round or redirected to another
party without :func:`open_sealed` failing.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secure_fl.errors import ConfigError, DecryptionError, InvalidKeyError

__all__ = ["KEY_SIZE", "NONCE_SIZE", "OVERHEAD", "TAG_SIZE", "ShareAD", "open_sealed", "seal"]

KEY_SIZE = 32
"""AES-256 key size in bytes."""
NONCE_SIZE = 12
"""GCM nonce size in bytes (96 bits)."""
TAG_SIZE = 16
"""GCM authentication tag size in bytes (128 bits)."""
OVERHEAD = NONCE_SIZE + TAG_SIZE
"""Bytes added by :func:`seal` to the plaintext length."""

_SHARE_AD_LABEL = b"secure_fl/share/v1"
_U64_LIMIT = 2**64


@dataclass(frozen=True)
class ShareAD:
    """Associated data binding an encrypted share to (protocol, round, sender, receiver).

    Raises (on construction):
        ConfigError: ``protocol`` is not a non-empty str; ``round_id``, ``sender`` or
            ``receiver`` is not an int in ``[0, 2**64)``; or ``sender == receiver``. The message
            names the field.
    """

    protocol: str
    round_id: int
    sender: int
    receiver: int

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, str) or not self.protocol:
            raise ConfigError("protocol must be a non-empty str")
        for name in ("round_id", "sender", "receiver"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    f"{name} must be an int in [0, 2**64), got {type(value).__name__}"
                )
            if not 0 <= value < _U64_LIMIT:
                raise ConfigError(f"{name} must be in [0, 2**64), got {value}")
        if self.sender == self.receiver:
            raise ConfigError(f"receiver must differ from sender, both are {self.sender}")

    def encode(self) -> bytes:
        """Return the unambiguous byte encoding used as GCM associated data.

        Layout: ``b"secure_fl/share/v1" || u32_be(len(protocol_utf8)) || protocol_utf8 ||
        u64_be(round_id) || u64_be(sender) || u64_be(receiver)``. Distinct ``ShareAD`` values
        always encode to distinct byte strings.
        """
        proto = self.protocol.encode("utf-8")
        return b"".join(
            (
                _SHARE_AD_LABEL,
                struct.pack(">I", len(proto)),
                proto,
                struct.pack(">QQQ", self.round_id, self.sender, self.receiver),
            )
        )


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise InvalidKeyError(f"key must be bytes, got {type(key).__name__}")
    data = bytes(key)
    if len(data) != KEY_SIZE:
        raise InvalidKeyError(
            f"key must be {KEY_SIZE} bytes for AES-256-GCM, got {len(data)} bytes"
        )
    return data


def _ad_bytes(ad: object) -> bytes:
    if isinstance(ad, ShareAD):
        return ad.encode()
    if isinstance(ad, bytes | bytearray | memoryview):
        return bytes(ad)
    raise ConfigError(f"ad must be a ShareAD or bytes, got {type(ad).__name__}")


def _check_data(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ConfigError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _seal_with_nonce(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AES-256-GCM with an explicit nonce; returns ``nonce || ciphertext || tag``.

    Private: only for known-answer tests. Reusing a nonce under one key breaks GCM completely.
    """
    key_b = _check_key(key)
    if len(nonce) != NONCE_SIZE:
        raise ConfigError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return bytes(nonce) + AESGCM(key_b).encrypt(bytes(nonce), plaintext, ad)


def seal(key: bytes, plaintext: bytes, ad: ShareAD | bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` under a 32-byte key with AES-256-GCM.

    A fresh random 96-bit nonce is drawn from :func:`os.urandom` on every call. Returns
    ``nonce || ciphertext || tag`` (``len(plaintext) + OVERHEAD`` bytes). ``ad`` is
    authenticated, not encrypted; a :class:`ShareAD` is encoded with :meth:`ShareAD.encode`,
    raw bytes are used as given.

    Raises:
        InvalidKeyError: ``key`` is not 32 bytes.
        ConfigError: ``plaintext`` is not bytes or ``ad`` is neither a ShareAD nor bytes.
    """
    key_b = _check_key(key)
    pt = _check_data("plaintext", plaintext)
    ad_b = _ad_bytes(ad)
    return _seal_with_nonce(key_b, os.urandom(NONCE_SIZE), pt, ad_b)


def open_sealed(key: bytes, sealed: bytes, ad: ShareAD | bytes) -> bytes:
    """Verify and decrypt the output of :func:`seal`; returns the plaintext.

    Nothing is returned unless the tag verifies for exactly this key, nonce, ciphertext and
    associated data.

    Raises:
        DecryptionError: for every authentication failure, deliberately indistinguishable:
            input shorter than ``OVERHEAD``, a modified nonce/ciphertext/tag, a wrong key, or
            wrong associated data (other round, sender, receiver or protocol).
        InvalidKeyError: ``key`` is not 32 bytes (a local programming error, not an attack).
        ConfigError: ``sealed`` is not bytes or ``ad`` is neither a ShareAD nor bytes.
    """
    key_b = _check_key(key)
    data = _check_data("sealed", sealed)
    ad_b = _ad_bytes(ad)
    if len(data) < OVERHEAD:
        raise DecryptionError("decryption failed")
    try:
        return AESGCM(key_b).decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], ad_b)
    except InvalidTag:
        raise DecryptionError("decryption failed") from None
