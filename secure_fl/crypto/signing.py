"""Ed25519 signatures (RFC 8032) for the actively secure variant of secure aggregation.

:func:`verify` raises :class:`~secure_fl.errors.SignatureError` on any failure and never
returns a boolean, so a forgotten check cannot silently accept a forged message.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secure_fl.crypto.hygiene import NoPickle
from secure_fl.crypto.random import RandomBytes
from secure_fl.errors import ConfigError, InvalidKeyError, SignatureError

__all__ = ["ED25519_KEY_SIZE", "ED25519_SIGNATURE_SIZE", "SigningKey", "verify"]

ED25519_KEY_SIZE = 32
"""Size in bytes of an Ed25519 private key (seed) and public key."""
ED25519_SIGNATURE_SIZE = 64
"""Size in bytes of an Ed25519 signature."""

_NO_PICKLE = "SigningKey holds a private key and cannot be pickled or copied"


class SigningKey(NoPickle):
    """An Ed25519 private signing key.

    Secrets hygiene: ``repr``/``str`` show only a short prefix of the public key; pickling and
    copying raise ``TypeError``.
    """

    __slots__ = ("_private", "_public")
    _no_pickle_message = _NO_PICKLE

    _private: Ed25519PrivateKey
    _public: bytes

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        """Wrap a pyca/cryptography key; prefer :meth:`generate` or :meth:`from_private_bytes`.

        Raises:
            InvalidKeyError: ``private_key`` is not an ``Ed25519PrivateKey``.
        """
        if not isinstance(private_key, Ed25519PrivateKey):
            raise InvalidKeyError(
                f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}"
            )
        self._private = private_key
        self._public = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, randbytes: RandomBytes | None = None) -> SigningKey:
        """Generate a fresh key: from the OS CSPRNG when ``randbytes`` is None, otherwise the
        32-byte RFC 8032 private key is ``randbytes(32)``.

        Raises:
            InvalidKeyError: ``randbytes`` did not return exactly 32 bytes.
        """
        if randbytes is None:
            return cls(Ed25519PrivateKey.generate())
        return cls.from_private_bytes(randbytes(ED25519_KEY_SIZE))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> SigningKey:
        """Load a key from its raw 32-byte RFC 8032 private key.

        Raises:
            InvalidKeyError: ``data`` is not bytes of length 32 (the message names the length).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidKeyError(f"private key must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) != ED25519_KEY_SIZE:
            raise InvalidKeyError(
                f"private key must be {ED25519_KEY_SIZE} bytes for Ed25519, got {len(raw)} bytes"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte deterministic Ed25519 signature of ``message`` (RFC 8032).

        Raises:
            ConfigError: ``message`` is not bytes.
        """
        if not isinstance(message, bytes | bytearray | memoryview):
            raise ConfigError(f"message must be bytes, got {type(message).__name__}")
        return self._private.sign(bytes(message))

    def __repr__(self) -> str:
        return f"SigningKey(public={self._public[:4].hex()}...)"

    __str__ = __repr__


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Check an Ed25519 signature; returns None only if it is valid.

    Raises:
        SignatureError: the signature does not verify for ``message`` under ``public_key``, or
            the public key or signature is malformed (wrong type or length, not a curve point).
    """
    if not all(
        isinstance(v, bytes | bytearray | memoryview) for v in (public_key, signature, message)
    ):
        raise SignatureError("signature verification failed: arguments must be bytes")
    if len(public_key) != ED25519_KEY_SIZE or len(signature) != ED25519_SIGNATURE_SIZE:
        raise SignatureError("signature verification failed: malformed key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(
            bytes(signature), bytes(message)
        )
    except (InvalidSignature, ValueError):
        raise SignatureError("signature verification failed") from None
