"""The baseline: plain weighted FedAvg mean, with no protection (the server sees every update)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from secure_fl.aggregators.base import (
    AggregationReport,
    AggregationResult,
    Aggregator,
    Updates,
    prepare,
)
from secure_fl.encoding import unflatten
from secure_fl.errors import ConfigError
from secure_fl.rounds.local import run_local
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.secagg import Phase


class PlainAggregator(Aggregator):
    """Weighted mean in float64, no encoding, no masking.

    A thin driver of the round layer (:class:`~secure_fl.rounds.plain.PlainSiteRound` and
    :class:`~secure_fl.rounds.plain.PlainServerRound`, run by :func:`secure_fl.rounds.run_local`).
    ``l2_clip`` (optional) clips each whole update to that L2 norm first; clipped updates are counted
    in the report under ``clipped_updates``. ``bytes_sent`` is each site's update in float32. The
    report has the keys of :class:`~secure_fl.aggregators.base.AggregationReport`; those of the
    protocols (threshold, bits, preset, ...) are None.

    Errors: ConfigError for an invalid ``l2_clip``.
    """

    name = "plain"

    def __init__(self, *, l2_clip: float | None = None) -> None:
        self.spec = AggregationSpec.from_options("plain", {"l2_clip": l2_clip}, where="options")
        self.l2_clip = self.spec.l2_clip
        self._round = 0

    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> AggregationResult:
        start = time.perf_counter()
        prepared = prepare(updates, weights, dropped)
        ids = {site: index + 1 for index, site in enumerate(prepared.sites)}
        names = {i: s for s, i in ids.items()}
        plan = plan_round(
            self.spec,
            {ids[s]: prepared.weights[s] for s in prepared.sites},
            vector_length=prepared.spec.size,
            round_id=self._round,
        )
        self._round += 1
        outcome = run_local(
            plan,
            {ids[s]: prepared.vectors[s] for s in prepared.sites},
            dropouts={ids[s]: Phase.MASKED_INPUT for s in prepared.dropped},
        )
        if outcome.mean is None:  # a plain round always computes its mean
            raise ConfigError("the round produced no mean")
        survivors = [names[i] for i in sorted(outcome.survivors)]
        report = AggregationReport(
            aggregator=self.name,
            included=survivors,
            dropped=sorted(prepared.dropped),
            clipped=dict.fromkeys(prepared.sites, 0),
            clipped_total=0,
            clipped_updates=[names[i] for i in outcome.record["clipped_updates"]],
            bytes_sent={s: 4 * prepared.spec.size for s in survivors},
            seconds=time.perf_counter() - start,
            max_error=0.0,
            max_rel_error=0.0,
            expansion=1.0,
        )
        return AggregationResult(unflatten(outcome.mean, prepared.spec), report.as_dict())
