"""Masked secure aggregation (SecAgg and SecAgg+) behind the aggregator interface.

Each site clips its update (optionally in L2, and always per coordinate to ``clip_range``), scales it
by its normalised weight, encodes it in fixed point with unbiased stochastic rounding into
``Z_{2^bits}`` and runs one SecAgg / SecAgg+ round. The server learns only the modular sum of the
survivors' encodings, which decodes to their weighted sum; it divides by the survivors' total weight.

Site weights (sample counts) are public to the server, as in FedAvg. The recipe lives once in
:mod:`secure_fl.rounds` (plan, site half, server half); this module only drives it in process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from secure_fl.aggregators.base import (
    AggregationReport,
    AggregationResult,
    Aggregator,
    Updates,
    prepare,
    warn_clipped,
)
from secure_fl.crypto import DeterministicRandom
from secure_fl.encoding import unflatten
from secure_fl.errors import ConfigError
from secure_fl.rounds.local import run_local
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.secagg import Phase


class MaskedAggregator(Aggregator):
    """SecAgg (complete graph) or SecAgg+ (sparse random graph) secure aggregation, in process.

    A thin driver of the round layer: :func:`secure_fl.rounds.plan_round` plans the round and
    :func:`secure_fl.rounds.run_local` runs the same site and server halves
    (:class:`~secure_fl.rounds.secagg.SecAggSiteRound`, :class:`~secure_fl.rounds.secagg.
    SecAggServerRound`) as a deployment, each site checking the round against the in-process
    policy (:func:`secure_fl.rounds.local.in_process_policy`).

    Options (keyword only; the fields of :class:`~secure_fl.rounds.spec.AggregationSpec`):

    * ``clip_range`` — per-coordinate bound; larger values are clipped, counted in the report and
      logged at WARNING (logger ``secure_fl.aggregators``) with the site and the count, since the
      mean is then biased (default 10.0).
    * ``precision`` — largest acceptable fixed-point step (default 2**-24, about 6e-8).
    * ``bits`` — 32 or 64, or None to pick the smallest that cannot wrap (default None).
    * ``l2_clip`` — optional L2 bound on each whole update; clipped updates are counted.
    * ``threshold``, ``k`` — protocol parameters; by default chosen from the number of sites,
      ``dropout_rate`` and ``corrupt_fraction`` (see :mod:`secure_fl.secagg.graph`).
    * ``active`` — the active-adversary variant (signed keys, graph commitments, consistency
      check), on by default; ``active=False`` runs the semi-honest variant, which protects only
      against a server that follows the protocol. In process each site gets a fresh Ed25519 key.
    * ``seed`` — makes every random choice reproducible. For tests and simulation only: with a seed,
      the masks are predictable to whoever knows it.

    Errors: ConfigError for invalid options, including any combination whose sum could wrap.
    """

    def __init__(
        self,
        protocol: str,
        *,
        clip_range: float = 10.0,
        precision: float = 2.0**-24,
        bits: int | None = None,
        l2_clip: float | None = None,
        threshold: int | None = None,
        k: int | None = None,
        dropout_rate: float = 0.1,
        corrupt_fraction: float = 0.0,
        active: bool = True,
        seed: int | None = None,
    ) -> None:
        if protocol not in ("secagg", "secagg+"):
            raise ConfigError(f"protocol must be 'secagg' or 'secagg+', got {protocol!r}")
        options: dict[str, Any] = {
            "clip_range": clip_range,
            "precision": precision,
            "bits": bits,
            "l2_clip": l2_clip,
            "threshold": threshold,
            "dropout_rate": dropout_rate,
            "corrupt_fraction": corrupt_fraction,
            "active": active,
        }
        if k is not None:
            options["k"] = k
        self.spec = AggregationSpec.from_options(protocol, options, where="options")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}")
        self.name = protocol
        self.protocol = protocol
        self.clip_range = self.spec.clip_range
        self.precision = self.spec.precision
        self.bits = self.spec.bits
        self.l2_clip = self.spec.l2_clip
        self.threshold = self.spec.threshold
        self.k = self.spec.k
        self.dropout_rate = self.spec.dropout_rate
        self.corrupt_fraction = self.spec.corrupt_fraction
        self.active = self.spec.active
        self.seed = seed
        self._round = 0

    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> AggregationResult:
        start = time.perf_counter()
        prepared = prepare(updates, weights, dropped, min_sites=2)
        sites = prepared.sites
        if self.seed is None:
            randbytes: Any = os.urandom
            rng = np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
        else:
            randbytes = DeterministicRandom(
                f"secure_fl/aggregate/{self.seed}/{self._round}".encode()
            )
            rng = np.random.default_rng([self.seed, self._round])

        ids = {site: index + 1 for index, site in enumerate(sites)}
        names = {i: s for s, i in ids.items()}
        signing_keys = None
        verify_keys = None
        if self.active:
            from secure_fl.crypto import SigningKey

            signing_keys = {ids[s]: SigningKey.generate(randbytes) for s in sites}
            verify_keys = {i: key.public_bytes for i, key in signing_keys.items()}
        round_id = self._round
        plan = plan_round(
            self.spec,
            {ids[s]: prepared.weights[s] for s in sites},
            vector_length=prepared.spec.size,
            round_id=round_id,
            verify_keys=verify_keys,
        )
        self._round += 1
        outcome = run_local(
            plan,
            {ids[s]: prepared.vectors[s] for s in sites},
            dropouts={ids[s]: Phase.MASKED_INPUT for s in prepared.dropped},
            signing_keys=signing_keys,
            randbytes=randbytes,
            rng=rng,
        )
        record = outcome.record
        size = prepared.spec.size
        clipped = {names[i]: int(n) for i, n in record["clipped"].items()}
        for site in sites:
            warn_clipped(self.name, site, clipped[site], size, float(record["clip_range"]))
        survivors = [names[i] for i in sorted(outcome.survivors)]
        bytes_sent = {names[i]: int(b) for i, b in record["bytes_sent"].items()}
        sent = [bytes_sent[s] for s in survivors if s in bytes_sent]
        mean = outcome.mean
        if mean is None:  # a SecAgg round always decodes its mean
            raise ConfigError("the round produced no mean")
        report = AggregationReport(
            aggregator=self.name,
            included=survivors,
            dropped=sorted(names[i] for i in outcome.dropped),
            clipped=clipped,
            clipped_total=sum(clipped.values()),
            clipped_updates=[names[i] for i in record["clipped_updates"]],
            bytes_sent=bytes_sent,
            server_bytes_sent=int(record["server_bytes_sent"]),
            site_seconds={names[i]: float(t) for i, t in record["site_seconds"].items()},
            server_seconds=float(record["server_seconds"]),
            seconds=time.perf_counter() - start,
            max_error=float(record["max_error"]),
            expansion=(sum(sent) / len(sent)) / (4 * size) if sent and size else None,
            round=round_id,
            threshold=int(record["threshold"]),
            k=int(record["k"]),
            active=bool(record["active"]),
            excluded=sorted(names[i] for i in outcome.excluded),
            bits=int(record["bits"]),
            frac_bits=int(record["frac_bits"]),
            clip_range=float(record["clip_range"]),
        )
        return AggregationResult(unflatten(mean, prepared.spec), report.as_dict())
