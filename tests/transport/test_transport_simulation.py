"""The in-process reference of a federated round (simulate_round) runs the round layer's halves."""

from __future__ import annotations

import numpy as np
import pytest

from secure_fl.crypto import SigningKey
from secure_fl.encoding import flatten
from secure_fl.errors import ConfigError
from secure_fl.rounds import AggregationSpec
from secure_fl.secagg import Phase
from secure_fl.transport.rounds import apply_mean
from secure_fl.transport.simulation import compute_results, simulate_round
from secure_fl.transport.tasks import SyntheticTask, TaskResult

MODEL = {"p0": np.zeros((6, 5), dtype=np.float32), "p1": np.zeros(7, dtype=np.float32)}


def _results(n: int = 5) -> dict[int, TaskResult]:
    tasks = {i: SyntheticTask(f"site-{i}", seed=3) for i in range(1, n + 1)}
    return compute_results(tasks, MODEL, 0)


@pytest.mark.parametrize("protocol", ["plain", "secagg", "secagg+"])
def test_the_simulated_mean_is_the_weighted_mean_of_the_survivors(protocol: str) -> None:
    results = _results()
    keys = {i: SigningKey.generate() for i in results} if protocol != "plain" else None
    options = {} if protocol == "plain" else {"dropout_rate": 0.1}
    sim = simulate_round(
        MODEL,
        results,
        AggregationSpec.from_options(protocol, options),
        4,
        test_seed=1,
        dropouts={2: Phase.MASKED_INPUT},
        signing_keys=keys,
    )
    assert sim.survivors == frozenset({1, 3, 4, 5})
    # The reference: the plain float64 weighted mean of the survivors' flattened updates.
    want = np.zeros(sim.mean.shape, dtype=np.float64)
    for s in sorted(sim.survivors):
        want += results[s].weight * flatten(dict(results[s].update))[0]
    want /= sum(results[s].weight for s in sorted(sim.survivors))
    bound = (
        0.0
        if sim.plan is None
        else sim.plan.mean_error_bound(
            sum(sim.plan.weights[s - 1] for s in sim.survivors), len(sim.survivors)
        )
    )
    assert np.max(np.abs(sim.mean - want)) <= bound + 1e-15
    assert sim.model["p0"].dtype == np.float32
    assert np.array_equal(sim.model["p1"], apply_mean(MODEL, sim.mean)["p1"])
    assert sim.result.clients[1].bytes_sent > 0 and sim.result.server.bytes_sent > 0
    assert (sim.config is None) == (protocol == "plain")


def test_same_seed_same_sum_and_ckks_is_not_simulated_here() -> None:
    results = _results(4)
    keys = {i: SigningKey.generate() for i in results}
    spec = AggregationSpec("secagg", dropout_rate=0.1)
    a = simulate_round(MODEL, results, spec, 1, test_seed=7, signing_keys=keys)
    b = simulate_round(MODEL, results, spec, 1, test_seed=7, signing_keys=keys)
    c = simulate_round(MODEL, results, spec, 1, test_seed=8, signing_keys=keys)
    assert np.array_equal(a.total, b.total)  # the network round reproduces this bit for bit
    assert not np.array_equal(a.total, c.total)  # another seed, other stochastic rounding
    with pytest.raises(ConfigError, match="ckks"):
        simulate_round(MODEL, results, AggregationSpec("ckks"), 1, test_seed=7)
