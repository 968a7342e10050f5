"""Sources of random bytes.

Every function in :mod:`secure_fl.crypto` that needs randomness takes a ``randbytes`` callable
(:data:`RandomBytes`) so that tests and simulations can substitute a reproducible stream.
Production code uses :func:`system_random_bytes`, the operating system's CSPRNG.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_fl.errors import ConfigError

__all__ = ["DeterministicRandom", "RandomBytes", "system_random_bytes"]

RandomBytes = Callable[[int], bytes]
"""A callable ``randbytes(n) -> bytes`` returning exactly ``n`` random bytes."""

_DETERMINISTIC_LABEL = b"secure_fl/DeterministicRandom/v1"


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(f"n must be an int >= 0, got {type(n).__name__}")
    if n < 0:
        raise ConfigError(f"n must be an int >= 0, got {n}")


def system_random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the operating system's CSPRNG (:func:`os.urandom`).

    This is the only source that may be used for production secrets.

    Raises:
        ConfigError: ``n`` is not an int >= 0.
    """
    _check_count(n)
    return os.urandom(n)


class DeterministicRandom:
    """A reproducible pseudo-random byte stream, for tests and reproducible simulation only.

    NOT for production secrets: anyone who knows (or guesses) the seed can recompute every byte.

    The stream is the AES-256-CTR keystream under the key ``SHA-256(label || tag || seed)`` with
    an all-zero initial counter block; the counter advances across calls, so the bytes returned
    depend only on the seed and on the total number of bytes drawn so far, not on how the draws
    are chunked (``r(3) + r(5) == r'(8)`` for two instances with the same seed). Integer seeds and
    byte seeds are domain-separated (``DeterministicRandom(0) != DeterministicRandom(b"0")``).
    """

    __slots__ = ("_encryptor",)

    def __init__(self, seed: bytes | int) -> None:
        """Key the stream from ``seed``.

        Raises:
            ConfigError: ``seed`` is neither bytes nor an int (``bool`` is refused).
        """
        if isinstance(seed, bool) or not isinstance(seed, int | bytes | bytearray):
            raise ConfigError(f"seed must be bytes or int, got {type(seed).__name__}")
        if isinstance(seed, int):
            material = b"int:" + str(seed).encode("ascii")
        else:
            material = b"bytes:" + bytes(seed)
        key = hashlib.sha256(_DETERMINISTIC_LABEL + b"\x00" + material).digest()
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def __call__(self, n: int) -> bytes:
        """Return the next ``n`` bytes of the stream.

        Raises:
            ConfigError: ``n`` is not an int >= 0.
        """
        _check_count(n)
        return self._encryptor.update(bytes(n))

    def __repr__(self) -> str:
        return "DeterministicRandom(<seeded; for tests/simulation only>)"
