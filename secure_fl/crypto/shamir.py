"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(p), p = 2**256 + 297.

``p`` is the smallest prime above ``2**256``, so every 32-byte string (read as a big-endian
integer) is a field element and no secret needs to be reduced or encoded. A sharing with
threshold ``t`` is a uniformly random polynomial ``f`` of degree ``t - 1`` with ``f(0) = secret``;
party ``x`` receives ``f(x)``. Any ``t`` shares determine the secret; any ``t - 1`` shares are
statistically independent of it (perfect secrecy), provided the coefficients are uniform, which
:func:`split` guarantees by rejection sampling.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from secure_fl.crypto.random import RandomBytes, system_random_bytes
from secure_fl.errors import (
    ConfigError,
    InconsistentSharesError,
    InsufficientSharesError,
)

__all__ = ["PRIME", "SECRET_SIZE", "SHARE_SIZE", "Share", "combine", "split"]

PRIME = 2**256 + 297
"""The field modulus: the smallest prime greater than ``2**256``."""

SECRET_SIZE = 32
"""Size in bytes of a secret."""

_X_SIZE = 4
_Y_SIZE = 33
SHARE_SIZE = _X_SIZE + _Y_SIZE
"""Size in bytes of a serialised :class:`Share`: 4-byte big-endian x, 33-byte big-endian y."""

_X_LIMIT = 2**32
_SECRET_LIMIT = 2**256
_COEFF_BYTES = 33
_COEFF_MASK = (1 << 257) - 1  # p < 2**257: keep 257 bits, reject values >= p (acceptance ~1/2)


@dataclass(frozen=True, repr=False)
class Share:
    """One share ``(x, y = f(x))``. ``y`` is secret: ``repr`` shows only ``x``.

    Raises (on construction):
        InconsistentSharesError: ``x`` is not an int in ``[1, 2**32)`` or ``y`` is not an int in
            ``[0, PRIME)`` (a malformed share).
    """

    x: int
    y: int

    def __post_init__(self) -> None:
        if isinstance(self.x, bool) or not isinstance(self.x, int) or not 1 <= self.x < _X_LIMIT:
            raise InconsistentSharesError("malformed share: x must be an int in [1, 2**32)")
        if isinstance(self.y, bool) or not isinstance(self.y, int) or not 0 <= self.y < PRIME:
            raise InconsistentSharesError(
                f"malformed share (x={self.x}): y must be an int in [0, PRIME)"
            )

    def __repr__(self) -> str:
        return f"Share(x={self.x}, y=<redacted>)"

    def to_bytes(self) -> bytes:
        """Serialise to exactly :data:`SHARE_SIZE` (37) bytes: ``x`` as 4 bytes big-endian, then
        ``y`` as 33 bytes big-endian."""
        return self.x.to_bytes(_X_SIZE, "big") + self.y.to_bytes(_Y_SIZE, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse the output of :meth:`to_bytes`.

        Raises:
            InconsistentSharesError: ``data`` is not bytes of length :data:`SHARE_SIZE`, or it
                encodes ``x`` outside ``[1, 2**32)`` or ``y`` outside ``[0, PRIME)``.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InconsistentSharesError(
                f"malformed share: expected bytes, got {type(data).__name__}"
            )
        raw = bytes(data)
        if len(raw) != SHARE_SIZE:
            raise InconsistentSharesError(
                f"malformed share: expected {SHARE_SIZE} bytes, got {len(raw)}"
            )
        return cls(
            int.from_bytes(raw[:_X_SIZE], "big"),
            int.from_bytes(raw[_X_SIZE:], "big"),
        )


def _random_field_element(randbytes: RandomBytes) -> int:
    """Uniform element of [0, PRIME) by rejection sampling (no modulo bias)."""
    while True:
        raw = randbytes(_COEFF_BYTES)
        if len(raw) != _COEFF_BYTES:
            raise ConfigError(f"randbytes returned {len(raw)} bytes, expected {_COEFF_BYTES}")
        value = int.from_bytes(raw, "big") & _COEFF_MASK
        if value < PRIME:
            return value


def _check_threshold(threshold: object) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"threshold must be an int >= 1, got {threshold!r}")
    return threshold


