"""Distributed differential privacy on top of secure aggregation: discrete Gaussian and Skellam.

Every site adds a share of integer noise to its encoded update *before* SecAgg masking, so that
the server -- which only ever learns the modular sum of the surviving sites' vectors -- sees the
sum of the clipped updates plus the sum of the survivors' noise shares, and no party sees a less
noisy aggregate. Two mechanisms:

* ``"discrete_gaussian"`` -- the distributed discrete Gaussian (Kairouz, Liu & Steinke, ICML 2021,
  "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
  arXiv:2102.06387; "DDG" below);
* ``"skellam"`` -- the distributed Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021, "The
  Skellam Mechanism for Differentially Private Federated Learning", arXiv:2110.04995).

Site (:func:`encode_site`, DDG Algorithm 1): L2-clip to ``clip`` (counted and reported), rotate
with the round's randomized Hadamard transform (:mod:`secure_fl.privacy.rotation`; the dimension
is padded to the next power of two ``D``), scale by ``1/gamma``, conditional randomized rounding
to Z^D within the L2 bound ``Delta_2`` (:func:`secure_fl.privacy.discrete.rounded_l2_bound`), add
the site's integer noise (``N_Z(0, sigma_site**2)`` or ``Skellam`` with variance
``sigma_site**2``) and reduce modulo ``2**bits``. Server (:func:`decode_sum`): centred lift of the
modular sum ("modular clipping"), times ``gamma``, unrotate, drop the padding. The result is the
SUM of the survivors' clipped updates plus noise; the caller divides by the number (or weight)
of survivors.

**Noise sizing.** ``sigma_site = z * clip / (gamma * sqrt(threshold))``: any ``threshold``
survivors together add integer noise of variance ``(z * clip / gamma)**2`` per coordinate, i.e.
float-domain noise of std ``z * clip`` on the sum -- the central Gaussian mechanism with noise
multiplier ``z`` that the mechanism replaces. More survivors add more noise (``z * clip *
sqrt(s / threshold)``); fewer than ``threshold`` survivors void the guarantee (refused).

**What the noise protects, against whom.** Site-level DP under zero-out adjacency: neighbouring
inputs differ in one site's update, replaced by zero while the site still adds its noise share (as
in DDG's analysis; a site whose noise vanishes together with its data is not covered). It holds
against the server and any coalition that excludes the honest survivors whose noise is counted. A
site colluding with the server knows (and can subtract) its own noise share: size the noise for
the honest survivors ``t - c`` (:func:`honest_noise_threshold`: ``c = ceil(corrupt_fraction * n)``
colluders among the ``t`` survivors SecAgg needs) and count only honest survivors in
``survivors``. The noise must be secret: each site's ``rng`` defaults to a generator seeded from
the OS CSPRNG; a seeded generator is for named reproducible research runs only.

**Granularity (gamma).** The modulus must hold, per rotated coordinate, ``k_stddevs`` standard
deviations of the sum of ``num_sites`` rounded vectors plus their noise (DDG Sec. 4.2/4.4, Eq. 61 /
Theorem 34, as in the authors' ``heuristic_scale_factor``; rotation flatness rho = 1, Lemma 29)::

    k * sqrt( (clip/gamma)**2 * (n**2 / D + n * z**2 / t) + n / 4 ) <= 2**(bits-1) - 1

(signal ``n clip / sqrt(D)`` for ``n`` aligned updates, rounding variance <= 1/4 per site, noise
``n sigma_site**2``). That is a heuristic on the wrap probability (utility), not on privacy:
modular wrapping is post-processing. Within it we take the finest gamma, but never finer than
keeps the samplers exact and the float64 norm check meaningful (per-site noise ``sigma_site <=
2**24`` for the discrete Gaussian, ``<= 2**14`` for Skellam, and ``clip/gamma <= 2**48 / D``), so
at 32 bits and above the modulus usually has spare bits. The planner refuses (ConfigError naming
the fields) when the bits cannot hold the sum at a granularity fine enough that conditional
rounding inflates the L2 sensitivity by at most ``max_rounding_inflation`` (``Delta_2 <= (1 +
max_rounding_inflation) * clip / gamma``); ``bits_needed`` is the smallest width that can.

**Accounting.** :func:`effective_noise_multiplier` returns a Gaussian-equivalent multiplier
``z_eff``: the mechanism's Renyi divergence of every order alpha > 1 is at most
``alpha / (2 z_eff**2)``, that of the Gaussian mechanism with multiplier ``z_eff``. Bounds: DDG
Theorem 1 / Proposition 14 (concentrated DP of a sum of discrete Gaussians, with the ``tau``
term) and the multi-dimensional Skellam RDP bound of Agarwal et al. (as evaluated by the authors'
accounting code), both with the sensitivities of the rounded vector (``Delta_2``, and
``Delta_1 = min(sqrt(D) Delta_2, Delta_2**2)``). ``z_eff <= z`` at ``threshold`` survivors and
``z_eff -> z`` as ``gamma -> 0``. This is an RDP/zCDP statement: compose it with an RDP
accountant. It does *not* make the mechanism's privacy-loss distribution dominated by the
Gaussian's, so a PRV/PLD accountant fed ``z_eff`` is not guaranteed to upper-bound epsilon, and
Poisson-subsampling amplification computed for the Gaussian is not proven for these mechanisms
either (:func:`distributed_rdp` gives the raw RDP curve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from secure_fl.encoding.clip import l2_clip
from secure_fl.errors import ConfigError, InvalidUpdateError, ThresholdError
from secure_fl.privacy.discrete import (
    DG_SIGMA_MAX,
    MAX_ROUNDING_RETRIES,
    POISSON_MU_MAX,
    RoundingError,
    conditional_randomized_round,
    rounded_l2_bound,
    sample_discrete_gaussian,
    sample_skellam,
)
from secure_fl.privacy.rotation import padded_dimension, rotate, unrotate

__all__ = [
    "MECHANISMS",
    "DecodedSum",
    "DistributedDPConfig",
    "DistributedPlan",
    "EncodedShare",
    "RoundingError",
    "decode_sum",
    "distributed_rdp",
    "effective_noise_multiplier",
    "encode_site",
    "gaussian_equivalent_noise_multiplier",
    "honest_noise_threshold",
    "l2_sensitivity",
    "plan_distributed_bits",
]

FloatArray = npt.NDArray[np.float64]

MECHANISMS = ("discrete_gaussian", "skellam")
_BITS = (32, 64)
#: Largest per-site noise parameter each sampler is trusted with (see secure_fl.privacy.discrete).
_SIGMA_CAP = {"discrete_gaussian": DG_SIGMA_MAX, "skellam": math.sqrt(2.0 * POISSON_MU_MAX)}
#: clip/gamma <= 2**_NORM_BITS / D keeps the worst-case float64 error of the rounded norm check
#: (relative D * 2**-53) below 1/32 of an integer unit.
_NORM_BITS = 48


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


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


def l2_sensitivity(cfg: DistributedDPConfig) -> float:
    """L2 sensitivity (integer units) that the privacy analysis uses for one site's share.

    The conditional rounding bound ``rounded_l2_bound(clip / gamma, D, beta)`` that
    :func:`encode_site` enforces, times ``1 + D * 2**-52`` to cover the float64 error of the norm
    check (a relative error below ``D * 2**-53``).
    """
    dim = cfg.padded_dimension
    bound = rounded_l2_bound(cfg.clip / cfg.plan.gamma, dim, cfg.beta)
    return bound * (1.0 + dim * 2.0**-52)


def _check_survivors(cfg: DistributedDPConfig, survivors: object) -> int:
    if (
        isinstance(survivors, bool)
        or not isinstance(survivors, int | np.integer)
        or not 1 <= int(survivors) <= cfg.num_sites
    ):
        raise ConfigError(
            f"survivors must be an integer in [1, num_sites={cfg.num_sites}], got {survivors!r}"
        )
    return int(survivors)


def _ddg_tau(sigma: float, survivors: int) -> float:
    """DDG Theorem 1: ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi**2 sigma**2 k / (k+1))``."""
    if survivors < 2:
        return 0.0
    k = np.arange(1, survivors, dtype=np.float64)
    return 10.0 * float(np.sum(np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1.0))))


def _check_accounting_args(
    mechanism: str, l2: float, dimension: int, sigma: float, survivors: int
) -> None:
    if mechanism not in MECHANISMS:
        raise ConfigError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if not _is_real(l2) or not math.isfinite(l2) or l2 <= 0:
        raise ConfigError(f"l2_sensitivity must be a finite number > 0, got {l2!r}")
    if not _is_int(dimension) or dimension < 1:
        raise ConfigError(f"dimension must be an integer >= 1, got {dimension!r}")
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma <= 0:
        raise ConfigError(f"sigma_site must be a finite number > 0, got {sigma!r}")
    if not _is_int(survivors) or survivors < 1:
        raise ConfigError(f"survivors must be an integer >= 1, got {survivors!r}")
    if mechanism == "discrete_gaussian" and sigma < 0.5:
        raise ConfigError(f"sigma_site must be >= 1/2 for DDG Theorem 1, got {sigma!r}")


def gaussian_equivalent_noise_multiplier(
    mechanism: str,
    *,
    l2_sensitivity: float,
    dimension: int,
    sigma_site: float,
    survivors: int,
) -> float:
    """Gaussian-equivalent noise multiplier of ``survivors`` integer noise shares.

    The sum of ``survivors`` shares (each ``N_Z(0, sigma_site**2)``, or Skellam with variance
    ``sigma_site**2``) added to integer vectors in Z^dimension whose difference has L2 norm <=
    ``l2_sensitivity`` (hence L1 norm <= ``Delta_1 = min(sqrt(d) Delta_2, Delta_2**2)``, the
    coordinates being integers) satisfies ``D_alpha <= alpha / (2 z_eff**2)`` for every order
    ``alpha > 1``:

    * discrete Gaussian -- DDG Theorem 1 (Proposition 14's two terms linear in alpha):
      ``(eps**2 / 2)``-zCDP with ``eps**2 = min(Delta_2**2/(n sigma**2) + 2 tau Delta_1/(sqrt(n)
      sigma) + tau**2 d, (Delta_2/(sqrt(n) sigma) + tau sqrt(d))**2)``, ``tau = 10
      sum_{k<n} exp(-2 pi**2 sigma**2 k/(k+1))``, needs ``sigma >= 1/2``; ``z_eff = 1/eps``.
    * Skellam -- Agarwal et al. 2021, multi-dimensional Skellam RDP, with total variance ``mu = n
      sigma**2``: ``eps(alpha) <= alpha Delta_2**2/(2 mu) + min(((2 alpha - 1) Delta_2**2 + 6
      Delta_1)/(4 mu**2), 3 Delta_1/(2 mu))``. Dividing by alpha, the second term over alpha is at
      most ``min(max((Delta_2**2 + 6 Delta_1)/(4 mu**2), Delta_2**2/(2 mu**2)), 3 Delta_1/(2 mu))``
      for all alpha >= 1, so ``1/(2 z_eff**2)`` = ``Delta_2**2/(2 mu)`` + that.

    Errors: ConfigError for an unknown mechanism or out-of-range argument.
    """
    _check_accounting_args(mechanism, l2_sensitivity, dimension, sigma_site, survivors)
    l2 = float(l2_sensitivity)
    dim = int(dimension)
    sigma = float(sigma_site)
    n = int(survivors)
    l1 = min(math.sqrt(dim) * l2, l2 * l2)
    if mechanism == "discrete_gaussian":
        tau = _ddg_tau(sigma, n)
        scale = math.sqrt(n) * sigma
        u = l2 / scale
        eps_sq = min(
            u * u + 2.0 * tau * l1 / scale + tau * tau * dim, (u + tau * math.sqrt(dim)) ** 2
        )
        return 1.0 / math.sqrt(eps_sq)
    mu = n * sigma * sigma
    extra = min(
        max((l2 * l2 + 6.0 * l1) / (4.0 * mu * mu), l2 * l2 / (2.0 * mu * mu)), 1.5 * l1 / mu
    )
    return 1.0 / math.sqrt(l2 * l2 / mu + 2.0 * extra)


def honest_noise_threshold(
    threshold: int, num_sites: int, corrupt_fraction: float
) -> tuple[int, int]:
    """``(t - c, c)``: the honest survivors distributed noise must be sized for, and the colluders.

    Secure aggregation releases a sum once ``threshold`` (``t``) sites survive; up to ``c =
    ceil(corrupt_fraction * num_sites)`` of them may collude with the server and subtract their
    own noise shares, so only ``t - c`` honest shares are guaranteed to remain in what the
    coalition sees. Sizing the noise for ``t - c`` (``DistributedDPConfig.threshold``) keeps the
    guarantee against the server together with any ``c`` sites.

    Errors: ConfigError naming ``aggregation.options.corrupt_fraction`` / ``threshold`` and
    ``privacy.trust`` when ``t - c < 1`` (no honest noise is guaranteed), or when an argument is
    out of range.
    """
    if not _is_int(num_sites) or num_sites < 1:
        raise ConfigError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    if not _is_int(threshold) or not 1 <= threshold <= num_sites:
        raise ConfigError(
            f"aggregation.options.threshold must be an integer in [1, {num_sites}], got "
            f"{threshold!r}"
        )
    if not _is_real(corrupt_fraction) or not 0.0 <= float(corrupt_fraction) < 1.0:
        raise ConfigError(
            "aggregation.options.corrupt_fraction must be a number in [0, 1), got "
            f"{corrupt_fraction!r}"
        )
    colluders = math.ceil(float(corrupt_fraction) * int(num_sites))
    honest = int(threshold) - colluders
    if honest < 1:
        raise ConfigError(
            f"privacy.trust='distributed' needs at least one honest survivor: threshold={threshold} "
            f"minus colluders c=ceil(aggregation.options.corrupt_fraction={corrupt_fraction:g} x "
            f"{num_sites} sites)={colluders} leaves {honest}; lower "
            "aggregation.options.corrupt_fraction, raise aggregation.options.threshold, or use "
            "privacy.trust='central'"
        )
    return honest, colluders


def effective_noise_multiplier(cfg: DistributedDPConfig, survivors: int) -> float:
    """Gaussian-equivalent noise multiplier of one round of ``cfg`` with ``survivors`` survivors.

    Guarantee: for every order alpha > 1, the round's Renyi divergence between neighbouring
    inputs (one site's update replaced by zero; ``survivors`` honest sites adding noise) is at
    most ``alpha / (2 z_eff**2)``, that of the Gaussian mechanism with multiplier ``z_eff`` (see
    :func:`gaussian_equivalent_noise_multiplier` for the theorems, with sensitivity
    :func:`l2_sensitivity`). At ``threshold`` survivors ``z_eff <= noise_multiplier`` (rounding
    only inflates the sensitivity, and the discrete corrections only add); more survivors add
    noise, so ``z_eff`` grows towards ``noise_multiplier * sqrt(survivors / threshold)``. Returns
    0.0 when ``noise_multiplier`` is 0 (no privacy).

    Valid for RDP (or zCDP) composition without subsampling; see the module docstring for why a
    PRV/PLD accountant or Gaussian subsampling amplification is not covered. For ``"skellam"``
    the bound holds at integer orders only (account with ``PrivacyEvent(...,
    integer_orders=True)``, as the ledger does).

    Errors: ConfigError if ``survivors`` is not an integer in [1, num_sites], or is below
    ``threshold`` (the noise is then smaller than planned and the guarantee does not hold).
    """
    s = _check_survivors(cfg, survivors)
    if s < cfg.threshold:
        raise ConfigError(
            f"survivors={s} is below threshold={cfg.threshold}: the survivors' noise is smaller "
            "than the planned noise and the distributed DP guarantee does not hold"
        )
    if cfg.noise_multiplier == 0.0:
        return 0.0
    return gaussian_equivalent_noise_multiplier(
        cfg.mechanism,
        l2_sensitivity=l2_sensitivity(cfg),
        dimension=cfg.padded_dimension,
        sigma_site=cfg.plan.sigma_site,
        survivors=s,
    )


def distributed_rdp(
    cfg: DistributedDPConfig, survivors: int, orders: Sequence[float]
) -> npt.NDArray[np.float64]:
    """RDP bound ``eps(alpha)`` of one round at each order in ``orders`` (all > 1).

    The raw curves behind :func:`effective_noise_multiplier`, for an RDP accountant that can
    compose arbitrary curves: DDG Proposition 14 (minimum of its three terms, including the one
    not linear in alpha, ``alpha/2 * Delta_2**2/(n sigma**2) + tau d``) or the Skellam bound of
    Agarwal et al., which is stated for integer orders: a fractional order gets the bound at
    ``ceil(alpha)`` (valid, Renyi divergence being non-decreasing in the order). With
    ``noise_multiplier == 0`` every order is ``inf``.

    Errors: as :func:`effective_noise_multiplier`; ConfigError for an order <= 1.
    """
    s = _check_survivors(cfg, survivors)
    if s < cfg.threshold:
        raise ConfigError(
            f"survivors={s} is below threshold={cfg.threshold}: the distributed DP guarantee "
            "does not hold"
        )
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 1.0):
        raise ConfigError("orders must be a 1-D sequence of finite numbers > 1")
    if cfg.noise_multiplier == 0.0:
        return np.full(alphas.shape, np.inf)
    l2 = l2_sensitivity(cfg)
    dim = cfg.padded_dimension
    sigma = cfg.plan.sigma_site
    l1 = min(math.sqrt(dim) * l2, l2 * l2)
    if cfg.mechanism == "discrete_gaussian":
        tau = _ddg_tau(sigma, s)
        scale = math.sqrt(s) * sigma
        u = l2 / scale
        term_1 = alphas / 2.0 * u * u + tau * dim
        term_2 = alphas / 2.0 * (u * u + 2.0 * tau * l1 / scale + tau * tau * dim)
        term_3 = alphas / 2.0 * (u + tau * math.sqrt(dim)) ** 2
        out: npt.NDArray[np.float64] = np.minimum(np.minimum(term_1, term_2), term_3)
        return out
    mu = s * sigma * sigma
    # Agarwal et al. state the Skellam bound for integer orders only; Renyi divergence is
    # non-decreasing in the order, so a fractional order takes the bound at its ceiling.
    ints = np.ceil(alphas)
    extra = np.minimum(((2.0 * ints - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu), 1.5 * l1 / mu)
    curve: npt.NDArray[np.float64] = ints * l2 * l2 / (2.0 * mu) + extra
    return curve


@dataclass(frozen=True)
class EncodedShare:
    """One site's contribution: ``values`` (uint32/uint64, length ``padded_dimension``) to feed to
    SecAgg; whether the update was ``clipped`` to ``clip`` in L2; how many conditional-rounding
    draws were rejected (``rounding_retries``)."""

    values: npt.NDArray[np.unsignedinteger[Any]] = field(repr=False)
    clipped: bool
    rounding_retries: int


def _check_update(update: object, dimension: int) -> npt.NDArray[Any]:
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise InvalidUpdateError(
            f"update_flat must be a 1-D numpy array, got {getattr(update, 'shape', type(update))}"
        )
    if not (np.issubdtype(update.dtype, np.floating) or np.issubdtype(update.dtype, np.integer)):
        raise InvalidUpdateError(f"update_flat must have a real dtype, got {update.dtype}")
    if update.shape[0] != dimension:
        raise InvalidUpdateError(
            f"update_flat has length {update.shape[0]} but cfg.dimension is {dimension}"
        )
    return update


def encode_site(
    update_flat: npt.NDArray[Any],
    cfg: DistributedDPConfig,
    *,
    rotation_seed: int | bytes,
    rng: np.random.Generator | None = None,
) -> EncodedShare:
    """Clip, rotate, scale, round and noise one site's flattened update into ``Z_{2**bits}``.

    Guarantee: the returned share is ``(r + e) mod 2**bits`` where ``r`` in Z^D is a conditional
    randomized rounding of ``rotate(clip(x), rotation_seed) / gamma`` with ``||r||_2 <=``
    ``rounded_l2_bound(clip/gamma, D, beta)`` (float64 check; see :func:`l2_sensitivity`) and
    ``e`` is this site's fresh noise share (``N_Z(0, sigma_site**2)`` or Skellam with variance
    ``sigma_site**2``, per coordinate, independent of ``r``). Alone, a share is as private as one
    site's noise makes it; the round's guarantee comes from the sum of >= ``threshold`` shares
    (:func:`effective_noise_multiplier`). Every site of a round must use the same
    ``rotation_seed``; ``rng`` (default: a fresh generator seeded from the OS CSPRNG) must be
    secret and independent per site and round. The caller's array is not modified.

    Errors: InvalidUpdateError if ``update_flat`` is not a 1-D real array of length
    ``cfg.dimension`` or holds NaN/Inf; ConfigError for a bad ``cfg``, seed or ``rng``;
    RoundingError if conditional rounding fails ``MAX_ROUNDING_RETRIES + 1`` times in a row
    (probability < 1e-21 for a clipped input).
    """
    if not isinstance(cfg, DistributedDPConfig):
        raise ConfigError(f"cfg must be a DistributedDPConfig, got {type(cfg).__name__}")
    gen = np.random.default_rng() if rng is None else rng
    if not isinstance(gen, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    vector = _check_update(update_flat, cfg.dimension)
    clipped, info = l2_clip(vector, cfg.clip)
    plan = cfg.plan
    scaled = rotate(clipped, rotation_seed)
    scaled /= plan.gamma
    dim = cfg.padded_dimension
    bound = rounded_l2_bound(cfg.clip / plan.gamma, dim, cfg.beta)
    rounded, retries = conditional_randomized_round(
        scaled, bound, rng=gen, max_retries=MAX_ROUNDING_RETRIES
    )
    if cfg.mechanism == "discrete_gaussian":
        rounded += sample_discrete_gaussian(plan.sigma_site, dim, gen)
    else:
        rounded += sample_skellam(plan.sigma_site**2 / 2.0, dim, gen)
    if cfg.bits == 32:
        values: npt.NDArray[np.unsignedinteger[Any]] = (rounded & 0xFFFFFFFF).astype(np.uint32)
    else:
        values = rounded.view(np.uint64)
    return EncodedShare(values=values, clipped=info.clipped, rounding_retries=retries)


@dataclass(frozen=True)
class DecodedSum:
    """The decoded round.

    * ``values`` -- float64, length ``dimension``: the SUM of the survivors' clipped updates plus
      the noise (divide by the survivors' count or weight for a mean).
    * ``survivors`` -- how many sites' shares the sum holds.
    * ``noise_std`` -- std of the noise on each coordinate of ``values``:
      ``noise_multiplier * clip * sqrt(survivors / threshold)`` (plus rounding noise of std at
      most ``gamma * sqrt(survivors) / 2``, not included).
    * ``near_edge`` -- coordinates whose centred lift is within one unit of ``+-2**(bits-1)``.
    * ``beyond_range`` -- coordinates whose centred lift exceeds ``k_stddevs`` planned standard
      deviations of the survivors' sum.

    Wraps cannot be seen exactly after summation (a wrapped coordinate lifts to a value of the
    opposite sign near the far end of the range). ``near_edge`` is the literal edge count;
    ``beyond_range`` is the more useful proxy: without any wrap it is a binomial count with rate
    about ``2 * Phi(-k_stddevs)`` (6e-5 at k = 4) or less, so a markedly larger count suggests
    wrapping (or an input outside the plan, such as a misbehaving site).
    """

    values: FloatArray = field(repr=False)
    survivors: int
    noise_std: float
    near_edge: int
    beyond_range: int


def decode_sum(
    modular_sum: npt.NDArray[np.unsignedinteger[Any]],
    cfg: DistributedDPConfig,
    *,
    rotation_seed: int | bytes,
    survivors: int,
) -> DecodedSum:
    """Decode the SecAgg modular sum of ``survivors`` encoded shares into the noisy float sum.

    Guarantee: if no coordinate of the true integer sum left ``[-(2**(bits-1) - 1), 2**(bits-1) -
    1]``, the result equals ``sum_i clip(x_i) + gamma * unrotate(sum_i (r_i - v_i) + sum_i e_i)``
    truncated to ``dimension``: the survivors' clipped updates, plus the rounding error (each
    site's < 1 unit per rotated coordinate, so its L2 norm is < ``survivors * gamma * sqrt(D)``),
    plus the noise (std ``noise_std`` per coordinate). Decoding is post-processing: it does not
    change the privacy guarantee, which needs ``survivors >= threshold``.

    Errors: ThresholdError if ``survivors < threshold`` (the noise is smaller than planned; nothing
    is decoded); ConfigError if ``survivors`` is not an integer in [1, num_sites];
    InvalidUpdateError if ``modular_sum`` is not a 1-D array of ``cfg.dtype`` and length
    ``padded_dimension``.
    """
    if not isinstance(cfg, DistributedDPConfig):
        raise ConfigError(f"cfg must be a DistributedDPConfig, got {type(cfg).__name__}")
    s = _check_survivors(cfg, survivors)
    if s < cfg.threshold:
        raise ThresholdError(
            f"survivors={s} is below the distributed DP threshold={cfg.threshold}: the sum holds "
            "less noise than planned and is not released"
        )
    dim = cfg.padded_dimension
    if (
        not isinstance(modular_sum, np.ndarray)
        or modular_sum.dtype != cfg.dtype
        or modular_sum.shape != (dim,)
    ):
        raise InvalidUpdateError(
            f"modular_sum must be a 1-D numpy array of dtype {np.dtype(cfg.dtype).name} and "
            f"length {dim}, got {getattr(modular_sum, 'dtype', type(modular_sum).__name__)} "
            f"{getattr(modular_sum, 'shape', '')}"
        )
    signed = modular_sum.view(np.int32 if cfg.bits == 32 else np.int64)
    magnitude = np.abs(signed.astype(np.float64))
    edge = float((1 << (cfg.bits - 1)) - 1)
    near_edge = int(np.count_nonzero(magnitude >= edge))
    plan = cfg.plan
    planned = cfg.k_stddevs * _range_std(cfg, plan.gamma, s)
    beyond = int(np.count_nonzero(magnitude > planned))
    lifted = signed.astype(np.float64)
    lifted *= plan.gamma
    values = unrotate(lifted, rotation_seed, dimension=cfg.dimension)
    noise_std = cfg.noise_multiplier * cfg.clip * math.sqrt(s / cfg.threshold)
    return DecodedSum(
        values=values, survivors=s, noise_std=noise_std, near_edge=near_edge, beyond_range=beyond
    )
