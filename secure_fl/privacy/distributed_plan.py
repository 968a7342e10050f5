"""One round's distributed-DP configuration and its plan: granularity, per-site noise, bits.

Split from :mod:`secure_fl.privacy.distributed` (which re-exports every name here); see its
module docstring for the sizing and the granularity rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError
from secure_fl.privacy.discrete import DG_SIGMA_MAX, POISSON_MU_MAX
from secure_fl.privacy.distributed_accounting import MECHANISMS, _is_int, _is_real
from secure_fl.privacy.rotation import padded_dimension

FloatArray = npt.NDArray[np.float64]

_BITS = (32, 64)
#: Largest per-site noise parameter each sampler is trusted with (see secure_fl.privacy.discrete).
_SIGMA_CAP = {"discrete_gaussian": DG_SIGMA_MAX, "skellam": math.sqrt(2.0 * POISSON_MU_MAX)}
#: clip/gamma <= 2**_NORM_BITS / D keeps the worst-case float64 error of the rounded norm check
#: (relative D * 2**-53) below 1/32 of an integer unit.
_NORM_BITS = 48


class DistributedPlan(NamedTuple):
    """What :func:`plan_distributed_bits` chose for a configuration.

    ``gamma``: the granularity (one integer unit is ``gamma`` in update units). ``sigma_site``: the
    per-site noise parameter in integer units (the discrete Gaussian's sigma, or the Skellam
    share's standard deviation). ``bits_needed``: the smallest bit width that holds the sum of
    ``num_sites`` rounded updates plus noise with ``k_stddevs`` headroom at a granularity fine
    enough for ``max_rounding_inflation``. ``headroom``: ``bits - bits_needed`` (>= 0).
    """

    gamma: float
    sigma_site: float
    bits_needed: int
    headroom: int


@dataclass(frozen=True)
class DistributedDPConfig:
    """One round's distributed-DP parameters, validated and planned at construction.

    * ``mechanism`` -- ``"discrete_gaussian"`` or ``"skellam"``.
    * ``clip`` -- L2 bound ``c`` on each site's whole (flattened) update.
    * ``noise_multiplier`` -- ``z``: any ``threshold`` survivors together add float-domain noise of
      std ``z * clip`` per coordinate of the sum. 0 turns the noise off (no privacy: tests and
      utility baselines only).
    * ``threshold`` -- the fewest (honest) survivors the noise is sized for; in [1, num_sites].
    * ``num_sites`` -- sites in the round (the modulus must hold all of their contributions).
    * ``bits`` -- 32 or 64: the SecAgg modulus is ``2**bits``.
    * ``dimension`` -- length of the flattened update (padded to ``padded_dimension``).
    * ``beta`` -- conditional rounding parameter in [0, 1) (0: unconditioned rounding with the
      looser bound ``clip/gamma + sqrt(D)``); default ``exp(-0.5)`` as in DDG's experiments.
    * ``k_stddevs`` -- modular headroom in standard deviations of a coordinate of the sum.
    * ``max_rounding_inflation`` -- largest accepted relative growth of the L2 sensitivity by the
      rounding (``Delta_2 * gamma / clip - 1``); in (0, 1].

    Errors: ConfigError naming the field and the allowed range; for a bit width that cannot hold
    the planned sum, or noise beyond the samplers' exact range, naming the fields involved.
    """

    mechanism: str
    clip: float
    noise_multiplier: float
    threshold: int
    num_sites: int
    bits: int
    dimension: int
    beta: float = math.exp(-0.5)
    k_stddevs: float = 4.0
    max_rounding_inflation: float = 0.01
    _plan: DistributedPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not _is_real(self.clip) or not math.isfinite(self.clip) or self.clip <= 0:
            raise ConfigError(f"clip must be a finite number > 0, got {self.clip!r}")
        if (
            not _is_real(self.noise_multiplier)
            or not math.isfinite(self.noise_multiplier)
            or self.noise_multiplier < 0
        ):
            raise ConfigError(
                f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}"
            )
        if not _is_int(self.num_sites) or self.num_sites < 1:
            raise ConfigError(f"num_sites must be an integer >= 1, got {self.num_sites!r}")
        if not _is_int(self.threshold) or not 1 <= self.threshold <= self.num_sites:
            raise ConfigError(
                f"threshold must be an integer in [1, num_sites={self.num_sites}], "
                f"got {self.threshold!r}"
            )
        if not _is_int(self.bits) or int(self.bits) not in _BITS:
            raise ConfigError(f"bits must be 32 or 64, got {self.bits!r}")
        if not _is_int(self.dimension) or self.dimension < 1:
            raise ConfigError(f"dimension must be an integer >= 1, got {self.dimension!r}")
        padded_dimension(int(self.dimension))  # range check
        if not _is_real(self.beta) or not 0.0 <= float(self.beta) < 1.0:
            raise ConfigError(f"beta must be a number in [0, 1), got {self.beta!r}")
        if not _is_real(self.k_stddevs) or not math.isfinite(self.k_stddevs) or self.k_stddevs <= 0:
            raise ConfigError(f"k_stddevs must be a finite number > 0, got {self.k_stddevs!r}")
        if not _is_real(self.max_rounding_inflation) or not (
            0.0 < float(self.max_rounding_inflation) <= 1.0
        ):
            raise ConfigError(
                "max_rounding_inflation must be a number in (0, 1], "
                f"got {self.max_rounding_inflation!r}"
            )
        for name, cast in (
            ("clip", float),
            ("noise_multiplier", float),
            ("threshold", int),
            ("num_sites", int),
            ("bits", int),
            ("dimension", int),
            ("beta", float),
            ("k_stddevs", float),
            ("max_rounding_inflation", float),
        ):
            object.__setattr__(self, name, cast(getattr(self, name)))
        object.__setattr__(self, "_plan", _make_plan(self))

    @property
    def padded_dimension(self) -> int:
        """``D``: the rotated (power-of-two) length; the SecAgg ``vector_length`` of the round."""
        return padded_dimension(self.dimension)

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """``np.uint32`` or ``np.uint64``: the dtype of encoded shares and of their modular sum."""
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def plan(self) -> DistributedPlan:
        """The planned gamma, per-site noise, bits needed and headroom (see DistributedPlan)."""
        return self._plan


def _min_scale_for_inflation(dim: int, beta: float, inflation: float) -> float:
    """Smallest ``a = clip/gamma`` with ``rounded_l2_bound(a, dim, beta) <= (1 + inflation) a``."""
    root_d = math.sqrt(dim)
    a_plain = root_d / inflation  # a + sqrt(D) <= (1 + tol) a
    if beta == 0.0:
        return a_plain
    # a**2 + D/4 + s (a + sqrt(D)/2) <= (1 + tol)**2 a**2: a quadratic in a.
    s = math.sqrt(2.0 * math.log(1.0 / beta))
    e = (1.0 + inflation) ** 2 - 1.0
    const = 0.25 * dim + 0.5 * s * root_d
    a_cond = (s + math.sqrt(s * s + 4.0 * e * const)) / (2.0 * e)
    return min(a_plain, a_cond)


def _range_std(cfg: DistributedDPConfig, gamma: float, sites: int) -> float:
    """Sub-Gaussian scale (integer units) of one coordinate of the sum of ``sites`` shares."""
    dim = cfg.padded_dimension
    a = cfg.clip / gamma
    z = cfg.noise_multiplier
    var = a * a * (sites * sites / dim + sites * z * z / cfg.threshold) + 0.25 * sites
    return math.sqrt(var)


def _bits_for(magnitude: float) -> int:
    """Smallest b with ``2**(b-1) - 1 >= magnitude`` (two's complement range)."""
    return max(2, math.ceil(math.log2(magnitude + 1.0)) + 1)


def _make_plan(cfg: DistributedDPConfig) -> DistributedPlan:
    dim = cfg.padded_dimension
    n, t, k = cfg.num_sites, cfg.threshold, cfg.k_stddevs
    c, z = cfg.clip, cfg.noise_multiplier
    max_int = float((1 << (cfg.bits - 1)) - 1)
    fields = (
        f"bits={cfg.bits}, num_sites={n}, threshold={t}, noise_multiplier={z:g}, "
        f"k_stddevs={k:g}, dimension={cfg.dimension} (padded to {dim}), "
        f"max_rounding_inflation={cfg.max_rounding_inflation:g}"
    )
    a_tol = _min_scale_for_inflation(dim, cfg.beta, cfg.max_rounding_inflation)
    gamma_max = c / a_tol  # the coarsest granularity the rounding tolerance allows
    bits_needed = _bits_for(k * _range_std(cfg, gamma_max, n))
    spare = (max_int / k) ** 2 - 0.25 * n
    # Finest granularity the modulus holds (DDG Sec. 4.4), never finer than the samplers and the
    # float64 norm check support.
    signal = (n * n / dim + n * z * z / t) * c * c
    gamma_fill = math.sqrt(signal / spare) if spare > 0 else math.inf
    if bits_needed > cfg.bits or gamma_fill > gamma_max:
        raise ConfigError(
            f"bits={cfg.bits} cannot hold the sum of num_sites={n} rounded updates plus noise "
            f"with k_stddevs={k:g} headroom per coordinate ({fields}): it needs bits >= "
            f"{max(bits_needed, cfg.bits + 1)}; use bits=64 or lower k_stddevs, num_sites or "
            "noise_multiplier, or raise max_rounding_inflation"
        )
    gamma_float = c * dim / 2.0**_NORM_BITS
    cap = _SIGMA_CAP[cfg.mechanism]
    gamma_noise = z * c / (math.sqrt(t) * cap) * (1.0 + 2.0**-40)
    gamma = max(gamma_fill, gamma_float, gamma_noise)
    if gamma > gamma_max:
        if gamma_noise >= gamma_float:
            raise ConfigError(
                f"noise_multiplier={z:g} with threshold={t} needs per-site noise above the exact "
                f"{cfg.mechanism} sampler's range (sigma_site <= {cap:g}) at a granularity fine "
                f"enough for max_rounding_inflation={cfg.max_rounding_inflation:g} at "
                f"dimension={cfg.dimension}: lower noise_multiplier, raise threshold or "
                "max_rounding_inflation"
                + (", or use mechanism='discrete_gaussian'" if cfg.mechanism == "skellam" else "")
            )
        raise ConfigError(
            f"dimension={cfg.dimension} (padded to {dim}) is too large for the float64 rounding "
            f"check at max_rounding_inflation={cfg.max_rounding_inflation:g}: raise "
            "max_rounding_inflation or split the update"
        )
    sigma_site = z * c / (gamma * math.sqrt(t))
    if cfg.mechanism == "discrete_gaussian" and 0.0 < sigma_site < 0.5:
        raise ConfigError(
            f"noise_multiplier={z:g} gives per-site discrete Gaussian sigma {sigma_site:.3g} < 1/2, "
            "outside DDG Theorem 1's range: raise noise_multiplier or lower threshold"
        )
    return DistributedPlan(gamma, sigma_site, bits_needed, cfg.bits - bits_needed)


def plan_distributed_bits(cfg: DistributedDPConfig) -> DistributedPlan:
    """``(gamma, sigma_site, bits_needed, headroom)`` for ``cfg`` (see the module docstring).

    Guarantee: ``threshold`` sites' noise shares sum to integer variance ``(z * clip / gamma)**2``
    per coordinate (``sigma_site = z * clip / (gamma * sqrt(threshold))``), and ``k_stddevs``
    standard deviations of one coordinate of the sum of all ``num_sites`` shares fit in the
    centred range of ``2**bits``. The plan was computed (and any refusal raised) when ``cfg``
    was constructed.

    Errors: ConfigError if ``cfg`` is not a DistributedDPConfig.
    """
    if not isinstance(cfg, DistributedDPConfig):
        raise ConfigError(f"cfg must be a DistributedDPConfig, got {type(cfg).__name__}")
    return cfg.plan


__all__ = ["DistributedDPConfig", "DistributedPlan", "plan_distributed_bits"]
