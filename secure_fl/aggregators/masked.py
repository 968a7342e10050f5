"""Masked secure aggregation (SecAgg and SecAgg+) behind the aggregator interface.

Each site clips its update (optionally in L2, and always per coordinate to ``clip_range``), scales it
by its normalised weight, encodes it in fixed point with unbiased stochastic rounding into
``Z_{2^bits}`` and runs one SecAgg / SecAgg+ round. The server learns only the modular sum of the
survivors' encodings, which decodes to their weighted sum; it divides by the survivors' total weight.

Site weights (sample counts) are public to the server, as in FedAvg.
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
    check_l2_clip,
    prepare,
    warn_clipped,
)
from secure_fl.crypto import DeterministicRandom
from secure_fl.encoding import l2_clip, plan_bit_width, unflatten
from secure_fl.errors import ConfigError
from secure_fl.secagg import Phase, SitePolicy, make_config, run_round
from secure_fl.secagg.config import encoding_binding


class MaskedAggregator(Aggregator):
    """SecAgg (complete graph) or SecAgg+ (sparse random graph) secure aggregation, in process.

    Options (keyword only):

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
        if not isinstance(active, bool):
            raise ConfigError(f"active must be True or False, got {active!r}")
        self.name = protocol
        self.protocol = protocol
        self.clip_range = clip_range
        self.precision = precision
        self.bits = bits
        self.l2_clip = check_l2_clip(l2_clip)
        self.threshold = threshold
        self.k = k
        self.dropout_rate = dropout_rate
        self.corrupt_fraction = corrupt_fraction
        self.active = active
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
        plan = plan_bit_width(
            num_sites=len(sites),
            weights=[prepared.weights[s] for s in sites],
            clip_range=self.clip_range,
            precision=self.precision,
            bits=self.bits,
        )
        codec = plan.codec()
        # The plan's normalised weights, exactly those its no-wrap bound was computed for.
        norm = dict(zip(sites, plan.weights, strict=True))
        if self.seed is None:
            randbytes: Any = os.urandom
            rng = np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
        else:
            randbytes = DeterministicRandom(
                f"secure_fl/aggregate/{self.seed}/{self._round}".encode()
            )
            rng = np.random.default_rng([self.seed, self._round])

        ids = {site: index + 1 for index, site in enumerate(sites)}
        signing_keys = None
        verify_keys = None
        if self.active:
            from secure_fl.crypto import SigningKey

            signing_keys = {ids[s]: SigningKey.generate(randbytes) for s in sites}
            verify_keys = {i: key.public_bytes for i, key in signing_keys.items()}
        round_id = self._round
        config = make_config(
            list(ids.values()),
            vector_length=prepared.spec.size,
            bits=plan.bits,
            protocol=self.protocol,
            round_id=self._round,
            threshold=self.threshold,
            k=self.k,
            dropout_rate=self.dropout_rate,
            corrupt_fraction=self.corrupt_fraction,
            active=self.active,
            verify_keys=verify_keys,
            # Every site's weight and the codec, bound into the round's keys and signatures as
            # the transport does (protocols/secagg.md).
            binding=encoding_binding(
                [ids[s] for s in sites],
                [prepared.weights[s] for s in sites],
                bits=codec.bits,
                frac_bits=codec.frac_bits,
                clip_range=codec.clip_range,
                vector_length=prepared.spec.size,
            ),
        )
        self._round += 1

        inputs: dict[int, np.ndarray] = {}
        clipped: dict[str, int] = {}
        clipped_updates: list[str] = []
        encode_seconds: dict[str, float] = {}
        for site in sites:
            t0 = time.perf_counter()
            vector = prepared.vectors[site]
            if self.l2_clip is not None:
                vector, info = l2_clip(vector, self.l2_clip)
                if info.clipped:
                    clipped_updates.append(site)
            encoded = codec.encode(vector, weight=norm[site], rng=rng)
            inputs[ids[site]] = encoded.values
            clipped[site] = encoded.clipped
            warn_clipped(self.name, site, encoded.clipped, prepared.spec.size, plan.clip_range)
            encode_seconds[site] = time.perf_counter() - t0

        result = run_round(
            config,
            inputs,
            dropouts={ids[s]: Phase.MASKED_INPUT for s in prepared.dropped},
            signing_keys=signing_keys,
            randbytes=randbytes,
            policy=SitePolicy(corrupt_fraction=self.corrupt_fraction, require_active=self.active),
        )
        names = {i: s for s, i in ids.items()}
        survivors = [names[i] for i in sorted(result.survivors)]
        surviving_weight = sum(norm[s] for s in survivors)
        t0 = time.perf_counter()
        mean = codec.decode(result.total) / surviving_weight
        decode_seconds = time.perf_counter() - t0
        bytes_sent = {names[i]: st.bytes_sent for i, st in result.clients.items()}
        sent = [bytes_sent[s] for s in survivors if s in bytes_sent]
        size = prepared.spec.size
        report = AggregationReport(
            aggregator=self.name,
            included=survivors,
            dropped=sorted(names[i] for i in result.dropped),
            clipped=clipped,
            clipped_total=sum(clipped.values()),
            clipped_updates=clipped_updates,
            bytes_sent=bytes_sent,
            server_bytes_sent=result.server.bytes_sent,
            site_seconds={
                names[i]: st.seconds + encode_seconds[names[i]] for i, st in result.clients.items()
            },
            server_seconds=result.server.seconds + decode_seconds,
            seconds=time.perf_counter() - start,
            max_error=plan.mean_error_bound(surviving_weight, len(survivors)),
            expansion=(sum(sent) / len(sent)) / (4 * size) if sent and size else None,
            round=round_id,
            threshold=config.threshold,
            k=config.degree,
            active=config.active,
            excluded=sorted(names[i] for i in result.excluded),
            bits=plan.bits,
            frac_bits=plan.frac_bits,
            clip_range=plan.clip_range,
        )
        return AggregationResult(unflatten(mean, prepared.spec), report.as_dict())
