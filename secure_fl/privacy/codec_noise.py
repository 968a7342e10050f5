"""Distributed DP noise on the integers of a secure-aggregation round (the round layer's NoiseHook).

The round layer (:mod:`secure_fl.rounds`) encodes each site's L2-clipped update ``x_i`` with the
round's fixed-point codec: ``round(w_i * x_i * 2**f)`` (``w_i`` the site's normalised weight,
``f`` the plan's ``frac_bits``, unbiased stochastic rounding) modulo ``2**bits``. With distributed
DP every site then adds, before masking, an integer noise share ``e_i`` (discrete Gaussian or
Skellam, per coordinate) drawn from the OS CSPRNG. The server learns only the modular sum, so it
sees the survivors' weighted sum plus the survivors' noise, and decodes it exactly as without
noise (the noise passes through the codec's decoding and the division by the surviving weight,
which are post-processing). No party sees a less noisy aggregate.

**Sizing.** With ``a = clip * w_max * 2**f`` (integer units; ``w_max`` the largest normalised
weight of the round) every site's share has ``sigma_site = z * a / sqrt(h)``: any ``h = t - c``
honest shares (``t`` the SecAgg threshold, ``c`` the sites that may collude with the server and
subtract their own shares, :func:`secure_fl.privacy.distributed.honest_noise_threshold`) together
add noise of std ``z * a``, the central Gaussian mechanism with multiplier ``z`` on the weighted
sum, whose sensitivity (one site's update replaced by zero) is at most ``a`` before rounding.

**Accounting.** Unconditioned stochastic rounding moves each coordinate by less than 1, so the
rounded vector's L2 sensitivity is at most ``a + sqrt(D)`` (``D`` the vector length). The hook
refuses a plan with ``a < sqrt(D) / max_rounding_inflation`` (so the sensitivity is at most
``(1 + max_rounding_inflation) * a``), a share beyond the samplers' exact range, and a plan whose
modulus cannot hold the signal plus ``k_stddevs`` standard deviations of the noise.
:meth:`CodecNoiseConfig.effective_noise_multiplier` is the Gaussian-equivalent multiplier
(DDG Theorem 1 / Skellam RDP bound, :func:`~secure_fl.privacy.distributed.
gaussian_equivalent_noise_multiplier`) evaluated at the smallest ``a`` the hook accepts; it is a
valid lower bound for every accepted plan (the bound grows with ``a``), so it can be written to the
ledger before the round is planned. An RDP statement: account with RDP (Skellam at integer orders).

The configuration travels to the sites as canonical JSON (:meth:`CodecNoiseConfig.to_json`, the
``SecAggSetup.distributed_dp_json`` field) and is bound into the round's keys, so sites shown
different noise cannot complete a round together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.privacy.discrete import (
    DG_SIGMA_MAX,
    POISSON_MU_MAX,
    sample_discrete_gaussian,
    sample_skellam,
)
from secure_fl.privacy.distributed import MECHANISMS, gaussian_equivalent_noise_multiplier

__all__ = ["KIND", "CodecNoiseConfig", "NoiseHook", "PlanParts", "make_noise_hook", "plan_parts"]

#: The ``kind`` tag of the JSON form (other distributed-noise encodings may follow).
KIND = "codec_noise/v1"
#: Largest per-site noise std each sampler is trusted with (see secure_fl.privacy.discrete).
_SIGMA_CAP = {"discrete_gaussian": DG_SIGMA_MAX, "skellam": math.sqrt(2.0 * POISSON_MU_MAX)}

#: ``hook(values, plan) -> values``: adds this site's noise share to its encoded integers.
NoiseHook = Callable[[npt.NDArray[np.unsignedinteger[Any]], Any], npt.NDArray[Any]]


def _real(name: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"distributed_dp.{name} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and low < v <= high):
        raise ConfigError(f"distributed_dp.{name} must be in ({low:g}, {high:g}], got {value!r}")
    return v


def _int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < low:
        raise ConfigError(f"distributed_dp.{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PlanParts:
    """What the noise needs from a round: the ring, the codec scale, the no-wrap bound of the
    signal, the participants, the SecAgg threshold, the L2 bound the sites apply and the JSON of
    the noise the round is bound to (None where the source does not say)."""

    bits: int
    frac_bits: int
    max_abs_sum: int
    max_weight: float
    num_sites: int
    vector_length: int | None = None
    threshold: int | None = None
    l2_clip: float | None = None
    noise_json: str | None = None


def plan_parts(plan: Any) -> PlanParts:
    """Read :class:`PlanParts` from the ``SecAggSetup`` a site accepted (what the round layer
    passes to a NoiseHook), a ``RoundPlan`` or a PlanParts.

    Errors: ConfigError when ``plan`` is none of these (e.g. a CKKS or plain round: distributed
    noise needs secure aggregation)."""
    if isinstance(plan, PlanParts):
        return plan
    from secure_fl.encoding.quantize import encoded_bound

    try:
        bit_plan = getattr(plan, "bit_plan", None)
        if bit_plan is not None:  # a RoundPlan
            spec = plan.spec
            secagg = plan.secagg
            normalised = [float(w) for w in plan.normalised.values()]
            return PlanParts(
                bits=int(bit_plan.bits),
                frac_bits=int(bit_plan.frac_bits),
                max_abs_sum=int(bit_plan.max_abs_sum),
                max_weight=max(normalised),
                num_sites=len(normalised),
                vector_length=int(plan.vector_length),
                threshold=int(secagg.threshold) if secagg is not None else None,
                l2_clip=spec.l2_clip,
                noise_json=plan.extra_binding.decode("utf-8") if plan.extra_binding else "",
            )
        from secure_fl.rounds.plan import normalise_weights

        weights = normalise_weights(dict(plan.weights))  # a SecAggSetup
        return PlanParts(
            bits=int(plan.bits),
            frac_bits=int(plan.frac_bits),
            max_abs_sum=sum(
                encoded_bound(float(plan.clip_range), int(plan.frac_bits), w)
                for w in weights.values()
            ),
            max_weight=max(weights.values()),
            num_sites=len(plan.site_ids),
            vector_length=int(plan.vector_length),
            threshold=int(plan.threshold),
            l2_clip=plan.l2_clip,
            noise_json=str(plan.distributed_dp_json),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(
            "distributed DP noise needs a secure-aggregation setup or plan (bits, frac_bits, "
            f"weights, threshold): {exc}"
        ) from exc


@dataclass(frozen=True)
class CodecNoiseConfig:
    """One round's distributed-noise parameters (see the module docstring).

    * ``mechanism`` -- ``"discrete_gaussian"`` or ``"skellam"``;
    * ``clip`` -- the L2 bound on every site's update (the round's ``l2_clip``), > 0;
    * ``noise_multiplier`` -- nominal ``z`` >= 0 (0: no noise, tests only);
    * ``honest_threshold`` -- ``h = t - c`` in [1, num_sites]: the honest shares the noise is
      sized for; ``threshold`` (``t``) and ``colluders`` (``c``) are recorded beside it;
    * ``num_sites`` -- participants of the round; ``dimension`` -- the vector length ``D``;
    * ``max_rounding_inflation`` in (0, 1]; ``k_stddevs`` > 0 (modular headroom).

    Errors: ConfigError naming ``distributed_dp.<field>`` and the allowed range.
    """

    mechanism: str
    clip: float
    noise_multiplier: float
    honest_threshold: int
    threshold: int
    colluders: int
    num_sites: int
    dimension: int
    max_rounding_inflation: float = 0.01
    k_stddevs: float = 4.0

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigError(
                f"distributed_dp.mechanism must be one of {MECHANISMS}, got {self.mechanism!r}"
            )
        object.__setattr__(self, "clip", _real("clip", self.clip, low=0.0))
        if self.noise_multiplier != 0:
            _real("noise_multiplier", self.noise_multiplier, low=0.0)
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        n = _int("num_sites", self.num_sites, low=1)
        object.__setattr__(self, "num_sites", n)
        object.__setattr__(self, "dimension", _int("dimension", self.dimension, low=1))
        object.__setattr__(self, "colluders", _int("colluders", self.colluders, low=0))
        t = _int("threshold", self.threshold, low=1)
        h = _int("honest_threshold", self.honest_threshold, low=1)
        if not h <= t <= n or h != t - self.colluders:
            raise ConfigError(
                f"distributed_dp: need honest_threshold = threshold - colluders with 1 <= "
                f"honest_threshold <= threshold <= num_sites={n}, got honest_threshold={h}, "
                f"threshold={t}, colluders={self.colluders}"
            )
        object.__setattr__(self, "threshold", t)
        object.__setattr__(self, "honest_threshold", h)
        object.__setattr__(
            self,
            "max_rounding_inflation",
            _real("max_rounding_inflation", self.max_rounding_inflation, low=0.0, high=1.0),
        )
        object.__setattr__(self, "k_stddevs", _real("k_stddevs", self.k_stddevs, low=0.0))

    # -- wire form ------------------------------------------------------------------------------

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace) with ``"kind": KIND``: the bytes bound
        into the round and sent to the sites."""
        body = {"kind": KIND, **dataclasses.asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CodecNoiseConfig:
        """Parse :meth:`to_json`. Errors: ConfigError for malformed JSON, another ``kind``, an
        unknown or missing field, or an out-of-range value (naming it)."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"distributed_dp JSON is malformed: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ConfigError(f"distributed_dp JSON must be an object with kind {KIND!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k != "kind"}
        unknown, missing = sorted(set(fields) - known), sorted(known - set(fields))
        if unknown or missing:
            raise ConfigError(
                f"distributed_dp JSON: unknown field(s) {unknown}, missing field(s) {missing}"
            )
        return cls(**fields)

    # -- sizing -----------------------------------------------------------------------------------

    def min_scaled_clip(self) -> float:
        """The smallest ``a = clip * w_max * 2**frac_bits`` a plan may have (rounding bound)."""
        return math.sqrt(self.dimension) / self.max_rounding_inflation

    def sigma_site(self, parts: PlanParts) -> float:
        """Each site's noise std in integer units for the plan: ``z * a / sqrt(h)``."""
        a = self.clip * parts.max_weight * 2.0**parts.frac_bits
        return self.noise_multiplier * a / math.sqrt(self.honest_threshold)

    def check_plan(self, plan: Any) -> float:
        """Check that ``plan`` can carry this noise; returns ``sigma_site``.

        Errors: PolicyError (the site sends nothing) when the round is bound to other noise JSON,
        its vector length differs from ``dimension``, it has more than ``num_sites``
        participants, its SecAgg
        threshold is below ``threshold``, it clips updates above ``clip`` (or not at all), its codec is too coarse for the rounding bound (``a < sqrt(D) /
        max_rounding_inflation``: lower aggregation.precision), the share is beyond the sampler's
        exact range (raise aggregation.precision), or the modulus cannot hold the signal plus
        ``k_stddevs`` noise standard deviations of every participant (use aggregation.bits = 64).
        """
        parts = plan_parts(plan)
        if parts.noise_json is not None and parts.noise_json != self.to_json():
            raise PolicyError("the round is bound to other distributed-DP noise than this hook's")
        if parts.vector_length is not None and int(parts.vector_length) != self.dimension:
            raise PolicyError(
                f"distributed_dp.dimension={self.dimension} differs from the round's vector "
                f"length {parts.vector_length}"
            )
        if parts.num_sites > self.num_sites:
            raise PolicyError(
                f"the round has {parts.num_sites} participants, more than the "
                f"distributed_dp.num_sites={self.num_sites} the modulus was checked for"
            )
        if parts.threshold is not None and parts.threshold < self.threshold:
            raise PolicyError(
                f"the round's SecAgg threshold {parts.threshold} is below the "
                f"distributed_dp.threshold={self.threshold} the noise was sized for"
            )
        if parts.l2_clip is not None and parts.l2_clip > self.clip:
            raise PolicyError(
                f"the round clips updates at l2_clip={parts.l2_clip:g}, above the "
                f"distributed_dp.clip={self.clip:g} the noise was sized for"
            )
        if parts.l2_clip is None:
            raise PolicyError(
                "the round applies no L2 clip: distributed noise needs every update clipped to "
                f"distributed_dp.clip={self.clip:g}"
            )
        a = self.clip * parts.max_weight * 2.0**parts.frac_bits
        if a < self.min_scaled_clip():
            raise PolicyError(
                f"the round's codec is too coarse for distributed noise: clip x w_max x "
                f"2**frac_bits = {a:.4g} < sqrt(D)/max_rounding_inflation = "
                f"{self.min_scaled_clip():.4g}; lower aggregation.precision"
            )
        sigma = self.sigma_site(parts)
        cap = _SIGMA_CAP[self.mechanism]
        if sigma > cap:
            raise PolicyError(
                f"per-site {self.mechanism} noise std {sigma:.4g} exceeds the sampler's exact "
                f"range {cap:.4g}; raise aggregation.precision (fewer frac_bits)"
            )
        limit = float((1 << (parts.bits - 1)) - 1)
        need = parts.max_abs_sum + self.k_stddevs * sigma * math.sqrt(self.num_sites)
        if need > limit:
            raise PolicyError(
                f"bits={parts.bits} cannot hold the sum ({parts.max_abs_sum}) plus "
                f"{self.k_stddevs:g} standard deviations of {self.num_sites} noise shares "
                f"({need:.4g} > {limit:.4g}); use aggregation.bits = 64 or a coarser precision"
            )
        return sigma

    def effective_noise_multiplier(self, honest: int | None = None) -> float:
        """Gaussian-equivalent multiplier of the aggregate noise of ``honest`` shares (default
        ``honest_threshold``) for EVERY plan :meth:`check_plan` accepts (module docstring).
        0.0 when ``noise_multiplier`` is 0. Errors: ConfigError when ``honest`` < 1."""
        h = self.honest_threshold if honest is None else _int("honest", honest, low=1)
        if self.noise_multiplier == 0.0:
            return 0.0
        a = self.min_scaled_clip()
        sigma = self.noise_multiplier * a / math.sqrt(self.honest_threshold)
        return gaussian_equivalent_noise_multiplier(
            self.mechanism,
            l2_sensitivity=a * (1.0 + self.max_rounding_inflation),
            dimension=self.dimension,
            sigma_site=sigma,
            survivors=h,
        )


def make_noise_hook(
    config: CodecNoiseConfig, *, rng: np.random.Generator | None = None
) -> NoiseHook:
    """The NoiseHook a site passes to its secure-aggregation round half.

    Guarantee: ``hook(values, plan)`` checks ``plan`` (:meth:`CodecNoiseConfig.check_plan`,
    PolicyError before anything is sent) and returns ``(values + e) mod 2**bits`` with ``e`` this
    site's fresh share (per coordinate ``N_Z(0, sigma**2)`` or Skellam of variance ``sigma**2``),
    drawn from ``rng`` -- by default a generator seeded with 256 fresh bits from ``os.urandom`` at
    every call; pass a seeded ``rng`` only in named reproducible research runs. The input array is
    not modified. Errors: PolicyError as above; ConfigError for a values array that is not a 1-D
    uint32/uint64 vector of the plan's ring and length.
    """

    def hook(values: npt.NDArray[np.unsignedinteger[Any]], plan: Any) -> npt.NDArray[Any]:
        sigma = config.check_plan(plan)
        parts = plan_parts(plan)
        dtype = np.uint32 if parts.bits == 32 else np.uint64
        if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype != dtype:
            raise ConfigError(
                f"noise hook: values must be a 1-D {np.dtype(dtype).name} vector, got "
                f"{getattr(values, 'dtype', type(values).__name__)}"
            )
        if values.shape[0] != config.dimension:
            raise ConfigError(
                f"noise hook: values have length {values.shape[0]}, distributed_dp.dimension "
                f"is {config.dimension}"
            )
        if config.noise_multiplier == 0.0:
            return values.copy()
        gen = (
            rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        )
        if config.mechanism == "discrete_gaussian":
            noise = sample_discrete_gaussian(sigma, config.dimension, gen)
        else:
            noise = sample_skellam(sigma * sigma / 2.0, config.dimension, gen)
        # two's complement: adding the int64 noise modulo 2**bits
        if parts.bits == 32:
            out: npt.NDArray[Any] = (values.astype(np.int64) + noise).astype(np.uint32)
            return out
        return values + noise.view(np.uint64)

    return hook
