"""Differential privacy as wrappers around any aggregator (clip -> noise -> quantise -> secure sum).

As TensorFlow Federated's DP factories wrap an inner aggregation, each wrapper here owns one job
and leaves the secure sum to the aggregator it wraps:

* :class:`CentralGaussian` -- every update is L2-clipped to ``clip`` (counted), the inner
  aggregator (plain, secagg, secagg+, ckks) computes the weighted mean, and the wrapper adds
  Gaussian noise to it: std ``noise_multiplier * clip`` on the sum, i.e. ``noise_multiplier *
  clip * max(w) / sum(w)`` on the weighted mean of the survivors (the sensitivity of that mean to
  one site's update replaced by zero). Whoever runs the wrapper sees the exact mean first: trust
  ``central``.
* :class:`DistributedNoise` -- each site adds its share of discrete Gaussian / Skellam noise to
  its encoded integers before masking, through the round layer's NoiseHook on its SecAgg site
  half (:func:`secure_fl.rounds.local.run_local`): on the round's fixed-point integers
  (:mod:`secure_fl.privacy.codec_noise`, exactly what a gRPC site does), or as the DDG encoding
  of :mod:`secure_fl.privacy.distributed` (clip, rotate, round, noise; the modular sum is
  decoded by :func:`decode_sum`: what simulated DP-FedAvg accounts). Sized so that the ``t - c``
  honest survivors alone add the full noise; nobody sees a less noisy sum.

:class:`DistributedNoise` lives in :mod:`secure_fl.aggregators.dp_distributed`, the shared
event, result and noise source in :mod:`secure_fl.aggregators.dp_event`; every name is importable
from here.

Each wrapper returns a :class:`DPResult`: the inner aggregator's result with the noised mean and
the frozen :class:`DPEvent` it applied, which the privacy ledger records.

Randomness: the noise comes from a generator seeded with fresh bits of ``os.urandom`` for every
call; ``seed=`` (named reproducible research runs only, ``noise_source = "seeded"``) derives it
from the seed and the wrapper's call counter instead -- anyone who knows the seed can subtract it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from secure_fl.aggregators.base import (
    Aggregator,
    Updates,
    prepare,
)
from secure_fl.aggregators.dp_distributed import DistributedNoise
from secure_fl.aggregators.dp_event import (
    NOISE_SOURCES,
    DPEvent,
    DPResult,
    _check_positive,
    _NoiseSource,
)
from secure_fl.encoding import flatten, l2_clip, unflatten
from secure_fl.errors import ConfigError


class CentralGaussian(Aggregator):
    """Clip each update, aggregate with ``inner``, add Gaussian noise to the mean (module doc).

    Guarantee: one application of the Gaussian mechanism with multiplier ``noise_multiplier`` on
    the survivors' weighted sum under zero-out adjacency (one site's update replaced by zero),
    against everyone who sees only the result; not against whoever runs the wrapper.

    Errors: ConfigError for ``clip`` not > 0, ``noise_multiplier`` not >= 0, a bad seed; the
    inner aggregator's errors.
    """

    def __init__(
        self,
        inner: Aggregator,
        *,
        clip: float,
        noise_multiplier: float,
        seed: int | None = None,
    ) -> None:
        if not isinstance(inner, Aggregator):
            raise ConfigError(f"inner must be an Aggregator, got {type(inner).__name__}")
        self.inner = inner
        self.name = inner.name
        self.clip = _check_positive("clip", clip)
        self.noise_multiplier = _check_positive(
            "noise_multiplier", noise_multiplier, allow_zero=True
        )
        self._noise = _NoiseSource(seed)

    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> DPResult:
        prepared = prepare(updates, weights, dropped)
        clipped: dict[str, Any] = {}
        changed: list[str] = []
        for site in prepared.sites:
            vector, info = l2_clip(prepared.vectors[site], self.clip)
            if info.clipped:
                changed.append(site)
            clipped[site] = unflatten(vector, prepared.spec)
        result = self.inner.aggregate(
            clipped, dict(prepared.weights) if weights is not None else None, dropped=dropped
        )
        mean, _ = flatten(result.mean)
        survivors = list(result.report.get("included") or prepared.survivors)
        surviving = [prepared.weights[s] for s in survivors]
        std_sum = self.noise_multiplier * self.clip
        std_mean = std_sum * max(surviving) / sum(surviving)
        noise = self._noise.generator().normal(0.0, 1.0, mean.shape) * std_mean
        event = DPEvent(
            mechanism="gaussian",
            trust="central",
            noise_multiplier=self.noise_multiplier,
            nominal_noise_multiplier=self.noise_multiplier,
            clip=self.clip,
            noise_std=std_sum,
            survivors=len(survivors),
            noise_source=self._noise.name,
            clipped_updates=tuple(changed),
        )
        report = {**result.report, "clipped_updates": changed}
        return DPResult(unflatten(mean + noise, prepared.spec), report, event)


__all__ = ["NOISE_SOURCES", "CentralGaussian", "DPEvent", "DPResult", "DistributedNoise"]
