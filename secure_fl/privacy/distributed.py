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

Layout: the configuration and its plan live in :mod:`secure_fl.privacy.distributed_plan`, the
accounting in :mod:`secure_fl.privacy.distributed_accounting`, the site's encoding and the
server's decoding here; every public name is importable from this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.encoding.clip import l2_clip
from secure_fl.errors import ConfigError, InvalidUpdateError, ThresholdError
from secure_fl.privacy.discrete import (
    MAX_ROUNDING_RETRIES,
    RoundingError,
    conditional_randomized_round,
    rounded_l2_bound,
    sample_discrete_gaussian,
    sample_skellam,
)
from secure_fl.privacy.distributed_accounting import (
    MECHANISMS,
    _check_survivors,
    distributed_rdp,
    effective_noise_multiplier,
    gaussian_equivalent_noise_multiplier,
    honest_noise_threshold,
    l2_sensitivity,
)
from secure_fl.privacy.distributed_plan import (
    DistributedDPConfig,
    DistributedPlan,
    FloatArray,
    _range_std,
    plan_distributed_bits,
)
from secure_fl.privacy.rotation import rotate, unrotate

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
