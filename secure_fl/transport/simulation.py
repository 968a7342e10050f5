"""The in-process reference of one federated round: what the network path must reproduce.

:func:`simulate_round` takes the sites' task results, plans the encoding, encodes each update with
the same per-site randomness the site processes use (see :mod:`secure_fl.transport.rounds`), builds
the same SecAggConfig as the server (same graph and threshold) and runs the protocol with the
in-process harness :func:`secure_fl.secagg.run_round`. With the same ``insecure_test_seed`` and the
same dropouts, the modular sum equals the network server's bit for bit. It is also the baseline of
``benchmarks/test_bench_grpc.py``. No grpc here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from secure_fl.crypto import DeterministicRandom, SigningKey
from secure_fl.encoding import BitPlan
from secure_fl.errors import ConfigError
from secure_fl.secagg import Phase, RoundResult, SecAggConfig, run_round
from secure_fl.transport.config import AggregationSettings
from secure_fl.transport.convert import setup_binding
from secure_fl.transport.rounds import (
    apply_mean,
    encode_update,
    encoding_rng,
    model_size,
    plan_round,
    round_config,
)
from secure_fl.transport.tasks import SiteTask, TaskResult, check_result
from secure_fl.transport.tensors import Tensors


@dataclass(frozen=True)
class SimulatedRound:
    """The reference outcome: the modular ``total`` of the survivors' encodings, the decoded
    weighted ``mean`` update, the new ``model``, the protocol ``result`` (bytes, seconds), the
    ``config`` and ``plan`` used, and the wall-clock ``seconds`` of the whole round."""

    total: np.ndarray = field(repr=False)
    mean: np.ndarray = field(repr=False)
    model: Tensors = field(repr=False)
    survivors: frozenset[int]
    config: SecAggConfig
    plan: BitPlan
    result: RoundResult = field(repr=False)
    seconds: float


def compute_results(
    tasks: Mapping[int, SiteTask], model: Mapping[str, np.ndarray], round_id: int
) -> dict[int, TaskResult]:
    """Every site's task result for ``round_id`` (site id -> result)."""
    return {
        site: check_result(tasks[site].compute_update(model, round_id), model)
        for site in sorted(tasks)
    }


def simulate_round(
    model: Mapping[str, np.ndarray],
    results: Mapping[int, TaskResult],
    settings: AggregationSettings,
    round_id: int,
    *,
    test_seed: int | None,
    dropouts: Mapping[int, Phase] | None = None,
    signing_keys: Mapping[int, SigningKey] | None = None,
) -> SimulatedRound:
    """Run round ``round_id`` in process among the sites of ``results`` (site id -> task result;
    these are the sites that reported their update), with ``dropouts`` (site -> the phase at which
    it vanishes, as in :func:`run_round`).

    Errors: ConfigError for a non-secagg protocol or inconsistent inputs; ThresholdError when too
    few sites remain (as the network server would abort).
    """
    if settings.protocol not in ("secagg", "secagg+"):
        raise ConfigError(f"simulate_round runs secagg / secagg+, not {settings.protocol!r}")
    start = time.perf_counter()
    ids = sorted(results)
    plan = plan_round(settings, [float(results[s].weight) for s in ids])
    codec = plan.codec()
    norm = dict(zip(ids, plan.weights, strict=True))
    verify_keys = (
        {s: k.public_bytes for s, k in signing_keys.items()} if signing_keys is not None else None
    )
    listed = {s: float(results[s].weight) for s in ids}
    config = round_config(
        settings,
        ids,
        vector_length=model_size(model),
        bits=plan.bits,
        round_id=round_id,
        verify_keys=verify_keys,
        binding=setup_binding(listed, codec, model_size(model)),
    )
    inputs = {
        s: encode_update(
            results[s].update, model, codec, norm[s], encoding_rng(test_seed, s, round_id)
        )[0]
        for s in ids
    }
    harness_rand = DeterministicRandom(f"simulate/{test_seed}/{round_id}".encode())
    result = run_round(
        config,
        inputs,
        dropouts=dropouts,
        signing_keys=signing_keys,
        randbytes=harness_rand if test_seed is not None else None,
    )
    surviving_weight = sum(norm[s] for s in result.survivors)
    mean = codec.decode(result.total) / surviving_weight
    new_model = apply_mean(model, mean)
    return SimulatedRound(
        total=result.total,
        mean=mean,
        model=new_model,
        survivors=result.survivors,
        config=config,
        plan=plan,
        result=result,
        seconds=time.perf_counter() - start,
    )
