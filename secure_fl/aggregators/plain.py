"""The baseline: plain weighted FedAvg mean, with no protection (the server sees every update)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np

from secure_fl.aggregators.base import (
    AggregationReport,
    AggregationResult,
    Aggregator,
    Updates,
    check_l2_clip,
    prepare,
)
from secure_fl.encoding import l2_clip, unflatten


class PlainAggregator(Aggregator):
    """Weighted mean in float64, no encoding, no masking.

    ``l2_clip`` (optional) clips each whole update to that L2 norm first; clipped updates are counted
    in the report under ``clipped_updates``. ``bytes_sent`` is each site's update in float32. The
    report has the keys of :class:`~secure_fl.aggregators.base.AggregationReport`; those of the
    protocols (threshold, bits, preset, ...) are None.
    """

    name = "plain"

    def __init__(self, *, l2_clip: float | None = None) -> None:
        self.l2_clip = check_l2_clip(l2_clip)

    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> AggregationResult:
        start = time.perf_counter()
        prepared = prepare(updates, weights, dropped)
        survivors = prepared.survivors
        total = np.zeros(prepared.spec.size, dtype=np.float64)
        clipped_updates: list[str] = []
        for site in survivors:
            vector = prepared.vectors[site]
            if self.l2_clip is not None:
                vector, info = l2_clip(vector, self.l2_clip)
                if info.clipped:
                    clipped_updates.append(site)
            total += prepared.weights[site] * vector
        total /= sum(prepared.weights[s] for s in survivors)
        report = AggregationReport(
            aggregator=self.name,
            included=list(survivors),
            dropped=sorted(prepared.dropped),
            clipped=dict.fromkeys(prepared.sites, 0),
            clipped_total=0,
            clipped_updates=clipped_updates,
            bytes_sent={s: 4 * prepared.spec.size for s in survivors},
            seconds=time.perf_counter() - start,
            max_error=0.0,
            max_rel_error=0.0,
            expansion=1.0,
        )
        return AggregationResult(unflatten(total, prepared.spec), report.as_dict())
