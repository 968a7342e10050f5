"""Encoding layer: structured updates -> clipped float64 vectors -> fixed point in Z_{2^b}.

Pipeline at a site: :func:`flatten` the update, optionally :func:`l2_clip` it, then
``plan.codec().encode(vector, weight=plan.weights[i], rng=rng)`` with a :class:`BitPlan` from
:func:`plan_bit_width`. The server decodes the modular sum with ``codec.decode`` and rebuilds the
structure with :func:`unflatten`.
"""

from secure_fl.encoding.clip import ClipResult, clip_update, l2_clip
from secure_fl.encoding.planning import BitPlan, plan_bit_width
from secure_fl.encoding.quantize import EncodeResult, FixedPointCodec
from secure_fl.encoding.structure import (
    Update,
    UpdateSpec,
    check_same_spec,
    flatten,
    unflatten,
)

__all__ = [
    "BitPlan",
    "ClipResult",
    "EncodeResult",
    "FixedPointCodec",
    "Update",
    "UpdateSpec",
    "check_same_spec",
    "clip_update",
    "flatten",
    "l2_clip",
    "plan_bit_width",
    "unflatten",
]
