"""SecureAggregationWorkflow on the in-process LocalGrid, with SITE's real mod: sums equal to
the in-process aggregators, dropouts, the node -> site map under attack, CKKS, the privacy hook
and the FedAvg loop."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict  # noqa: E402
from server_helpers import delta_train, local_grid, provision, write_updates  # noqa: E402

from secure_fl import aggregators  # noqa: E402
from secure_fl.errors import ConfigError, ThresholdError  # noqa: E402
from secure_fl.integrations.flower import records  # noqa: E402
from secure_fl.integrations.flower.grid import LocalGrid  # noqa: E402
from secure_fl.integrations.flower.privacy import PrivacyPlan  # noqa: E402
from secure_fl.integrations.flower.workflow import (  # noqa: E402
    SecureAggregationWorkflow,
    add_arrays,
    fresh_round_id,
    plan_secure_round,
)
from secure_fl.rounds import codec  # noqa: E402
from secure_fl.rounds.messages import PlainUpload  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402

N = 5
WEIGHTS = [1.0, 2.0, 3.0, 4.0, 5.0]
LAYOUT = records.Layout(("update",), ((6,),), ("<f8",))


def _updates(n: int = N, size: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    return [rng.normal(size=size) for _ in range(n)]


def _spec(protocol: str, **options: Any) -> AggregationSpec:
    return AggregationSpec.from_options(protocol, options)


def _mean(updates: list[np.ndarray], weights: list[float], sites: list[int]) -> np.ndarray:
    total = math.fsum(weights[i] for i in sites)
    out: np.ndarray = np.sum([weights[i] * updates[i] for i in sites], axis=0) / total
    return out


def _workflow(spec: AggregationSpec, fed: Any, **kwargs: Any) -> SecureAggregationWorkflow:
    kwargs.setdefault("stage_timeout_s", 5.0)
    return SecureAggregationWorkflow(spec, fed.roster, **kwargs)


@pytest.mark.parametrize("protocol", ["plain", "secagg", "secagg+"])
@pytest.mark.parametrize("dropped", [(), (1,)])
def test_round_matches_the_in_process_aggregator(
    tmp_path: Path, protocol: str, dropped: tuple[int, ...]
) -> None:
    ups = _updates()
    spec = _spec(protocol) if protocol == "plain" else _spec(protocol, threshold=3)
    fed = provision(spec, tmp_path, N)
    grid = local_grid(
        fed, write_updates(tmp_path, ups, WEIGHTS), protocol=protocol, dropped=dropped
    )
    result = _workflow(spec, fed).run_round(grid, arrays=None, layout=LAYOUT)

    names = {f"s{i}": [ups[i]] for i in range(N)}
    ref = aggregators.create(protocol, **spec.options()).aggregate(
        names, {f"s{i}": WEIGHTS[i] for i in range(N)}, dropped=[f"s{i}" for i in dropped]
    )
    survivors = [i for i in range(N) if i not in dropped]
    assert result.outcome.survivors == frozenset(i + 1 for i in survivors)
    assert result.outcome.dropped == frozenset(i + 1 for i in dropped)
    assert ref.report["included"] == [f"s{i}" for i in survivors]
    assert result.mean is not None
    got = records.flatten(result.mean)[0]
    exact = _mean(ups, WEIGHTS, survivors)
    if protocol == "plain":
        np.testing.assert_array_equal(got, ref.mean[0])
    else:  # stochastic rounding: both within the round's error bound of the exact mean
        bound = float(result.outcome.record["max_error"])
        assert np.max(np.abs(got - exact)) <= bound
        assert np.max(np.abs(ref.mean[0] - exact)) <= float(ref.report["max_error"])
        assert result.outcome.record["threshold"] == ref.report["threshold"]
    assert result.weights == {i + 1: WEIGHTS[i] for i in range(N)}
    assert sorted(result.nodes) == list(range(1, N + 1))
    assert result.bytes_to_sites > 0 and result.bytes_from_sites > 0
    assert set(result.site_bytes) >= result.outcome.survivors


def test_global_model_delta_and_fedavg_loop(tmp_path: Path) -> None:
    spec = _spec("secagg+", threshold=3)
    fed = provision(spec, tmp_path, N)
    rng = np.random.default_rng(3)
    deltas = {i: {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=2)} for i in range(N)}
    grid = local_grid(fed, ["unused"] * N, protocol="secagg+", train=delta_train(deltas))
    init = ArrayRecord({"w": Array(np.zeros((2, 3))), "b": Array(np.ones(2))})
    workflow = _workflow(spec, fed)
    final = workflow(grid, Context(0, 0, {}, RecordDict(), {}), initial_arrays=init, num_rounds=2)

    weights = [10 + i for i in range(N)]  # delta_train reports num-examples 10 + index
    total = sum(weights)
    want_w = 2 * sum(weights[i] * deltas[i]["w"] for i in range(N)) / total
    want_b = 1 + 2 * sum(weights[i] * deltas[i]["b"] for i in range(N)) / total
    assert len(workflow.history) == 2
    bound = 2 * float(workflow.history[0].outcome.record["max_error"])
    np.testing.assert_allclose(final["w"].numpy(), want_w, atol=bound)
    np.testing.assert_allclose(final["b"].numpy(), want_b, atol=bound)
    assert workflow.history[0].metrics[1]["num-examples"] == 10.0
    assert list(final.keys()) == ["w", "b"]


def test_fedavg_loop_with_server_momentum(tmp_path: Path) -> None:
    from secure_fl.aggregators.server_opt import make_server_optimizer

    spec = _spec("plain")
    fed = provision(spec, tmp_path, 3)
    deltas = {i: {"w": np.full(4, float(i + 1))} for i in range(3)}
    grid = local_grid(fed, ["unused"] * 3, protocol="plain", train=delta_train(deltas))
    init = ArrayRecord({"w": Array(np.zeros(4))})
    optimizer = make_server_optimizer("fedavgm", lr=1.0, momentum=0.9)
    final = _workflow(spec, fed)(
        grid,
        Context(0, 0, {}, RecordDict(), {}),
        initial_arrays=init,
        num_rounds=2,
        server_optimizer=optimizer,
    )
    mean = (10 * 1 + 11 * 2 + 12 * 3) / 33  # num-examples 10, 11, 12
    np.testing.assert_allclose(final["w"].numpy(), np.full(4, 2.9 * mean), rtol=1e-12)


class Tamper(LocalGrid):
    """Alters the reply of node ``index`` at ``stage`` with ``change(reply, grid)``."""

    index = 0
    stage = "step"
    change: Any = None

    def deliver(self, message: Message, context: Context) -> Message | None:
        reply = super().deliver(message, context)
        env = records.read(message.content)
        target = list(self.contexts)[self.index]
        hit = env is not None and env.stage == self.stage and context.node_id == target
        if reply is not None and hit:
            changed: Message = type(self).change(reply, self)
            return changed
        return reply


def _rewrite(reply: Message, **changes: Any) -> Message:
    env = records.read(reply.content)
    assert env is not None
    reply.content[records.KEY] = records.to_record(dataclasses.replace(env, **changes))
    return reply


def _run_tampered(tmp_path: Path, change: Any, stage: str = "step") -> Any:
    ups = _updates()
    spec = _spec("secagg+", threshold=3)
    fed = provision(spec, tmp_path, N)
    Tamper.change, Tamper.stage = staticmethod(change), stage
    grid = local_grid(
        fed, write_updates(tmp_path, ups, WEIGHTS), protocol="secagg+", grid_class=Tamper
    )
    result = _workflow(spec, fed).run_round(grid, arrays=None, layout=LAYOUT)
    assert result.mean is not None
    got = records.flatten(result.mean)[0]
    survivors = sorted(s - 1 for s in result.outcome.survivors)
    bound = float(result.outcome.record["max_error"])
    assert np.max(np.abs(got - _mean(ups, WEIGHTS, survivors))) <= bound
    return result


def test_a_reply_naming_another_site_is_refused(tmp_path: Path) -> None:
    result = _run_tampered(tmp_path, lambda reply, grid: _rewrite(reply, site_id=2))
    assert 1 not in result.outcome.survivors  # node 0 (site 1) answered as site 2
    assert 2 in result.outcome.survivors


def test_a_reply_of_another_round_is_refused(tmp_path: Path) -> None:
    def other_round(reply: Message, grid: Any) -> Message:
        env = records.read(reply.content)
        assert env is not None
        return _rewrite(reply, round_id=env.round_id % (records.ROUND_ID_LIMIT - 1) + 1)

    result = _run_tampered(tmp_path, other_round)
    assert 1 not in result.outcome.survivors


def test_a_reply_from_another_node_is_refused(tmp_path: Path) -> None:
    def from_node_1(reply: Message, grid: Any) -> Message:
        reply.metadata.__dict__["_src_node_id"] = list(grid.contexts)[1]
        return reply

    result = _run_tampered(tmp_path, from_node_1)
    # site 1's reply arrived as node 1's: site 1 never answered, site 2 got a foreign reply.
    assert not {1, 2} & result.outcome.survivors
    assert result.outcome.survivors == frozenset({3, 4, 5})


def test_a_site_id_claimed_by_two_nodes_is_excluded(tmp_path: Path) -> None:
    ups = _updates()
    spec = _spec("secagg+", threshold=3)
    fed = provision(spec, tmp_path, N)
    folders = write_updates(tmp_path, ups, WEIGHTS)
    # node 1 runs site-1's config too: both claim site id 1
    grid = local_grid(fed, folders, protocol="secagg+", sites=[1, 1, 3, 4, 5])
    result = _workflow(spec, fed).run_round(grid, arrays=None, layout=LAYOUT)
    assert result.outcome.survivors == frozenset({3, 4, 5})
    assert 1 in result.outcome.excluded
    assert 1 not in result.nodes and 2 not in result.nodes


def test_a_site_id_off_the_roster_is_excluded(tmp_path: Path) -> None:
    ups = _updates()
    spec = _spec("secagg+", threshold=3)
    fed = provision(spec, tmp_path, N)
    other = provision(spec, tmp_path / "other", N + 1)  # another federation's site 6
    configs = [str(fed.site_configs[f"site-{i}"]) for i in range(1, N)]
    configs.append(str(other.site_configs[f"site-{N + 1}"]))
    grid = local_grid(
        fed, write_updates(tmp_path, ups, WEIGHTS), protocol="secagg+", configs=configs
    )
    result = _workflow(spec, fed).run_round(grid, arrays=None, layout=LAYOUT)
    assert result.outcome.survivors == frozenset({1, 2, 3, 4})
    assert N + 1 not in result.nodes and len(result.nodes) == N - 1
    assert result.mean is not None
    got = records.flatten(result.mean)[0]
    bound = float(result.outcome.record["max_error"])
    assert np.max(np.abs(got - _mean(ups, WEIGHTS, [0, 1, 2, 3]))) <= bound


def test_ckks_round_result_is_decrypted_by_the_sites_only(tmp_path: Path) -> None:
    from secure_fl.he.context import SecretContext
    from secure_fl.he.site import decrypt_model
    from secure_fl.integrations.flower.node import load_flower_site

    ups = _updates(3)
    spec = _spec("ckks")
    fed = provision(spec, tmp_path, 3)
    grid = local_grid(fed, write_updates(tmp_path, ups, WEIGHTS[:3]), protocol="ckks", dropped=(1,))
    workflow = _workflow(
        spec, fed, ckks_public=fed.ckks_public, ckks_fingerprint=fed.ckks_fingerprint
    )
    result = workflow.run_round(grid, arrays=None, layout=LAYOUT)
    assert result.mean is None and result.outcome.encrypted is not None
    assert result.outcome.survivors == frozenset({1, 3})
    site = load_flower_site(fed.site_configs["site-1"])
    assert site.ckks is not None
    model = decrypt_model(SecretContext.load(site.ckks.context), result.outcome.encrypted)
    np.testing.assert_allclose(model["update"], _mean(ups, WEIGHTS, [0, 2]), atol=1e-6)
    # every surviving site kept the new model for itself (the result stage)
    assert list((site.state_dir / "flower").glob("model-*.npz"))
    with pytest.raises(ConfigError, match="ckks"):
        workflow(
            grid, Context(0, 0, {}, RecordDict(), {}), initial_arrays=ArrayRecord(), num_rounds=1
        )


class FakePrivacy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def plan(
        self, round_index: int, site_ids: Any, vector_length: int, weights: Any = None
    ) -> PrivacyPlan:
        self.calls.append(("plan", (round_index, list(site_ids), vector_length, dict(weights))))
        return PrivacyPlan(l2_clip=0.5, distributed_dp_json="")

    def release(
        self, round_index: int, outcome: Any, mean: np.ndarray, weights: Any = None
    ) -> np.ndarray:
        self.calls.append(("release", (sorted(outcome.survivors), dict(weights))))
        return mean + 100.0


def test_privacy_hook_sets_l2_clip_and_releases_the_mean(tmp_path: Path) -> None:
    ups = _updates(3)
    spec = _spec("plain")
    fed = provision(spec, tmp_path, 3)
    grid = local_grid(fed, write_updates(tmp_path, ups, WEIGHTS[:3]), protocol="plain")
    privacy = FakePrivacy()
    result = _workflow(spec, fed, privacy=privacy).run_round(grid, arrays=None, layout=LAYOUT)
    clipped = [u * min(1.0, 0.5 / np.linalg.norm(u)) for u in ups]
    assert result.mean is not None
    got = records.flatten(result.mean)[0]
    np.testing.assert_allclose(got, _mean(clipped, WEIGHTS, [0, 1, 2]) + 100.0, rtol=1e-12)
    weights = {1: 1.0, 2: 2.0, 3: 3.0}
    assert privacy.calls == [
        ("plan", (1, [1, 2, 3], 6, weights)),
        ("release", ([1, 2, 3], weights)),
    ]


def test_too_few_nodes_and_bad_arguments(tmp_path: Path) -> None:
    spec = _spec("secagg")
    fed = provision(spec, tmp_path, 3)
    grid = local_grid(fed, write_updates(tmp_path, _updates(1), [1.0]), protocol="secagg")
    workflow = _workflow(spec, fed, min_sites=2, stage_timeout_s=0.3)
    with pytest.raises(ThresholdError, match="min_sites=2"):
        workflow.run_round(grid, arrays=None, layout=LAYOUT)
    with pytest.raises(ConfigError, match="layout"):
        workflow.run_round(grid, arrays=None, node_ids=[1])
    with pytest.raises(ConfigError, match="min_sites"):
        SecureAggregationWorkflow(spec, fed.roster, min_sites=1)
    with pytest.raises(ConfigError, match="stage_timeout_s"):
        SecureAggregationWorkflow(spec, fed.roster, stage_timeout_s=math.inf)
    with pytest.raises(ConfigError, match="ckks_public"):
        SecureAggregationWorkflow(_spec("ckks"), fed.roster)


def test_round_ids_are_fresh_and_in_range() -> None:
    ids = {fresh_round_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(1 <= i < records.ROUND_ID_LIMIT for i in ids)


def test_add_arrays_refuses_other_keys() -> None:
    base = ArrayRecord({"a": Array(np.zeros(2, dtype=np.float32))})
    out = add_arrays(base, ArrayRecord({"a": Array(np.ones(2))}))
    assert out["a"].numpy().dtype == np.float32
    with pytest.raises(ConfigError, match="keys"):
        add_arrays(base, ArrayRecord({"b": Array(np.ones(2))}))


def test_plan_secure_round_applies_the_privacy_plan() -> None:
    spec = _spec("secagg", active=False)
    weights = {i: 1.0 for i in range(1, 6)}
    base = plan_secure_round(spec, weights, vector_length=4, round_id=9)
    assert base.secagg is not None and base.secagg.threshold < 5
    dp_json = '{"threshold": 5}'
    plan = plan_secure_round(
        spec, weights, vector_length=4, round_id=9, distributed_dp_json=dp_json, l2_clip=2.0
    )
    assert plan.secagg is not None and plan.secagg.threshold == 5
    assert plan.spec.l2_clip == 2.0 and plan.extra_binding == dp_json.encode()
    assert plan.secagg.binding != base.secagg.binding
    floor = plan_secure_round(spec, weights, vector_length=4, round_id=9, min_threshold=5)
    assert floor.secagg is not None and floor.secagg.threshold == 5
    with pytest.raises(ConfigError, match="noise threshold"):
        plan_secure_round(spec, weights, vector_length=4, round_id=9, min_threshold=6)


def test_local_grid_authenticates_senders_and_turns_exceptions_into_error_replies() -> None:
    from flwr.app import ConfigRecord
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise ValueError("boom\nsecond line")
        reply = Message(RecordDict({"c": ConfigRecord({"x": 1})}), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = 12345  # a lie the grid must overwrite
        return reply

    grid = LocalGrid(app, 2, node_config=lambda i: {"extra": i})
    nodes = list(grid.get_node_ids())
    assert [grid.contexts[n].node_config["extra"] for n in nodes] == [0, 1]
    sent = [grid.create_message(RecordDict(), "train", n, "1") for n in nodes]
    ids = list(grid.push_messages(sent))
    replies = {int(r.metadata.src_node_id): r for r in grid.pull_messages(ids)}
    assert set(replies) == set(nodes)
    ok, failed = replies[nodes[0]], replies[nodes[1]]
    assert ok.metadata.reply_to_message_id == sent[0].metadata.message_id
    assert failed.has_error() and failed.error.reason == "ValueError: boom"
    assert list(grid.pull_messages(ids)) == []  # each reply is returned once
    with pytest.raises(ConfigError, match="no node"):
        grid.push_messages([grid.create_message(RecordDict(), "train", 7, "1")])


# -- self-reported weights (attack review B5): one site's weight never aborts the run ------------


def _weight_round(
    tmp_path: Path, weights: list[float], **kwargs: Any
) -> tuple[SecureAggregationWorkflow, LocalGrid, list[np.ndarray]]:
    ups = _updates(len(weights))
    spec = _spec("secagg+", threshold=3)
    fed = provision(spec, tmp_path, len(weights))
    grid = local_grid(fed, write_updates(tmp_path, ups, weights), protocol="secagg+")
    return _workflow(spec, fed, **kwargs), grid, ups


def test_a_tiny_weight_excludes_only_its_site(tmp_path: Path) -> None:
    weights = [1.0, 2.0, 3.0, 4.0, 5e-324]  # site 5's share of the total underflows to 0
    workflow, grid, ups = _weight_round(tmp_path, weights)
    result = workflow.run_round(grid, arrays=None, layout=LAYOUT)
    assert result.refused_weights == {5: 5e-324}
    assert 5 in result.outcome.excluded and 5 not in result.nodes
    assert result.outcome.survivors == frozenset({1, 2, 3, 4})
    assert dict(result.weights) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert result.mean is not None
    got = records.flatten(result.mean)[0]
    bound = float(result.outcome.record["max_error"])
    assert np.max(np.abs(got - _mean(ups, weights, [0, 1, 2, 3]))) <= bound


def test_a_huge_weight_is_the_mean_unless_max_weight_excludes_it(tmp_path: Path) -> None:
    weights = [10.0, 10.0, 10.0, 1e15]
    workflow, grid, ups = _weight_round(tmp_path, weights)
    result = workflow.run_round(grid, arrays=None, layout=LAYOUT)
    assert result.mean is not None and not result.refused_weights  # FedAvg's weights: by design
    got = records.flatten(result.mean)[0]
    assert np.max(np.abs(got - ups[3])) <= 1e-6  # the documented property without max_weight

    workflow, grid, ups = _weight_round(tmp_path / "bounded", weights, max_weight=1000.0)
    init = ArrayRecord({"update": Array(np.zeros(6))})
    final = workflow(grid, Context(0, 0, {}, RecordDict(), {}), initial_arrays=init, num_rounds=1)
    (result,) = workflow.history
    assert result.refused_weights == {4: 1e15} and 4 in result.outcome.excluded
    assert result.outcome.survivors == frozenset({1, 2, 3})
    bound = float(result.outcome.record["max_error"])
    assert np.max(np.abs(final["update"].numpy() - _mean(ups, weights, [0, 1, 2]))) <= bound


def test_a_round_that_cannot_be_planned_aborts_the_round_not_the_run(tmp_path: Path) -> None:
    # threshold 3 among the 2 sites left once site 3's weight is refused: make_config refuses
    workflow, grid, _ = _weight_round(tmp_path, [1.0, 2.0, 5e-324])
    with pytest.raises(ThresholdError, match="cannot be planned"):
        workflow.run_round(grid, arrays=None, layout=LAYOUT)
    init = ArrayRecord({"update": Array(np.ones(6))})
    # every round aborts: the loop goes on to the end, then the run fails naming the first reason
    # (a run that trained nothing must not look finished)
    with pytest.raises(ThresholdError, match=r"all 2 rounds aborted.*cannot be planned"):
        workflow(grid, Context(0, 0, {}, RecordDict(), {}), initial_arrays=init, num_rounds=2)
    assert workflow.history == []


def test_screen_weights_refuses_without_clipping() -> None:
    from secure_fl.integrations.flower._exchange import screen_weights
    from secure_fl.rounds.plan import normalise_weights

    kept, refused = screen_weights({1: 1.0, 2: 1.7e308, 3: 5e-324, 4: math.nan, 5: 3.0}, 1e300)
    assert kept == {1: 1.0, 5: 3.0}
    assert set(refused) == {2, 3, 4}
    assert "max_weight" in refused[2] and "underflows" in refused[3] and "finite" in refused[4]
    # without a bound a huge weight keeps every weight >= 1 (no honest site is refused)
    kept, refused = screen_weights({1: 1.0, 2: 1.7e308, 3: 2.0})
    assert kept == {1: 1.0, 2: 1.7e308, 3: 2.0} and not refused
    assert min(normalise_weights(kept).values()) > 0
    kept, refused = screen_weights({1: 5e-324, 2: 5e-324})  # comparable, however small
    assert kept == {1: 5e-324, 2: 5e-324} and not refused
    bad: Any
    for bad in (0, -1.0, math.inf, math.nan, True, "10"):
        with pytest.raises(ConfigError, match="max_weight"):
            SecureAggregationWorkflow(_spec("plain"), _roster(), max_weight=bad)


def _roster() -> list[Any]:
    from secure_fl.transport.config_common import RosterEntry

    return [RosterEntry(site_id=i, name=f"site-{i}") for i in (1, 2, 3)]


# -- round-4 finding D2: a plain site that ignores l2_clip, a non-finite mean ----------------


class OverBound(LocalGrid):
    """The first node's plain upload replaced by 1.7e308 values marked unclipped (a tampered
    node that ignores the plan's l2_clip)."""

    def deliver(self, message: Message, context: Any) -> Message | None:
        reply = super().deliver(message, context)
        env = records.read(message.content)
        first = next(iter(self.contexts))
        if reply is None or env is None or env.stage != "setup" or context.node_id != first:
            return reply
        sent = records.read(reply.content)
        assert sent is not None and sent.frame is not None
        upload = codec.decode(sent.frame)
        assert isinstance(upload, PlainUpload)
        bad = PlainUpload(upload.round_id, upload.sender, np.full(upload.vector.shape, 1.7e308))
        return _rewrite(reply, frame=codec.encode(bad))


