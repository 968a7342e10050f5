"""Randomized Hadamard rotation: spreads a vector's energy evenly over its coordinates.

``rotate(x, seed) = H D pad(x) / sqrt(n)`` where ``n`` is the next power of two >= ``len(x)``,
``pad`` appends zeros, ``D`` is a diagonal of random signs drawn from ``seed`` and ``H`` is the
(Sylvester) Walsh-Hadamard matrix, so the map is orthonormal: norms and inner products are preserved
(up to float64 rounding, a relative ~``log2(n) * 2**-53``). ``unrotate`` is its inverse (the
transpose ``D H / sqrt(n)``) followed by truncation to the original length.

Why: after the rotation each coordinate of a vector of L2 norm ``c`` is a sum of ``n`` terms with
independent random signs, hence sub-Gaussian with variance proxy ``c**2 / n`` (Hoeffding): with
probability >= 1 - delta every coordinate is at most ``c * sqrt(2 * ln(2n / delta) / n)``
(Kairouz, Liu & Steinke 2021, Sec. 4.2; Suresh et al. 2017). A clipped update that was "spiky"
(one large coordinate) therefore fits a small per-coordinate range, which is what lets the modular
sum of the distributed DP mechanism use a fine granularity without wrapping.

The rotation is *public* randomness: every site of a round must use the same ``seed`` (the server
needs it to unrotate). The privacy guarantee never depends on it -- the sensitivity is enforced on
the rounded vector -- only the wrap probability (utility) does.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, InvalidUpdateError

FloatArray = npt.NDArray[np.float64]

#: Number of lowest index bits transformed at once by a dense Hadamard block (one BLAS matmul);
#: the remaining stages are in-place butterflies over contiguous halves.
_DENSE_BITS = 8
#: Largest padded length accepted (2**40 float64 values would be 8 TiB).
_MAX_LOG2 = 40


def padded_dimension(dimension: int) -> int:
    """The rotation's length for a vector of ``dimension`` values: the next power of two.

    Errors: ConfigError unless ``dimension`` is an integer in [1, 2**40].
    """
    if isinstance(dimension, bool) or not isinstance(dimension, int | np.integer):
        raise ConfigError(f"dimension must be an integer >= 1, got {dimension!r}")
    d = int(dimension)
    if not 1 <= d <= 1 << _MAX_LOG2:
        raise ConfigError(f"dimension must be an integer in [1, 2**{_MAX_LOG2}], got {d}")
    return 1 << (d - 1).bit_length()


def _seed_int(seed: int | bytes) -> int:
    if isinstance(seed, bytes | bytearray):
        return int.from_bytes(
            hashlib.sha256(b"secure_fl/rotation/v1" + bytes(seed)).digest(), "big"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or int(seed) < 0:
        raise ConfigError(f"rotation seed must be an int >= 0 or bytes, got {seed!r}")
    return int(seed)


def rotation_signs(seed: int | bytes, length: int) -> FloatArray:
    """The random +-1 diagonal ``D`` of the rotation for ``seed`` and padded ``length``.

    Deterministic: the same (seed, length) gives the same signs on every machine (numpy's PCG64
    seeded through SeedSequence). Errors: ConfigError for a bad seed or a length that is not a
    power of two.
    """
    if length < 1 or length & (length - 1):
        raise ConfigError(f"length must be a power of two, got {length}")
    rng = np.random.Generator(np.random.PCG64(_seed_int(seed)))
    bits = rng.integers(0, 2, size=length, dtype=np.int8)
    signs: FloatArray = 1.0 - 2.0 * bits.astype(np.float64)
    return signs


@lru_cache(maxsize=_DENSE_BITS + 1)
def _hadamard(size: int) -> FloatArray:
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def fwht(vector: npt.NDArray[Any]) -> FloatArray:
    """Unnormalised fast Walsh-Hadamard transform ``H @ vector`` (Sylvester order), as a new array.

    O(n log n): the lowest ``_DENSE_BITS`` index bits are handled by one matmul with a dense
    Hadamard block, the others by ``log2(n) - _DENSE_BITS`` vectorised butterfly stages. ``H`` is
    symmetric and ``H @ H = n * I``.

    Errors: InvalidUpdateError unless ``vector`` is 1-D with a power-of-two length.
    """
    n = int(vector.shape[0]) if vector.ndim == 1 else 0
    if n < 1 or n & (n - 1):
        raise InvalidUpdateError(
            f"fwht needs a 1-D array whose length is a power of two, got shape {vector.shape}"
        )
    log_n = n.bit_length() - 1
    low = min(_DENSE_BITS, log_n)
    block = 1 << low
    out: FloatArray = np.ascontiguousarray(
        (np.asarray(vector, dtype=np.float64).reshape(-1, block) @ _hadamard(block)).reshape(-1)
    )
    if block == n:
        return out
    scratch = np.empty(n // 2, dtype=np.float64)
    half = block
    while half < n:
        pairs = out.reshape(-1, 2, half)
        diff = scratch.reshape(-1, half)
        np.subtract(pairs[:, 0, :], pairs[:, 1, :], out=diff)
        np.add(pairs[:, 0, :], pairs[:, 1, :], out=pairs[:, 0, :])
        pairs[:, 1, :] = diff
        half *= 2
    return out


def _check_vector(name: str, vector: object) -> npt.NDArray[Any]:
    if not isinstance(vector, np.ndarray) or vector.ndim != 1:
        raise InvalidUpdateError(f"{name} must be a 1-D numpy array, got {type(vector).__name__}")
    if not (np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)):
        raise InvalidUpdateError(f"{name} must have a real dtype, got {vector.dtype}")
    if vector.size == 0:
        raise InvalidUpdateError(f"{name} must not be empty")
    return vector


def rotate(x: npt.NDArray[Any], seed: int | bytes) -> FloatArray:
    """``H D pad(x) / sqrt(n)``: the randomized Hadamard rotation of ``x`` (new float64 array).

    Guarantee: orthonormal (``||rotate(x)|| == ||x||`` up to float64 rounding) and exactly
    inverted by :func:`unrotate` with the same seed (up to float64 rounding, ~1e-15 relative).
    The result has length ``padded_dimension(len(x))``. The caller's array is not modified.

    Errors: InvalidUpdateError if ``x`` is not a non-empty 1-D real array; ConfigError for a bad
    seed.
    """
    vec = _check_vector("x", x)
    n = padded_dimension(vec.shape[0])
    padded = np.zeros(n, dtype=np.float64)
    padded[: vec.shape[0]] = vec
    padded *= rotation_signs(seed, n)
    out = fwht(padded)
    out *= 1.0 / math.sqrt(n)
    return out


def unrotate(y: npt.NDArray[Any], seed: int | bytes, *, dimension: int | None = None) -> FloatArray:
    """Inverse of :func:`rotate`: ``(D H y / sqrt(n))[:dimension]`` as a new float64 array.

    ``y`` must have the padded (power-of-two) length; ``dimension`` (default: all of it) is the
    original length to keep.

    Errors: InvalidUpdateError if ``y`` is not 1-D with a power-of-two length; ConfigError if
    ``dimension`` is not in [1, len(y)] or the seed is bad.
    """
    vec = _check_vector("y", y)
    n = vec.shape[0]
    if n & (n - 1):
        raise InvalidUpdateError(f"y must have a power-of-two length, got {n}")
    keep = n if dimension is None else dimension
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or not 1 <= keep <= n:
        raise ConfigError(f"dimension must be an integer in [1, {n}], got {dimension!r}")
    out = fwht(vec)
    out *= rotation_signs(seed, n)
    out *= 1.0 / math.sqrt(n)
    return out[: int(keep)].copy() if keep < n else out
