"""Choose the bit width and fixed-point parameters so that a secure sum never wraps.

Each site ``i`` encodes ``weights[i] * clip(x_i)`` with the plan's codec (the weights normalised to
sum to 1), and the server only learns the element-wise sum of all encodings modulo ``2**bits``.
That sum decodes correctly iff its true integer value lies in ``[-(2**(bits-1) - 1),
2**(bits-1) - 1]``. The plan bounds it exactly, with the same float64 arithmetic the codec uses::

    |sum_i r_i| <= max_abs_sum = sum_i ceil(fl(clip_range * fl(w_i * 2**frac_bits)))
                              <= clip_range * 2**frac_bits * (1 + 2**-51) + num_sites

(stochastic rounding adds at most one unit per site), whatever the inputs and whichever subset
of sites survives, and picks the smallest ``bits`` in {32, 64} with ``max_abs_sum <= 2**(bits-1)
- 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from secure_fl.encoding.quantize import (
    FixedPointCodec,
    _is_int,
    _is_real_number,
    encoded_bound,
)
from secure_fl.errors import ConfigError

_BITS = (32, 64)
_MAX_FRAC_BITS = 1023


@dataclass(frozen=True)
class BitPlan:
    """Fixed-point parameters for one aggregation round, with the guarantee they were chosen for.

    ``bits``/``frac_bits``/``clip_range`` configure the codec (:meth:`codec`); ``weights`` are the
    normalised per-site weights (summing to 1 up to float rounding) that site ``i`` must pass to
    ``encode(..., weight=weights[i])`` -- any smaller weight is also safe. ``max_abs_sum`` bounds
    ``|sum_i encode_i|`` in integer units for every input and every subset of sites;
    ``bits_needed`` is the smallest width that holds it (and one full-weight encoding);
    ``resolution`` is the quantisation step ``2**-frac_bits``.
    """

    bits: int
    frac_bits: int
    clip_range: float
    num_sites: int
    max_abs_sum: int
    bits_needed: int
    resolution: float
    weights: tuple[float, ...]

    @property
    def headroom_bits(self) -> int:
        """``bits - bits_needed``: spare bits above the worst case (>= 0)."""
        return self.bits - self.bits_needed

    def codec(self) -> FixedPointCodec:
        """The codec every site uses for this plan. Never raises for a plan from
        :func:`plan_bit_width`."""
        return FixedPointCodec(bits=self.bits, frac_bits=self.frac_bits, clip_range=self.clip_range)

    def mean_error_bound(self, surviving_weight: float, survivors: int) -> float:
        """Per-coordinate bound on the quantisation error of the decoded weighted mean.

        With ``survivors`` sites whose plan weights sum to ``surviving_weight``, the mean is
        ``decode(sum) / surviving_weight``. Each site's stochastic rounding errs by < 1 unit, so
        the decoded sum errs by < ``survivors / scale`` and the mean by less than the returned
        ``survivors / (scale * surviving_weight)``, relative to the float64 products
        ``fl(weight_i * clip(x_i))`` the sites encoded (float64 rounding of those products and
        of the final division is not included: it is relative, about 2**-52).

        Errors: ConfigError if ``survivors`` is not an integer in [1, num_sites] or
        ``surviving_weight`` is not a finite number > 0.
        """
        if not _is_int(survivors) or not 1 <= int(survivors) <= self.num_sites:
            raise ConfigError(
                f"survivors must be an integer in [1, {self.num_sites}], got {survivors!r}"
            )
        if (
            not _is_real_number(surviving_weight)
            or not math.isfinite(float(surviving_weight))
            or float(surviving_weight) <= 0
        ):
            raise ConfigError(
                f"surviving_weight must be a finite number > 0, got {surviving_weight!r}"
            )
        return int(survivors) * self.resolution / float(surviving_weight)


def _check_positive(name: str, value: object) -> float:
    if not _is_real_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _normalise(weights: Sequence[float] | None, num_sites: int) -> tuple[float, ...]:
    if weights is None:
        return (float(Fraction(1, num_sites)),) * num_sites
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise ConfigError(
            f"weights must be a sequence of {num_sites} numbers or None, "
            f"got {type(weights).__name__}"
        )
    if len(weights) != num_sites:
        raise ConfigError(
            f"weights must have exactly num_sites={num_sites} entries, got {len(weights)}"
        )
    exact = [Fraction(_check_positive(f"weights[{i}]", w)) for i, w in enumerate(weights)]
    total = sum(exact, Fraction(0))
    normalised = tuple(float(w / total) for w in exact)
    for i, w in enumerate(normalised):
        if w == 0.0:
            raise ConfigError(
                f"weights[{i}]={weights[i]!r} is so small relative to the total {float(total)!r} "
                "that its normalised weight underflows to 0; weights must be comparable"
            )
    return normalised


def _bound(weights: tuple[float, ...], clip_range: float, frac_bits: int) -> int | None:
    """max(max_abs_sum, one full-weight encoding) in integer units; None if beyond float64."""
    if not math.isfinite(clip_range * 2.0**frac_bits):
        return None
    total = sum(encoded_bound(clip_range, frac_bits, w) for w in weights)
    return max(total, encoded_bound(clip_range, frac_bits, 1.0))


def _bits_for(bound: int | None, clip_range: float, frac_bits: int) -> int:
    if bound is None:  # clip_range * 2**frac_bits >= 2**1024
        return math.floor(math.log2(clip_range)) + frac_bits + 2
    return bound.bit_length() + 1


def _floor_sig(x: float, digits: int = 3) -> float:
    """The float nearest to x rounded *down* to ``digits`` significant decimal digits (<= x)."""
    exp = math.floor(math.log10(x)) - (digits - 1)
    unit = Fraction(10) ** exp
    return float(math.floor(Fraction(x) / unit) * unit)


def _ceil_sig(x: float, digits: int = 3) -> float:
    """The float nearest to x rounded *up* to ``digits`` significant decimal digits (>= x)."""
    exp = math.floor(math.log10(x)) - (digits - 1)
    unit = Fraction(10) ** exp
    return float(math.ceil(Fraction(x) / unit) * unit)


def _frac_bits_for(precision: float) -> int:
    """Smallest f >= 0 with 2**-f <= precision (exact, via the binary exponent)."""
    _, exponent = math.frexp(precision)  # precision = m * 2**exponent, 0.5 <= m < 1
    return max(0, 1 - exponent)


def _suggestions(
    weights: tuple[float, ...], clip_range: float, precision: float, frac_bits: int, limit: int
) -> list[str]:
    def fits(c: float, f: int) -> bool:
        bound = _bound(weights, c, f)
        return bound is not None and bound <= limit

    out: list[str] = []
    if fits(clip_range, 0):
        lo, hi = 0, frac_bits  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(clip_range, mid) else (lo, mid)
        suggested = _ceil_sig(2.0**-lo)
        if suggested <= clip_range:
            out.append(f"raise precision to >= {suggested:.3g} (2**-{lo})")
    scale = 2.0**frac_bits
    guess = (limit - len(weights) - 1) / (scale * 1.001)
    if guess > 0:
        guess = _floor_sig(guess)
        while guess > 0 and not fits(guess, frac_bits):  # the guess is conservative: rarely loops
            guess = _floor_sig(guess * 0.99)
        if guess >= precision:
            out.append(f"lower clip_range to <= {guess:.3g}")
    if not out:
        out.append("aggregate fewer sites per round (num_sites) or relax precision and clip_range")
    return out


def plan_bit_width(
    *,
    num_sites: int,
    weights: Sequence[float] | None,
    clip_range: float,
    precision: float,
    bits: int | None = None,
) -> BitPlan:
    """Plan the fixed-point encoding of a weighted secure sum so that it can never wrap.

    ``weights`` are positive numbers of any scale (e.g. sample counts; None means equal weights);
    they are normalised exactly to sum to 1 and returned in ``BitPlan.weights``. ``precision`` is
    the largest acceptable quantisation step: ``frac_bits`` is the smallest integer >= 0 with
    ``2**-frac_bits <= precision``, so ``resolution <= precision`` (a precision above 1 gives
    resolution 1). Allowed ranges: ``num_sites >= 1``; ``0 < clip_range < inf``;
    ``2**-1023 <= precision <= clip_range``; ``bits`` in {32, 64} or None.

    Guarantee: for every input clipped to ``[-clip_range, clip_range]``, every site encoding with
    weight <= ``weights[i]``, and every subset of sites, the sum of the encodings modulo
    ``2**bits`` decodes to the exact integer sum (``max_abs_sum <= 2**(bits-1) - 1``). With
    ``bits=None`` the result uses 32 bits when they suffice, else 64.

    Errors: ConfigError naming the field and its allowed range for any invalid argument, and,
    when the requested width (or 64 bits) cannot hold the worst case, a ConfigError that names
    precision, clip_range and num_sites, says how many bits they need, and what would fit.
    """
    if not _is_int(num_sites) or int(num_sites) < 1:
        raise ConfigError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    n = int(num_sites)
    if bits is not None and (not _is_int(bits) or int(bits) not in _BITS):
        raise ConfigError(f"bits must be 32, 64 or None (choose automatically), got {bits!r}")
    c = _check_positive("clip_range", clip_range)
    p = _check_positive("precision", precision)
    if p > c:
        raise ConfigError(
            f"precision must be in [2**-{_MAX_FRAC_BITS}, clip_range={c!r}], got {precision!r}"
        )
    frac_bits = _frac_bits_for(p)
    if frac_bits > _MAX_FRAC_BITS:
        raise ConfigError(
            f"precision must be in [2**-{_MAX_FRAC_BITS}, clip_range={c!r}], got {precision!r}"
        )
    normalised = _normalise(weights, n)
    bound = _bound(normalised, c, frac_bits)
    bits_needed = _bits_for(bound, c, frac_bits)
    allowed = _BITS if bits is None else (int(bits),)
    chosen = next((b for b in allowed if bits_needed <= b), None)
    if chosen is None or bound is None:
        target = allowed[-1]
        hints = _suggestions(normalised, c, p, frac_bits, (1 << (target - 1)) - 1)
        where = "the maximum is 64" if bits is None else f"bits={target} was requested"
        if bits == 32 and bits_needed <= 64:
            hints.insert(0, "use bits=64 (or bits=None)")
        raise ConfigError(
            f"precision={precision!r} with clip_range={clip_range!r} and num_sites={n} needs "
            f"{bits_needed} bits; {where}: {' or '.join(hints)}"
        )
    return BitPlan(
        bits=chosen,
        frac_bits=frac_bits,
        clip_range=c,
        num_sites=n,
        max_abs_sum=sum(encoded_bound(c, frac_bits, w) for w in normalised),
        bits_needed=bits_needed,
        resolution=2.0**-frac_bits,
        weights=normalised,
    )