def test_d2_a_plain_upload_beyond_l2_clip_leaves_the_round_not_the_model(tmp_path: Path) -> None:
    spec = _spec("plain", l2_clip=1.0)
    fed = provision(spec, tmp_path, 3)
    deltas = {i: {"w": np.full(4, 0.1 * (i + 1))} for i in range(3)}
    grid = local_grid(
        fed, ["unused"] * 3, protocol="plain", train=delta_train(deltas), grid_class=OverBound
    )
    workflow = _workflow(spec, fed)
    init = ArrayRecord({"w": Array(np.zeros(4))})
    final = workflow(grid, Context(0, 0, {}, RecordDict(), {}), initial_arrays=init, num_rounds=2)
    # before the fix: the mean was inf and the loop died in round 2
    assert len(workflow.history) == 2
    for result in workflow.history:
        assert len(result.outcome.survivors) == 2 and len(result.outcome.dropped) == 1
    assert np.all(np.isfinite(final["w"].numpy())) and np.all(final["w"].numpy() > 0)


def test_d2_a_non_finite_mean_is_a_skipped_round(tmp_path: Path) -> None:
    """A mean finite in float64 that overflows the float32 model is never released."""
    spec = _spec("plain")
    fed = provision(spec, tmp_path, 3)
    deltas = {i: {"w": np.full(4, 1e39)} for i in range(3)}
    grid = local_grid(fed, ["unused"] * 3, protocol="plain", train=delta_train(deltas))
    workflow = _workflow(spec, fed)
    init = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    with pytest.raises(ThresholdError, match="not finite"):
        workflow.run_round(grid, arrays=init, round_index=1)
    with pytest.raises(ThresholdError, match="all 1 rounds aborted"):
        workflow(grid, Context(0, 0, {}, RecordDict(), {}), initial_arrays=init, num_rounds=1)
    assert workflow.history == []


