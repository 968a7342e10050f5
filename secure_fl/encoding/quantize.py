"""Fixed-point encoding into Z_{2^b} with unbiased stochastic rounding.

A value ``x`` is clipped to ``[-clip_range, clip_range]``, multiplied by ``weight * 2**frac_bits``
(one float64 product, exact up to float64 rounding of ``x * weight``; the power-of-two scale is
exact), and rounded to an integer ``floor(v) + [U < v - floor(v)]`` with ``U`` uniform in [0, 1):
the result is ``floor(v)`` or ``floor(v) + 1`` and its expectation is ``v`` (to within 2**-53 of
a unit, the resolution of ``U``). Integers are stored in two's complement modulo ``2**bits``, so
the element-wise sum modulo ``2**bits`` of many encodings -- which pairwise masking preserves --
decodes by a centred lift to the exact integer sum, as long as that sum lies in
``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``; :func:`~secure_fl.encoding.planning.plan_bit_width`
chooses the parameters that guarantee it.

The rounding randomness only has to be unbiased, not secret: any ``numpy.random.Generator`` will
do (use an independently seeded one per site and round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.encoding.structure import FloatVector
from secure_fl.errors import ConfigError, InvalidUpdateError

_BITS = (32, 64)
_MAX_FRAC_BITS = 1023  # 2.0**frac_bits must be a finite float64
_BLOCK = 32768  # elements per block in encode: three float64 temporaries of 256 KiB each


def _is_real_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def check_weight(weight: object) -> float:
    """Return ``weight`` as a float; ConfigError unless it is a finite number in (0, 1]."""
    if not _is_real_number(weight) or not (0.0 < float(weight) <= 1.0):  # type: ignore[arg-type]
        raise ConfigError(f"weight must be a finite number in (0, 1], got {weight!r}")
    return float(weight)  # type: ignore[arg-type]


def encoded_bound(clip_range: float, frac_bits: int, weight: float) -> int:
    """Largest ``|encoded value|`` (integer units) that one encoding with these parameters can take.

    It mirrors exactly the float64 arithmetic of :meth:`FixedPointCodec.encode`: the scaled value
    is at most ``fl(clip_range * fl(weight * 2**frac_bits))`` in magnitude (rounding is monotone),
    and stochastic rounding moves it to at most its ceiling.
    """
    peak = clip_range * (weight * 2.0**frac_bits)
    if not math.isfinite(peak):
        raise ConfigError(
            f"clip_range={clip_range!r} times 2**frac_bits (frac_bits={frac_bits}) "
            "overflows float64"
        )
    return math.ceil(peak)


@dataclass(frozen=True)
class EncodeResult:
    """The encoded ``values`` (unsigned, modulo 2**bits) and how many coordinates were ``clipped``
    to ``[-clip_range, clip_range]`` first."""

    values: npt.NDArray[np.unsignedinteger[Any]]
    clipped: int


@dataclass(frozen=True)
class FixedPointCodec:
    """Fixed point modulo ``2**bits`` with ``frac_bits`` fractional bits and input range
    ``[-clip_range, clip_range]``.

    Errors (at construction): ConfigError if ``bits`` is not 32 or 64, ``frac_bits`` is not an
    integer in [0, 1023], ``clip_range`` is not a finite number > 0, or one full-weight encoding
    of ``clip_range`` (``ceil(clip_range * 2**frac_bits)``) would not fit in the signed range
    ``|v| <= 2**(bits-1) - 1``.
    """

    bits: int
    frac_bits: int
    clip_range: float

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or int(self.bits) not in _BITS:
            raise ConfigError(f"bits must be 32 or 64, got {self.bits!r}")
        if not _is_int(self.frac_bits) or not 0 <= int(self.frac_bits) <= _MAX_FRAC_BITS:
            raise ConfigError(
                f"frac_bits must be an integer in [0, {_MAX_FRAC_BITS}], got {self.frac_bits!r}"
            )
        if (
            not _is_real_number(self.clip_range)
            or not math.isfinite(float(self.clip_range))
            or float(self.clip_range) <= 0
        ):
            raise ConfigError(f"clip_range must be a finite number > 0, got {self.clip_range!r}")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "frac_bits", int(self.frac_bits))
        object.__setattr__(self, "clip_range", float(self.clip_range))
        peak = encoded_bound(self.clip_range, self.frac_bits, 1.0)
        if peak > self.max_int:
            raise ConfigError(
                f"clip_range={self.clip_range!r} with frac_bits={self.frac_bits} encodes values up "
                f"to {peak} units, which exceeds bits={self.bits} (at most 2**{self.bits - 1} - 1 "
                f"= {self.max_int}): lower clip_range or frac_bits"
                + (", or use bits=64" if self.bits == 32 else "")
            )

    @property
    def scale(self) -> float:
        """``2**frac_bits``: one unit of the integer domain is ``1 / scale``."""
        return 2.0**self.frac_bits

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """``np.uint32`` or ``np.uint64``: the dtype of encoded values and of their modular sums."""
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def modulus(self) -> int:
        """``2**bits``."""
        return 1 << self.bits

    @property
    def max_int(self) -> int:
        """``2**(bits-1) - 1``: the largest magnitude a (sum of) encoding(s) may have to decode."""
        return (1 << (self.bits - 1)) - 1

    def max_abs_encoded(self, weight: float = 1.0) -> int:
        """Largest ``|value|`` in integer units that :meth:`encode` can produce with ``weight``.

        Monotone in ``weight``. Errors: ConfigError if ``weight`` is not in (0, 1].
        """
        return encoded_bound(self.clip_range, self.frac_bits, check_weight(weight))

    def encode(
        self, vector: npt.NDArray[Any], *, weight: float = 1.0, rng: np.random.Generator
    ) -> EncodeResult:
        """Encode ``weight * clip(vector)`` in fixed point modulo ``2**bits``.

        Guarantee: returns a new array of dtype :attr:`dtype` and the shape of ``vector`` whose
        centred lift ``r`` satisfies ``r in {floor(v), floor(v) + 1}`` with ``E[r] = v`` (to within
        2**-53), where ``v = fl(clip(x) * fl(weight * scale))``; hence ``|r - v| < 1`` and
        ``|r| <= max_abs_encoded(weight)``. ``clipped`` counts the coordinates outside
        ``[-clip_range, clip_range]``. The caller's array is not modified.

        Errors: ConfigError if ``weight`` is not in (0, 1] or ``rng`` is not a
        ``numpy.random.Generator``; InvalidUpdateError if ``vector`` is not a real numeric array
        or holds NaN / Inf (the message says how many).
        """
        w = check_weight(weight)
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if not isinstance(vector, np.ndarray) or not (
            np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)
        ):
            raise InvalidUpdateError(
                "vector must be a real numpy array, got "
                f"{getattr(vector, 'dtype', type(vector).__name__)}"
            )
        if vector.size == 0:
            return EncodeResult(np.zeros(vector.shape, dtype=self.dtype), 0)
        lo = float(vector.min())
        hi = float(vector.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            nan = int(np.count_nonzero(np.isnan(vector)))
            inf = int(np.count_nonzero(np.isinf(vector)))
            raise InvalidUpdateError(
                f"vector holds {nan} NaN and {inf} Inf values; only finite values can be encoded"
            )
        c = self.clip_range
        k = w * self.scale
        peak = c * k
        if math.ceil(min(max(-lo, hi), c) * k) > self.max_int:  # implied by __post_init__
            raise InvalidUpdateError(f"a value would not fit in {self.bits} bits")
        clipped = 0
        need_clip = lo < -c or hi > c
        if need_clip:
            bound = np.float64(c)  # a strong float64: never rounded to a narrower input dtype
            clipped = int(np.count_nonzero(vector > bound)) + int(np.count_nonzero(vector < -bound))
        flat = vector.reshape(-1)
        n = flat.shape[0]
        out = np.empty(n, dtype=np.int32 if self.bits == 32 else np.int64)
        # Work block by block so that the temporaries stay in cache (about 2x faster than whole-
        # array passes); each block is fully vectorised. rng.random fills blocks from one stream,
        # so the output does not depend on the block size.
        block = min(_BLOCK, n)
        scaled = np.empty(block, dtype=np.float64)
        low = np.empty(block, dtype=np.float64)
        uniform = np.empty(block, dtype=np.float64)
        with np.errstate(over="ignore"):
            for start in range(0, n, block):
                stop = min(start + block, n)
                s, f, u = scaled[: stop - start], low[: stop - start], uniform[: stop - start]
                np.multiply(flat[start:stop], k, out=s, dtype=np.float64)  # v = fl(x * k)
                if need_clip:
                    # fl is monotone, so clipping fl(x * k) to fl(c * k) is fl(clip(x) * k).
                    np.clip(s, -peak, peak, out=s)
                np.floor(s, out=f)
                np.subtract(s, f, out=s)  # fractional part: exact, in [0, 1)
                rng.random(out=u)
                np.less(u, s, out=s)  # 1.0 with probability frac, else 0.0
                np.add(f, s, out=f)  # exact: below 2**53, or frac == 0 above
                np.copyto(out[start:stop], f, casting="unsafe")  # integral, |f| <= max_int
        values: npt.NDArray[np.unsignedinteger[Any]] = out.view(self.dtype).reshape(vector.shape)
        return EncodeResult(values, clipped)

    def _check_values(self, values: object) -> npt.NDArray[np.unsignedinteger[Any]]:
        if not isinstance(values, np.ndarray) or values.dtype != self.dtype:
            raise InvalidUpdateError(
                f"values must be a numpy array of dtype {np.dtype(self.dtype).name} for "
                f"bits={self.bits}, got {getattr(values, 'dtype', type(values).__name__)}"
            )
        return values

    def decode_int(self, values: npt.NDArray[np.unsignedinteger[Any]]) -> npt.NDArray[np.int64]:
        """Centred lift of ``values`` (an encoding, or the modular sum of several) to int64.

        Guarantee: ``u >= 2**(bits-1)`` maps to ``u - 2**bits``, other values are unchanged; a new
        array of the same shape. Errors: InvalidUpdateError unless ``values`` is a numpy array of
        dtype :attr:`dtype`.
        """
        checked = self._check_values(values)
        signed = checked.view(np.int32 if self.bits == 32 else np.int64)
        return signed.astype(np.int64)

    def decode(self, values: npt.NDArray[np.unsignedinteger[Any]]) -> FloatVector:
        """Decode ``values`` (an encoding, or the modular sum of several) to float64.

        Guarantee: returns ``decode_int(values) / scale`` as a new float64 array. Applied to the
        sum modulo ``2**bits`` of encodings whose true integer sum ``s`` has ``|s| <= max_int``,
        it returns ``s / scale`` (exact in the integer domain; the conversion to float64 rounds
        only when ``|s| > 2**53``). Errors: InvalidUpdateError unless ``values`` is a numpy array
        of dtype :attr:`dtype`.
        """
        checked = self._check_values(values)
        signed = checked.view(np.int32 if self.bits == 32 else np.int64)
        out = signed.astype(np.float64)
        out *= 1.0 / self.scale  # exact: a power of two
        return out
