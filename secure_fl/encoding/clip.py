"""L2 clipping of a whole update (the sensitivity bound that differential privacy relies on)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.encoding.structure import FloatVector, Update, flatten, unflatten
from secure_fl.errors import ConfigError, InvalidUpdateError

# Relative rounding unit of each floating dtype an update may hold (half an ulp at 1.0).
_UNIT_ROUNDOFF = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
}


@dataclass(frozen=True)
class ClipResult:
    """What :func:`l2_clip` did: the L2 ``norm`` before clipping, the ``clip_norm`` bound, the
    scaling ``factor`` that was applied (1.0 when untouched) and whether it ``clipped``."""

    norm: float
    clip_norm: float
    factor: float
    clipped: bool


def _check_clip_norm(clip_norm: object) -> float:
    if (
        isinstance(clip_norm, bool)
        or not isinstance(clip_norm, int | float | np.integer | np.floating)
        or not math.isfinite(float(clip_norm))
        or float(clip_norm) <= 0
    ):
        raise ConfigError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    return float(clip_norm)


def _l2_norm(vector: npt.NDArray[Any]) -> float:
    """L2 norm in float64, without spurious overflow for huge but finite values."""
    flat = vector.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        norm = float(np.linalg.norm(flat))
    if math.isfinite(norm):
        return norm
    if not np.isfinite(flat).all():
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise InvalidUpdateError(f"the vector holds {bad} NaN/Inf values; its norm is undefined")
    peak = float(np.max(np.abs(flat)))
    return peak * float(np.linalg.norm(flat / peak))


def l2_clip(vector: npt.NDArray[Any], clip_norm: float) -> tuple[FloatVector, ClipResult]:
    """Scale ``vector`` by ``factor = min(1, clip_norm / norm)``; return a new float64 array.

    Guarantee: the L2 norm of the result, computed in float64, is <= ``clip_norm`` exactly (when
    floating-point rounding would leave it a few ulps above, the factor is nudged down by as
    many ulps). The direction is preserved; a vector already within the bound is returned
    unchanged (as a float64 copy). The caller's array is never modified.

    Errors: ConfigError if ``clip_norm`` is not a finite number > 0. InvalidUpdateError if
    ``vector`` is not a real numeric array or holds NaN / Inf.
    """
    limit = _check_clip_norm(clip_norm)
    if not isinstance(vector, np.ndarray) or not (
        np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)
    ):
        raise InvalidUpdateError(
            f"vector must be a real numpy array, got {getattr(vector, 'dtype', type(vector))}"
        )
    norm = _l2_norm(vector)
    if norm <= limit:
        return vector.astype(np.float64, copy=True), ClipResult(norm, limit, 1.0, False)
    factor = limit / norm
    out = np.multiply(vector, factor, dtype=np.float64)
    shrink = 2.0**-52
    while _l2_norm(out) > limit:
        factor *= 1.0 - shrink
        shrink *= 2.0
        np.multiply(vector, factor, out=out, dtype=np.float64)
    return out, ClipResult(norm, limit, factor, True)


def clip_update(
    update: Update, clip_norm: float, *, site: str | None = None
) -> tuple[Update, ClipResult]:
    """Clip a whole structured update so that its global L2 norm (over all arrays) is <= clip_norm.

    Guarantee: returns a new update with the same structure, shapes and dtypes (see
    :func:`~secure_fl.encoding.structure.unflatten`) whose L2 norm, computed in float64 over its
    values *as stored in their own dtypes*, is <= ``clip_norm``: for float16 / bfloat16 / float32
    arrays the factor is nudged down so that rounding to the narrow dtype cannot push the norm
    back above the bound. The input update is never modified. ``ClipResult.norm`` is the norm
    before clipping and ``ClipResult.factor`` the factor finally applied.

    Errors: ConfigError for a bad ``clip_norm``; InvalidUpdateError (naming ``site``) for a
    malformed update, as raised by :func:`~secure_fl.encoding.structure.flatten`.
    """
    limit = _check_clip_norm(clip_norm)
    vector, spec = flatten(update, site=site)
    clipped, result = l2_clip(vector, limit)
    rebuilt = unflatten(clipped, spec)
    if not result.clipped:
        return rebuilt, result
    roundoff = max((_UNIT_ROUNDOFF.get(dtype, 0.0) for dtype in spec.dtypes), default=0.0)
    factor = result.factor
    step = 2.0 * roundoff
    while roundoff and _l2_norm(flatten(rebuilt, site=site)[0]) > limit:
        factor *= 1.0 - step
        step *= 2.0
        rebuilt = unflatten(vector * factor, spec)
    return rebuilt, ClipResult(result.norm, limit, factor, True)