def test_a_step_that_overflows_the_global_models_dtype_is_not_applied() -> None:
    """A finite float32 model plus a finite (float64) mean can overflow float32: the loop keeps
    the model it had instead of applying infinities."""

    from secure_fl.integrations.flower.workflow import FlowerRoundResult
    from secure_fl.rounds.base import RoundOutcome
    from secure_fl.transport.config_common import RosterEntry

    class Once(SecureAggregationWorkflow):
        def run_round(self, grid: Any, **kwargs: Any) -> Any:
            mean = ArrayRecord({"w": Array(np.full(3, 3e38))})
            outcome = RoundOutcome(frozenset({1, 2}), frozenset(), frozenset(), mean=None)
            return FlowerRoundResult(outcome, mean, {1: 1.0, 2: 1.0}, {}, {}, 0.0, 0, 0)

    init = ArrayRecord({"w": Array(np.full(3, 3e38, dtype=np.float32))})
    roster = [RosterEntry(name="a", site_id=1), RosterEntry(name="b", site_id=2)]
    workflow = Once(_spec("plain"), roster)
    final = workflow(None, None, initial_arrays=init, num_rounds=1)  # type: ignore[arg-type]
    assert np.all(np.isfinite(final["w"].numpy()))
    np.testing.assert_array_equal(final["w"].numpy(), init["w"].numpy())
