"""What the CKKS roles of :mod:`secure_fl.he.aggregate` share: the TenSEAL exceptions caught at
the boundary, the range slack of a decrypted sum, the layout and round checks, and TenSEAL's
fastest entry points for encrypting and deserialising a vector.

Errors: ConfigError naming the mismatched layout or the round id out of range.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError
from secure_fl.he.packing import Layout

FloatVector = npt.NDArray[np.float64]

# TenSEAL raises these (and pybind11 maps C++ exceptions onto them); all are caught at the boundary.
_TENSEAL_ERRORS = (RuntimeError, ValueError, TypeError, OverflowError, MemoryError)

# Decrypted sums may exceed the bound by at most this fraction of it (the noise is about 1e-10).
_RANGE_SLACK = 2.0**-20


def _check_layout(layout: Layout, slots: int) -> None:
    if not isinstance(layout, Layout):
        raise ConfigError(f"layout must be a Layout, got {type(layout).__name__}")
    if layout.slots != slots:
        raise ConfigError(
            f"the layout has {layout.slots} slots per ciphertext but the preset has {slots}"
        )


def _check_round(round_id: int) -> int:
    if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id < 2**64:
        raise ConfigError(f"round_id must be an integer in [0, 2**64), got {round_id!r}")
    return round_id


def _raw_vector(ts: Any) -> Any:
    """TenSEAL's C++ ``CKKSVector`` class, or None if this TenSEAL build does not expose it."""
    return getattr(getattr(ts, "_ts_cpp", None), "CKKSVector", None)


def _encryptor(ts: Any, ctx: Any) -> Any:
    """The fastest TenSEAL entry point for "encrypt this list of floats".

    ``_ts_cpp.CKKSVector(ctx, list)`` skips the Python wrapper's PlainTensor round trip (about 15 %
    of the encryption time); the public ``ckks_vector`` is the fallback.
    """
    raw = _raw_vector(ts)
    if raw is not None:
        data = ctx.data
        return lambda values: raw(data, values)
    return lambda values: ts.ckks_vector(ctx, values)


def _loader(ts: Any, ctx: Any) -> Any:
    """The fastest TenSEAL entry point for "deserialise this CKKS vector under ``ctx``".

    ``_ts_cpp.CKKSVector(ctx, bytes)`` (SEAL checks every coefficient against its modulus) saves
    the Python wrapper's overhead, about a quarter of the cost; ``ckks_vector_from`` is the
    fallback.
    """
    raw = _raw_vector(ts)
    if raw is not None:
        data = ctx.data
        return lambda blob: raw(data, blob)
    return lambda blob: ts.ckks_vector_from(ctx, blob)
