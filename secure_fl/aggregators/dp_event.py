"""What the DP wrappers of :mod:`secure_fl.aggregators.dp` share: the :class:`DPEvent` the privacy
ledger records, the :class:`DPResult` they return, their argument check, their noise source
(fresh ``os.urandom`` bits per call, or a named seed for reproducible research runs) and the
clip test.

Errors: ConfigError naming the argument out of range.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_fl.aggregators.base import (
    AggregationResult,
)
from secure_fl.encoding import l2_clip
from secure_fl.errors import ConfigError

NOISE_SOURCES = ("csprng", "seeded")


@dataclass(frozen=True)
class DPEvent:
    """One DP mechanism application of one aggregation (what the ledger records).

    * ``mechanism`` -- ``"gaussian"``, ``"discrete_gaussian"`` or ``"skellam"``; ``trust`` --
      ``"central"`` or ``"distributed"``;
    * ``noise_multiplier`` -- the Gaussian-equivalent multiplier the accountant uses (distributed:
      that of the ``honest_survivors`` shares the noise is sized for); ``nominal_noise_multiplier``
      the multiplier ``z`` the noise was sized with;
    * ``clip`` -- the L2 bound every update was clipped to; ``clipped_updates`` the sites whose
      update it changed;
    * ``noise_std`` -- std of the noise per coordinate of the released weighted SUM (float
      units); ``survivors`` -- sites in the sum;
    * ``threshold`` / ``honest_survivors`` / ``colluders`` -- distributed: the SecAgg threshold
      ``t``, ``t - c`` and ``c``; None for central noise;
    * ``noise_source`` -- ``"csprng"`` or ``"seeded"``.
    """

    mechanism: str
    trust: str
    noise_multiplier: float
    nominal_noise_multiplier: float
    clip: float
    noise_std: float
    survivors: int
    noise_source: str
    threshold: int | None = None
    honest_survivors: int | None = None
    colluders: int | None = None
    clipped_updates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``clipped_updates`` as a list)."""
        out = dataclasses.asdict(self)
        out["clipped_updates"] = list(self.clipped_updates)
        return out


@dataclass(frozen=True)
class DPResult(AggregationResult):
    """An :class:`AggregationResult` whose ``mean`` carries the DP noise, with the ``event``
    applied. ``report`` keeps exactly the inner aggregator's keys (``clipped_updates`` from the
    wrapper's L2 clip)."""

    event: DPEvent | None = field(default=None)


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = v >= 0 if allow_zero else v > 0
    if not (math.isfinite(v) and ok):
        raise ConfigError(
            f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}"
        )
    return v


class _NoiseSource:
    """Fresh OS entropy per call, or (named seed) a generator derived from the seed and a counter."""

    def __init__(self, seed: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self.calls = 0

    @property
    def name(self) -> str:
        return "csprng" if self.seed is None else "seeded"

    def generator(self, *labels: int) -> np.random.Generator:
        self.calls += 1
        if self.seed is None:
            return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        return np.random.default_rng([abs(self.seed), self.calls, *labels])

    def randbytes(self, n: int) -> bytes:
        return self.generator().bytes(n)


def _clipped(vector: np.ndarray, clip: float) -> bool:
    return bool(l2_clip(vector, clip)[1].clipped)
