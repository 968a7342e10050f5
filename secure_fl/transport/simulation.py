"""The in-process reference of one federated round: what the network path must reproduce.

:func:`simulate_round` takes the sites' task results and runs the round layer's own halves in
process (:func:`secure_fl.rounds.plan_round` + :func:`secure_fl.rounds.run_local`), with the same
per-site randomness the site processes use (see :mod:`secure_fl.transport.rounds`): the same plan,
binding, graph and threshold as the server. With the same ``insecure_test_seed`` and the same
dropouts, the modular sum equals the network server's bit for bit. It is also the baseline of
``benchmarks/test_bench_grpc.py``. No grpc here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from secure_fl.crypto import SigningKey
from secure_fl.encoding import BitPlan, flatten
from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.rounds.local import run_local
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.secagg import Phase, RoundResult, SecAggConfig
from secure_fl.secagg.simulation import PartyStats
from secure_fl.transport.rounds import (
    apply_mean,
    encoding_rng,
    model_size,
    site_randbytes,
)
from secure_fl.transport.tasks import SiteTask, TaskResult, check_result
from secure_fl.transport.tensors import Tensors, same_structure


@dataclass(frozen=True)
class SimulatedRound:
    """The reference outcome: the modular ``total`` of the survivors' encodings (plain: the
    float64 mean), the decoded weighted ``mean`` update, the new ``model``, the protocol
    ``result`` (bytes, seconds per party), the ``config`` and ``plan`` used (None for plain),
    and the wall-clock ``seconds`` of the whole round."""

    total: np.ndarray = field(repr=False)
    mean: np.ndarray = field(repr=False)
    model: Tensors = field(repr=False)
    survivors: frozenset[int]
    config: SecAggConfig | None
    plan: BitPlan | None
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
    settings: AggregationSpec,
    round_id: int,
    *,
    test_seed: int | None,
    dropouts: Mapping[int, Phase] | None = None,
    signing_keys: Mapping[int, SigningKey] | None = None,
) -> SimulatedRound:
    """Run round ``round_id`` in process among the sites of ``results`` (site id -> task result;
    these are the sites that reported their update), with ``dropouts`` (site -> the phase at which
    it vanishes, as in :func:`secure_fl.rounds.run_local`; a plain upload is MASKED_INPUT).

    Errors: ConfigError for a CKKS spec (see :mod:`secure_fl.transport.ckks`) or inconsistent
    inputs; InvalidUpdateError for an update that does not match the model; ThresholdError when
    too few sites remain (as the network server would abort).
    """
    if settings.protocol not in ("plain", "secagg", "secagg+"):
        raise ConfigError(
            f"simulate_round runs plain / secagg / secagg+, not {settings.protocol!r}"
        )
    start = time.perf_counter()
    ids = sorted(results)
    vector_length = model_size(model)
    plan = plan_round(
        settings,
        {s: float(results[s].weight) for s in ids},
        vector_length=vector_length,
        round_id=round_id,
        verify_keys={s: k.public_bytes for s, k in (signing_keys or {}).items()} or None,
    )
    vectors: dict[int, np.ndarray] = {}
    for s in ids:
        if not same_structure(results[s].update, model):
            raise InvalidUpdateError("update does not match the model's names, shapes and dtypes")
        vectors[s] = flatten(dict(results[s].update))[0]
    outcome = run_local(
        plan,
        vectors,
        dropouts=dropouts,
        signing_keys=signing_keys,
        randbytes={s: site_randbytes(test_seed, s, round_id) for s in ids},
        rng={s: encoding_rng(test_seed, s, round_id) for s in ids},
    )
    if outcome.mean is None:
        raise ConfigError("the round produced no mean")
    record = outcome.record
    result = RoundResult(
        total=outcome.total if outcome.total is not None else outcome.mean,
        survivors=outcome.survivors,
        dropped=outcome.dropped,
        clients={
            s: PartyStats(float(record["site_seconds"][s]), int(record["bytes_sent"][s]))
            for s in ids
        },
        server=PartyStats(float(record["server_seconds"]), int(record["server_bytes_sent"])),
        client_errors=dict(record["site_errors"]),
        excluded=outcome.excluded,
    )
    return SimulatedRound(
        total=result.total,
        mean=outcome.mean,
        model=apply_mean(model, outcome.mean),
        survivors=outcome.survivors,
        config=plan.secagg,
        plan=plan.bit_plan,
        result=result,
        seconds=time.perf_counter() - start,
    )
