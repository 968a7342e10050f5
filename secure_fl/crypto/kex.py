"""X25519 key agreement (RFC 7748) and the pairwise key derivation used by secure aggregation.

Each party holds two X25519 key pairs per round (one for the pairwise masks, one for the
share-encryption channel); :func:`agree_key` turns a Diffie-Hellman shared secret into a
32-byte symmetric key bound to a context string and to both public keys.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from secure_fl.crypto.hygiene import NoPickle
from secure_fl.crypto.kdf import hkdf_sha256
from secure_fl.crypto.random import RandomBytes
from secure_fl.errors import ConfigError, InvalidKeyError

__all__ = ["X25519_KEY_SIZE", "X25519KeyPair", "agree_key"]

X25519_KEY_SIZE = 32
"""Size in bytes of an X25519 private key, public key and shared secret."""

_ZERO_SECRET = bytes(X25519_KEY_SIZE)
_NO_PICKLE = "X25519KeyPair holds a private key and cannot be pickled or copied"


def _key_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidKeyError(f"{name} must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) != X25519_KEY_SIZE:
        raise InvalidKeyError(
            f"{name} must be {X25519_KEY_SIZE} bytes for X25519, got {len(data)} bytes"
        )
    return data


class X25519KeyPair(NoPickle):
    """An X25519 private key together with its public key.

    Secrets hygiene: the private key never appears in ``repr``/``str`` (only a short prefix of
    the public key does), and the object refuses pickling and copying (``TypeError``), so that a
    key pair cannot leak into logs, checkpoints or multiprocessing queues by accident. Export the
    private key explicitly with :meth:`private_bytes` when the protocol requires it.
    """

    __slots__ = ("_private", "_public")
    _no_pickle_message = _NO_PICKLE

    _private: X25519PrivateKey
    _public: bytes

    def __init__(self, private_key: X25519PrivateKey) -> None:
        """Wrap a pyca/cryptography private key; prefer :meth:`generate` or
        :meth:`from_private_bytes`.

        Raises:
            InvalidKeyError: ``private_key`` is not an ``X25519PrivateKey``.
        """
        if not isinstance(private_key, X25519PrivateKey):
            raise InvalidKeyError(
                f"private_key must be an X25519PrivateKey, got {type(private_key).__name__}"
            )
        self._private = private_key
        self._public = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, randbytes: RandomBytes | None = None) -> X25519KeyPair:
        """Generate a fresh key pair.

        With ``randbytes=None`` the key comes from the OS CSPRNG (via OpenSSL). Otherwise the
        32-byte private key is ``randbytes(32)`` (use only a CSPRNG in production; a
        :class:`~secure_fl.crypto.random.DeterministicRandom` makes tests reproducible).

        Raises:
            InvalidKeyError: ``randbytes`` did not return exactly 32 bytes.
        """
        if randbytes is None:
            return cls(X25519PrivateKey.generate())
        return cls.from_private_bytes(randbytes(X25519_KEY_SIZE))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519KeyPair:
        """Load a key pair from a raw 32-byte private key (RFC 7748 scalar; clamping is applied
        by the scalar multiplication, as the RFC specifies).

        Raises:
            InvalidKeyError: ``data`` is not bytes of length 32 (the message names the length).
        """
        return cls(X25519PrivateKey.from_private_bytes(_key_bytes("private key", data)))

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (the u-coordinate, little-endian, RFC 7748)."""
        return self._public

    def private_bytes(self) -> bytes:
        """Explicitly export the raw 32-byte private key.

        The secure-aggregation protocol Shamir-shares the mask private key so that the masks of
        dropped parties can be removed; nothing else should call this.
        """
        return self._private.private_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """Return the raw 32-byte X25519 shared secret with ``peer_public``.

        The raw secret is not uniformly random; derive keys from it with :func:`agree_key`.

        Raises:
            InvalidKeyError: ``peer_public`` is not 32 bytes, or it is a low-order point so that
                the shared secret would be all zeros (RFC 7748 section 6.1 check).
        """
        peer = _key_bytes("peer public key", peer_public)
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:
            raise InvalidKeyError(
                "X25519 exchange failed: peer public key is a low-order point"
            ) from exc
        if hmac.compare_digest(shared, _ZERO_SECRET):
            raise InvalidKeyError("X25519 exchange failed: peer public key is a low-order point")
        return shared

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={self._public[:4].hex()}...)"

    __str__ = __repr__


def agree_key(own: X25519KeyPair, peer_public: bytes, *, context: bytes) -> bytes:
    """Derive a 32-byte symmetric key shared between ``own`` and the holder of ``peer_public``.

    ``key = HKDF-SHA256(ikm=X25519(own, peer), salt=None,
    info=context || min(pk_own, pk_peer) || max(pk_own, pk_peer))``; both public keys are 32
    bytes, so the ``info`` string is unambiguous, and ordering them makes both sides derive the
    same key. ``context`` separates purposes (mask seeds vs. share encryption, protocol version,
    round): different contexts give independent keys.

    Raises:
        InvalidKeyError: ``peer_public`` is malformed, low-order, or equal to ``own``'s public key
            (a party must never agree a key with itself; seeing its own key signals a reflected
            message).
        ConfigError: ``own`` is not an :class:`X25519KeyPair` or ``context`` is not bytes.
    """
    if not isinstance(own, X25519KeyPair):
        raise ConfigError(f"own must be an X25519KeyPair, got {type(own).__name__}")
    if not isinstance(context, bytes | bytearray | memoryview):
        raise ConfigError(f"context must be bytes, got {type(context).__name__}")
    peer = _key_bytes("peer public key", peer_public)
    mine = own.public_bytes
    if hmac.compare_digest(peer, mine):
        raise InvalidKeyError("peer public key equals own public key; refusing self-agreement")
    shared = own.exchange(peer)
    lo, hi = (mine, peer) if mine < peer else (peer, mine)
    return hkdf_sha256(shared, salt=None, info=bytes(context) + lo + hi, length=32)
