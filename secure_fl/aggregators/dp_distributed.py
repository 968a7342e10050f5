"""Distributed DP noise (:mod:`secure_fl.aggregators.dp`): :class:`DistributedNoise`, each site
adding its share of discrete Gaussian / Skellam noise to its encoded integers before masking,
sized so that the ``t - c`` honest survivors alone add the full noise.

Errors: ConfigError naming the argument out of range or the mismatched ring.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np

from secure_fl.aggregators.base import (
    Aggregator,
    Updates,
    prepare,
)
from secure_fl.aggregators.dp_event import (
    DPEvent,
    DPResult,
    _clipped,
    _NoiseSource,
)
from secure_fl.encoding import unflatten
from secure_fl.errors import ConfigError
from secure_fl.privacy.codec_noise import CodecNoiseConfig, NoiseHook, make_noise_hook
from secure_fl.privacy.distributed import (
    DistributedDPConfig,
    decode_sum,
    effective_noise_multiplier,
    encode_site,
)


class DistributedNoise(Aggregator):
    """Distributed discrete Gaussian / Skellam noise under SecAgg / SecAgg+ (module docstring).

    ``inner`` is the masked aggregator whose round specification (protocol, threshold, k,
    dropout_rate, corrupt_fraction, active) the secure sum uses; ``config`` the round's noise:

    * a :class:`~secure_fl.privacy.codec_noise.CodecNoiseConfig` -- every site's round half adds
      its share to its fixed-point integers through the round layer's NoiseHook (exactly what a
      gRPC site does); weights are allowed (the noise is sized for the largest);
    * a :class:`~secure_fl.privacy.distributed.DistributedDPConfig` (DDG: clip, rotate, round,
      noise; what the simulated DP-FedAvg accounts) -- the share is the site's whole input: the
      round half encodes a zero vector of the padded length (exactly 0 in any codec) and its hook
      adds the share; the server's modular sum is decoded by :func:`decode_sum`. Unweighted:
      ``weights`` must be None or equal.

    ``config.threshold`` must be the honest survivors ``t - c``
    (:func:`~secure_fl.privacy.distributed.honest_noise_threshold`); ``colluders`` is ``c``;
    ``round_id`` the protocol round id of the first call (then one more per call).

    Guarantee: the server sees only the modular sum of the survivors' noised shares; with at least
    the honest shares the noise is sized for it holds the full noise, against the server and up to
    ``c`` colluding sites. Errors: ConfigError when ``inner`` is not secagg / secagg+, ``config``
    does not match the round, or the SecAgg threshold minus ``colluders`` is below the noise
    threshold; PolicyError from a site's hook; ThresholdError when too few sites survive.
    """

    def __init__(
        self,
        inner: Aggregator,
        config: DistributedDPConfig | CodecNoiseConfig,
        *,
        seed: int | None = None,
        colluders: int | None = None,
        round_id: int = 0,
    ) -> None:
        from secure_fl.aggregators.masked import MaskedAggregator

        if not isinstance(inner, MaskedAggregator):
            raise ConfigError(
                "DistributedNoise needs a secagg or secagg+ aggregator: the noise shares must be "
                f"masked, got {type(inner).__name__}"
            )
        if not isinstance(config, DistributedDPConfig | CodecNoiseConfig):
            raise ConfigError(
                f"config must be a DistributedDPConfig or CodecNoiseConfig, got "
                f"{type(config).__name__}"
            )
        if colluders is None:
            colluders = config.colluders if isinstance(config, CodecNoiseConfig) else 0
        self.inner = inner
        self.name = inner.name
        self.config = config
        self.colluders = int(colluders)
        self._noise = _NoiseSource(seed)
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise ConfigError(f"round_id must be an integer >= 0, got {round_id!r}")
        self._round = round_id

    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> DPResult:
        from secure_fl.crypto import SigningKey
        from secure_fl.rounds.local import run_local
        from secure_fl.rounds.plan import plan_round
        from secure_fl.secagg import Phase

        cfg = self.config
        prepared = prepare(updates, weights, dropped, min_sites=2)
        sites = prepared.sites
        if len(sites) != cfg.num_sites or prepared.spec.size != cfg.dimension:
            raise ConfigError(
                f"config is for num_sites={cfg.num_sites}, dimension={cfg.dimension}; the round "
                f"has {len(sites)} sites and {prepared.spec.size} values"
            )
        ids = {site: i + 1 for i, site in enumerate(sites)}
        names = {i: s for s, i in ids.items()}
        vectors = {ids[s]: prepared.vectors[s] for s in sites}
        rb = os.urandom if self._noise.seed is None else self._noise.randbytes
        keys = {i: SigningKey.generate(rb) for i in names} if self.inner.active else None
        if isinstance(cfg, CodecNoiseConfig):
            spec = dataclasses.replace(self.inner.spec, l2_clip=cfg.clip)
            length, bound = cfg.dimension, cfg.to_json().encode()
            inputs = vectors
            hooks = {i: make_noise_hook(cfg, rng=self._seeded(i)) for i in names}
            rotation_seed = b""
        else:
            if len(set(prepared.weights.values())) > 1:
                raise ConfigError("a DistributedDPConfig sums unweighted: weights must be equal")
            # The DDG share is the whole input: the codec encodes zeros (exactly 0) at the
            # padded length in the noise's ring, and the hook adds the share.
            spec = dataclasses.replace(
                self.inner.spec, bits=cfg.bits, clip_range=1.0, precision=0.5, l2_clip=None
            )
            length, bound = cfg.padded_dimension, b""
            rotation_seed = self._noise.randbytes(32)  # public per round, shared by the sites
            inputs = {i: np.zeros(length) for i in names}
            hooks = {}
            for i, vector in vectors.items():
                share = encode_site(vector, cfg, rotation_seed=rotation_seed, rng=self._seeded(i))
                hooks[i] = _share_hook(share.values)
        plan = plan_round(
            spec,
            {i: prepared.weights[names[i]] for i in names},
            vector_length=length,
            round_id=self._round,
            verify_keys={i: k.public_bytes for i, k in keys.items()} if keys else None,
            extra_binding=bound,
        )
        self._round += 1
        if plan.secagg is None:  # pragma: no cover - a masked spec always plans SecAgg
            raise ConfigError("the round planned no secure aggregation")
        honest = cfg.honest_threshold if isinstance(cfg, CodecNoiseConfig) else cfg.threshold
        if plan.secagg.threshold - self.colluders < honest:
            raise ConfigError(
                f"the SecAgg threshold {plan.secagg.threshold} minus colluders={self.colluders} "
                f"is below the {honest} honest shares the noise was sized for: fewer could be "
                "released"
            )
        outcome = run_local(
            plan,
            inputs,
            dropouts={ids[s]: Phase.MASKED_INPUT for s in prepared.dropped},
            signing_keys=keys,
            randbytes=rb,
            noise=hooks,
        )
        survivors = [names[i] for i in sorted(outcome.survivors)]
        record = dict(outcome.record)
        if isinstance(cfg, CodecNoiseConfig):
            if outcome.mean is None:  # pragma: no cover - a SecAgg outcome has a mean
                raise ConfigError("the round produced no mean")
            mean = np.asarray(outcome.mean, dtype=np.float64)
            w_max = max(plan.normalised.values())
            noise_std = cfg.noise_multiplier * cfg.clip * w_max * math.sqrt(len(survivors) / honest)
            effective = cfg.effective_noise_multiplier()
            changed = [names[i] for i in record.get("clipped_updates", [])]
        else:
            if outcome.total is None:  # pragma: no cover - a SecAgg outcome has a total
                raise ConfigError("the round produced no modular sum")
            decoded = decode_sum(
                outcome.total, cfg, rotation_seed=rotation_seed, survivors=len(survivors)
            )
            mean = np.asarray(decoded.values, dtype=np.float64) / len(survivors)
            noise_std = decoded.noise_std
            effective = effective_noise_multiplier(cfg, cfg.threshold)
            changed = [s for s in sites if _clipped(prepared.vectors[s], cfg.clip)]
            record.update(beyond_range=decoded.beyond_range, padded_dimension=length)
        event = DPEvent(
            mechanism=cfg.mechanism,
            trust="distributed",
            noise_multiplier=effective,
            nominal_noise_multiplier=cfg.noise_multiplier,
            clip=cfg.clip,
            noise_std=noise_std,
            survivors=len(survivors),
            noise_source=self._noise.name,
            threshold=plan.secagg.threshold,
            honest_survivors=honest,
            colluders=self.colluders,
            clipped_updates=tuple(changed),
        )
        report = {
            "aggregator": f"{plan.secagg.protocol}+{cfg.mechanism}",
            "included": survivors,
            "dropped": sorted(names[i] for i in outcome.dropped),
            "threshold": plan.secagg.threshold,
            "noise_threshold": honest,
            "colluders": self.colluders,
            "bits": plan.secagg.bits,
            "noise_std": noise_std,
            "clipped_updates": changed,
            "bytes_sent": {names[i]: n for i, n in record.get("bytes_sent", {}).items()},
            "beyond_range": record.get("beyond_range"),
            "padded_dimension": record.get("padded_dimension"),
        }
        return DPResult(unflatten(mean, prepared.spec), report, event)

    def _seeded(self, site: int) -> np.random.Generator:
        """The noise generator of ``site``: seeded with fresh ``os.urandom`` bits, or with a
        named seed derived from it and the call counter."""
        return self._noise.generator(site)


def _share_hook(share: np.ndarray) -> NoiseHook:
    """A hook returning ``values + share`` modulo the ring (``values`` encode zeros)."""

    def hook(values: np.ndarray, setup: object) -> np.ndarray:
        del setup
        if values.dtype != share.dtype or values.shape != share.shape:
            raise ConfigError("the round's ring or length differs from the DDG share's")
        out: np.ndarray = values + share
        return out

    return hook