def split(
    secret: bytes,
    *,
    threshold: int,
    xs: Sequence[int],
    randbytes: RandomBytes = system_random_bytes,
) -> list[Share]:
    """Split a 32-byte ``secret`` into one share per evaluation point in ``xs``.

    Any ``threshold`` of the returned shares reconstruct the secret with :func:`combine`; fewer
    reveal nothing about it. Shares are returned in the order of ``xs``. ``randbytes`` must be a
    CSPRNG in production (the default is the OS CSPRNG).

    Raises:
        ConfigError: ``secret`` is not 32 bytes; ``threshold`` is not an int in
            ``[1, len(xs)]``; ``xs`` is empty, holds a non-int or a value outside
            ``[1, 2**32)``, or holds duplicates; or ``randbytes`` returned the wrong length.
    """
    if not isinstance(secret, bytes | bytearray | memoryview) or len(secret) != SECRET_SIZE:
        size = len(secret) if isinstance(secret, bytes | bytearray | memoryview) else "non-bytes"
        raise ConfigError(f"secret must be {SECRET_SIZE} bytes, got {size}")
    xs_list = list(xs)
    if not xs_list:
        raise ConfigError("xs must hold at least one evaluation point")
    for x in xs_list:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < _X_LIMIT:
            raise ConfigError(f"xs entries must be ints in [1, 2**32), got {x!r}")
    if len(set(xs_list)) != len(xs_list):
        raise ConfigError("xs must be distinct")
    t = _check_threshold(threshold)
    if t > len(xs_list):
        raise ConfigError(f"threshold must be in [1, len(xs)] = [1, {len(xs_list)}], got {t}")

    # f(X) = c[0] + c[1] X + ... + c[t-1] X^(t-1), c[0] = secret; Horner from the top.
    coeffs = [int.from_bytes(bytes(secret), "big")]
    coeffs.extend(_random_field_element(randbytes) for _ in range(t - 1))
    top_down = coeffs[::-1]
    p = PRIME
    shares = []
    for x in xs_list:
        acc = 0
        for c in top_down:
            acc = (acc * x + c) % p
        shares.append(Share(x, acc))
    return shares


@functools.lru_cache(maxsize=1024)
def _weights(xs: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Barycentric weights ``w_i = 1 / prod_{j != i} (x_i - x_j)`` and Lagrange coefficients at 0
    ``l_i = w_i * prod_{j != i} (-x_j)`` for the points ``xs`` (public data, safe to cache)."""
    p = PRIME
    denominators = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if i != j:
                d = d * (xi - xj) % p
        denominators.append(d)
    weights = tuple(pow(d, -1, p) for d in denominators)
    # prod_{j != i} (0 - x_j) by prefix/suffix products: no further inverses.
    at_zero = _basis_products(xs, 0)
    coeffs_at_zero = tuple(w * q % p for w, q in zip(weights, at_zero, strict=True))
    return weights, coeffs_at_zero


def _basis_products(xs: Sequence[int], point: int) -> list[int]:
    """``[prod_{j != i} (point - x_j) mod p for i]`` with prefix/suffix products, no inverses."""
    p = PRIME
    n = len(xs)
    prefix = [1] * (n + 1)
    for i, x in enumerate(xs):
        prefix[i + 1] = prefix[i] * (point - x) % p
    result = [0] * n
    suffix = 1
    for i in range(n - 1, -1, -1):
        result[i] = prefix[i] * suffix % p
        suffix = suffix * (point - xs[i]) % p
    return result


def combine(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Reconstruct the 32-byte secret from shares of a ``threshold``-of-n sharing.

    Exact duplicates (same ``x`` and ``y``) are collapsed. The secret is interpolated at 0 from
    the first ``threshold`` distinct shares (in the given order); every further share is then
    checked to lie on the same polynomial, so with more than ``threshold`` shares a corrupted
    share is detected (it is not identified or corrected).

    Raises:
        ConfigError: ``threshold`` is not an int >= 1 or an element is not a :class:`Share`.
        InsufficientSharesError: fewer than ``threshold`` distinct shares (message: got k,
            need t).
        InconsistentSharesError: two shares have the same ``x`` but different ``y``; an extra
            share does not lie on the interpolated polynomial; or the interpolated value is
            ``>= 2**256`` and so cannot be a 32-byte secret.
    """
    t = _check_threshold(threshold)
    by_x: dict[int, int] = {}
    for share in shares:
        if not isinstance(share, Share):
            raise ConfigError(f"shares must be Share instances, got {type(share).__name__}")
        seen = by_x.get(share.x)
        if seen is None:
            by_x[share.x] = share.y
        elif seen != share.y:
            raise InconsistentSharesError(f"two different shares for x={share.x}")
    if len(by_x) < t:
        raise InsufficientSharesError(f"got {len(by_x)} distinct shares, need {t}")

    points = list(by_x.items())
    base = points[:t]
    xs = tuple(x for x, _ in base)
    ys = [y for _, y in base]
    weights, coeffs_at_zero = _weights(xs)
    p = PRIME
    secret = sum(c * y for c, y in zip(coeffs_at_zero, ys, strict=True)) % p

    if len(points) > t:
        weighted = [w * y % p for w, y in zip(weights, ys, strict=True)]
        for x_extra, y_extra in points[t:]:
            basis = _basis_products(xs, x_extra)
            value = sum(b * wy for b, wy in zip(basis, weighted, strict=True)) % p
            if value != y_extra:
                raise InconsistentSharesError(
                    f"share x={x_extra} does not lie on the polynomial of degree {t - 1}"
                )
    if secret >= _SECRET_LIMIT:
        raise InconsistentSharesError("reconstructed value is not a 32-byte secret")
    return secret.to_bytes(SECRET_SIZE, "big")
