"""Regression tests of a malicious server (or node) against the secure_fl Flower mod and the
workflow's node -> site map (attack findings A1, A3, A4, A5, A8; second review B1, B2b, B3, B6):
each test reproduces the attack and checks that it fails."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import pytest

flwr = pytest.importorskip("flwr")

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from server_helpers import local_grid, provision, write_updates  # noqa: E402
from site_helpers import Node, arrays_of, drive_round, instruction, send  # noqa: E402

from secure_fl.errors import InvalidUpdateError, ThresholdError  # noqa: E402
from secure_fl.integrations.flower import records  # noqa: E402
from secure_fl.integrations.flower.mod import FAIL_CLOSED, model_digest, secure_fl_mod  # noqa: E402
from secure_fl.integrations.flower.node import (  # noqa: E402
    MAX_TRAINS_WITHOUT_SETUP,
    REFUSED_JOINED,
    REFUSED_RELEASED,
    REFUSED_TRAIN_CAP,
    site_from_node_config,
)
from secure_fl.integrations.flower.provision import FlowerFederation, provision_flower  # noqa: E402
from secure_fl.integrations.flower.records import Envelope  # noqa: E402
from secure_fl.integrations.flower.workflow import SecureAggregationWorkflow  # noqa: E402
from secure_fl.rounds import codec  # noqa: E402
from secure_fl.rounds.local import in_process_policy, make_server_round  # noqa: E402
from secure_fl.rounds.messages import (  # noqa: E402
    MaskedInput,
    PlainSetup,
    PlainUpload,
    UnmaskResponse,
)
from secure_fl.rounds.policy import SitePolicy  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402

GLOBAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, np.float32)}
ORDER = ("w", "b")
SPEC = AggregationSpec.from_options("secagg+", {"active": True})


def _federation(tmp_path: Path, n: int, **kwargs: Any) -> FlowerFederation:
    kwargs.setdefault("policy", SitePolicy())
    return provision_flower([f"s{i}" for i in range(1, n + 1)], tmp_path / "fed", **kwargs)


def _keys(fed: FlowerFederation, without: int | None = None) -> dict[int, bytes]:
    return {e.site_id: e.verify_key for e in fed.roster if e.verify_key and e.site_id != without}


class EchoNode(Node):
    """A deterministic local step that keeps the sent record's key order."""

    def train(self, msg: Message, context: Any) -> Message:
        self.train_calls += 1
        sent = msg.content.array_records["arrays"]
        out = {k: (v.numpy() + self.trained[k]).astype(np.float32) for k, v in sent.items()}
        metrics = MetricRecord({"num-examples": self.num_examples})
        return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)


class Float32Node(Node):
    """Loads the sent model into a float32 model in a fixed order (torch load_state_dict)."""

    def train(self, msg: Message, context: Any) -> Message:
        self.train_calls += 1
        sent = msg.content.array_records["arrays"]
        model = {k: sent[k].numpy().astype(np.float32) for k in ORDER}
        out = {k: (model[k] + self.trained[k]).astype(np.float32) for k in ORDER}
        metrics = MetricRecord({"num-examples": self.num_examples, "train-loss": 0.25})
        return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)


def _nodes(fed: FlowerFederation, cls: type[Node]) -> list[Node]:
    rng = np.random.default_rng(1)
    return [
        cls(
            e.site_id,
            100 + e.site_id,
            fed.site_configs[e.name],
            {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in GLOBAL.items()},
            10,
        )
        for e in fed.roster
    ]


def _train(node: Node, model: dict[str, np.ndarray] | None) -> Message:
    rid = int.from_bytes(os.urandom(8), "big") % (records.ROUND_ID_LIMIT - 1) + 1
    content = RecordDict(
        {records.KEY: records.to_record(Envelope("train", rid)), "config": ConfigRecord({})}
    )
    if model is not None:
        content["arrays"] = arrays_of(model)
    return node.call(content)


def test_a1_a_reordered_copy_of_a_released_model_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 4)
    nodes = _nodes(fed, EchoNode)
    first = drive_round(nodes, SPEC, GLOBAL, verify_keys=_keys(fed))
    assert first.error is None and first.left == {}
    # the same model, arrays in another order, under a fresh round id, without the target:
    # answering would give the difference of two sums = the target's update
    reordered = {"b": GLOBAL["b"], "w": GLOBAL["w"]}
    second = drive_round(nodes[:-1], SPEC, reordered, verify_keys=_keys(fed, without=4))
    assert set(second.left) == {1, 2, 3}
    assert all("already released" in reason for reason in second.left.values())


def test_a1_trained_arrays_in_another_order_make_the_update_in_the_sent_order(
    tmp_path: Path,
) -> None:
    fed = _federation(tmp_path, 3)
    nodes = _nodes(fed, Node)  # returns its arrays in its own order (w, b)
    sent = {"b": GLOBAL["b"], "w": GLOBAL["w"]}
    run = drive_round(nodes, SPEC, sent, verify_keys=_keys(fed))
    assert run.error is None and run.left == {} and run.outcome is not None
    total = sum(n.num_examples for n in nodes)
    want = (
        sum(
            np.concatenate([(n.trained[k] - sent[k]).astype(np.float64).reshape(-1) for k in sent])
            * n.num_examples
            for n in nodes
        )
        / total
    )
    assert np.max(np.abs(np.asarray(run.outcome.mean) - want)) < 1e-4


def test_a4_a_float64_copy_nudged_below_float32_resolution_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 4)
    nodes = _nodes(fed, Float32Node)
    first = drive_round(nodes, SPEC, GLOBAL, verify_keys=_keys(fed))
    assert first.error is None and first.left == {}
    nudge = {k: v.astype(np.float64) * (1 + 2.0**-40) for k, v in GLOBAL.items()}
    assert all(np.array_equal(nudge[k].astype(np.float32), GLOBAL[k]) for k in GLOBAL)
    second = drive_round(nodes[:-1], SPEC, nudge, verify_keys=_keys(fed, without=4))
    assert set(second.left) == {1, 2, 3}
    assert all("already released" in reason for reason in second.left.values())
    # an honest next model (another float32 model) is still taken
    moved = {k: v + 1 for k, v in GLOBAL.items()}
    third = drive_round(nodes, SPEC, moved, verify_keys=_keys(fed))
    assert third.error is None and third.left == {}


def test_a4_float64_models_are_told_apart_at_float64_precision(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3)
    nodes = _nodes(fed, EchoNode)
    for node in nodes:
        node.trained = {k: v.astype(np.float64) for k, v in node.trained.items()}

    class F64(EchoNode):
        def train(self, msg: Message, context: Any) -> Message:
            sent = msg.content.array_records["arrays"]
            out = {k: v.numpy() + self.trained[k] for k, v in sent.items()}
            metrics = MetricRecord({"num-examples": self.num_examples})
            return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)

    f64: list[Node] = [
        F64(n.site_id, n.node_id, n.config_path, n.trained, n.num_examples) for n in nodes
    ]
    base = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    step = {k: v + 1e-12 for k, v in base.items()}  # a different float64 model
    assert drive_round(f64, SPEC, base, verify_keys=_keys(fed)).left == {}
    assert drive_round(f64, SPEC, step, verify_keys=_keys(fed)).left == {}


class ProbeNode(Node):
    """A typical train function reporting its training loss (a function of the private data)."""

    def train(self, msg: Message, context: Any) -> Message:
        self.train_calls += 1
        sent = msg.content.array_records["arrays"]
        out = {k: v.numpy() + self.trained[k] for k, v in sent.items()}
        loss = float(sum(np.sum(v.numpy() ** 2) for v in sent.values()))
        metrics = MetricRecord({"num-examples": self.num_examples, "train-loss": loss})
        return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)


class RecordingNode(ProbeNode):
    """Keeps every reply of the mod (stage, envelope frame type, record names)."""

    def call(self, content: RecordDict) -> Message:
        reply = super().call(content)
        env = records.read(reply.content)
        assert env is not None
        kind = type(codec.decode(env.frame)).__name__ if env.frame else None
        self.replies.append((env.stage, kind, set(reply.content.keys()), reply))
        return reply

    def __post_init__(self) -> None:
        super().__post_init__()
        self.replies: list[tuple[str, str | None, set[str], Message]] = []


def test_a3_the_train_stage_is_no_metrics_oracle_and_is_capped(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, policy=SitePolicy(require_active=True))
    node = _nodes(fed, ProbeNode)[0]
    for _ in range(MAX_TRAINS_WITHOUT_SETUP):
        reply = _train(node, GLOBAL)
        env = records.read(reply.content)
        assert env is not None and env.left is None and env.weight == 10
        assert set(reply.content.keys()) == {records.KEY}  # no "metrics": no loss to probe
    calls = node.train_calls
    env = records.read(_train(node, GLOBAL).content)
    assert env is not None and (env.left or "").startswith("PolicyError")
    assert "without a setup" in (env.left or "")
    assert node.train_calls == calls  # the training did not run


@pytest.mark.parametrize("protocol", ["secagg+", "plain"])
def test_a3_metrics_leave_only_with_the_masked_input_or_upload(
    tmp_path: Path, protocol: str
) -> None:
    active = protocol == "secagg+"
    spec = AggregationSpec.from_options(protocol, {"active": True} if active else {})
    fed = _federation(tmp_path, 3, policy=in_process_policy(spec))
    rng = np.random.default_rng(3)
    nodes: list[RecordingNode] = [
        RecordingNode(
            e.site_id,
            100 + e.site_id,
            fed.site_configs[e.name],
            {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in GLOBAL.items()},
            10,
        )
        for e in fed.roster
    ]
    keys = _keys(fed) if active else None
    rounds = MAX_TRAINS_WITHOUT_SETUP + 1  # each input that leaves resets the train cap
    for index in range(rounds):
        model = {k: v + index for k, v in GLOBAL.items()}
        run = drive_round(list[Node](nodes), spec, model, verify_keys=keys)
        assert run.error is None and run.left == {}
    # (B6) SecAgg: with the unmask answer, after the model's release was recorded
    wanted = (UnmaskResponse if active else PlainUpload).__name__
    for node in nodes:
        carrying = [r for r in node.replies if "metrics" in r[2]]
        assert [r[1] for r in carrying] == [wanted] * rounds
        assert all(r[2] == {records.KEY} for r in node.replies if r[0] == "train")
        metrics = carrying[0][3].content.metric_records["metrics"]
        assert metrics["num-examples"] == 10 and "train-loss" in metrics


def test_a5_a_server_cannot_make_a_ckks_node_fail_closed(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, ckks_preset="n8192-add")
    node = Node(1, 101, fed.site_configs["s1"], {k: v + 0.1 for k, v in GLOBAL.items()}, 10)
    evil = {"w": np.full((2, 3), 1e30, np.float32), "b": np.zeros(2, np.float32)}
    node.trained = {k: v + 0.1 for k, v in evil.items()}
    _train(node, evil)
    assert not list((tmp_path / "fed").rglob(FAIL_CLOSED))
    node.trained = {k: v + 0.1 for k, v in GLOBAL.items()}
    env = records.read(_train(node, GLOBAL).content)
    assert env is not None and env.left is None  # the node still takes rounds


def test_a5_an_out_of_range_ckks_update_is_clipped_without_a_marker(tmp_path: Path) -> None:
    """Updates beyond the preset's range neither fail a node closed nor make it leave (C7: a
    refusal would be an oracle on the data): each is clipped into the range and uploaded."""
    spec = AggregationSpec.from_options("ckks", {})
    fed = provision(spec, tmp_path, 3)
    ups = [np.full(6, 1e30), np.full(6, 1e30), np.full(6, 1e30)]
    grid = local_grid(fed, write_updates(tmp_path, ups, [1.0, 2.0, 3.0]), protocol="ckks")
    workflow = SecureAggregationWorkflow(
        spec,
        fed.roster,
        stage_timeout_s=5.0,
        ckks_public=fed.ckks_public,
        ckks_fingerprint=fed.ckks_fingerprint,
    )
    layout = records.Layout(("update",), ((6,),), ("<f8",))
    result = workflow.run_round(grid, arrays=None, layout=layout)
    assert result.outcome.survivors == frozenset({1, 2, 3})
    assert not list(tmp_path.rglob(FAIL_CLOSED))


def _impostor_config(fed: FlowerFederation, name: str, folder: Path) -> str:
    """A site JSON of ``name`` whose signing key is not that site's (a node that claims the id
    without its key) and whose state is its own."""
    path = Path(fed.site_configs[name])
    data = json.loads(path.read_text())
    folder.mkdir(parents=True)
    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (folder / "signing.key").write_bytes(key)
    os.chmod(folder / "signing.key", 0o600)
    data["signing_key"] = str(folder / "signing.key")
    data["state_dir"] = str(folder / "state")
    for field in ("roster", "policy", "ckks"):
        if field in data and isinstance(data[field], dict):
            for k, v in list(data[field].items()):
                if isinstance(v, str) and (path.parent / v).exists():
                    data[field][k] = str(path.parent / v)
    out = folder / "site.json"
    out.write_text(json.dumps(data))
    return str(out)


def test_a8_an_unproven_claim_of_an_honest_site_id_is_ignored(tmp_path: Path) -> None:
    spec = AggregationSpec.from_options("secagg+", {"threshold": 3})
    fed = provision(spec, tmp_path, 5)
    ups = [np.random.default_rng(i).normal(size=6) for i in range(6)]
    folders = write_updates(tmp_path, ups, [1.0] * 6)
    configs = [str(fed.site_configs[f"site-{i}"]) for i in range(1, 6)]
    configs.append(_impostor_config(fed, "site-1", tmp_path / "impostor"))
    grid = local_grid(fed, folders, protocol="secagg+", configs=configs)
    layout = records.Layout(("u",), ((6,),), ("<f8",))
    workflow = SecureAggregationWorkflow(spec, fed.roster, stage_timeout_s=5.0)
    result = workflow.run_round(grid, arrays=None, layout=layout)
    assert result.outcome.survivors == frozenset({1, 2, 3, 4, 5})
    assert not result.outcome.excluded
    honest = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 0)
    assert result.nodes[1] == honest


def test_a8_a_proof_is_bound_to_round_site_and_node() -> None:
    base = records.claim_message(7, 1, 42)
    assert base != records.claim_message(8, 1, 42)
    assert base != records.claim_message(7, 2, 42)
    assert base != records.claim_message(7, 1, 43)
    env = Envelope("train", 7, site_id=1, weight=1.0, proof=b"\x01" * 64)
    back = records.read(RecordDict({records.KEY: records.to_record(env)}))
    assert back == env


# -- second attack review (B1, B2b, B3, B6) --------------------------------------------------------


def _typed(node: Node, content: RecordDict, message_type: str) -> Message:
    msg = instruction(content, node.node_id)
    msg.metadata.message_type = message_type
    return msg


def test_b1_a_train_message_without_the_record_never_reaches_the_train_function(
    tmp_path: Path,
) -> None:
    fed = _federation(tmp_path, 3)  # SecAgg only: nothing may leave in the clear
    node = _nodes(fed, EchoNode)[0]
    for kind in ("train", "train.local"):
        content = RecordDict({"arrays": arrays_of(GLOBAL), "config": ConfigRecord({})})
        reply = secure_fl_mod(_typed(node, content, kind), node.context, node.train)
        assert reply.has_error() and not reply.has_content()  # no arrays, no metrics
        assert "without the secure_fl record" in (reply.error.reason or "")
    assert node.train_calls == 0
    # another category runs, but a reply holding arrays is replaced by an Error
    content = RecordDict({"arrays": arrays_of(GLOBAL), "config": ConfigRecord({})})
    reply = secure_fl_mod(_typed(node, content, "evaluate"), node.context, node.train)
    assert node.train_calls == 1 and reply.has_error() and not reply.has_content()


def test_b3_a_setup_the_policy_refuses_does_not_reset_the_train_cap(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 2)  # the policy refuses plain aggregation
    node = _nodes(fed, EchoNode)[0]
    refused = 0
    for index in range(2 * MAX_TRAINS_WITHOUT_SETUP):
        rid = int.from_bytes(os.urandom(8), "big") % (records.ROUND_ID_LIMIT - 1) + 1
        content = RecordDict(
            {
                records.KEY: records.to_record(Envelope("train", rid)),
                "config": ConfigRecord({}),
                "arrays": arrays_of({k: v + index for k, v in GLOBAL.items()}),
            }
        )
        env = records.read(node.call(content).content)
        assert env is not None
        if env.left is not None:
            refused += 1
            assert "without a setup" in env.left
            continue
        setup = PlainSetup(rid, (1, 2), 8, {1: 10.0, 2: 10.0})
        left = send(node, "setup", rid, codec.encode(setup)).left
        assert left is not None and left.startswith("PolicyError")  # nothing left the site
    assert node.train_calls == MAX_TRAINS_WITHOUT_SETUP
    assert refused == MAX_TRAINS_WITHOUT_SETUP


class OracleNode(EchoNode):
    """Reports a metric that is a linear function of a secret of the site and the model."""

    SECRET = np.arange(1.0, 9.0)

    def train(self, msg: Message, context: Any) -> Message:
        reply = super().train(msg, context)
        sent = msg.content.array_records["arrays"]
        w = np.concatenate([sent[k].numpy().astype(np.float64).reshape(-1) for k in ORDER])
        metrics = MetricRecord({"num-examples": self.num_examples, "probe": float(self.SECRET @ w)})
        arrays = reply.content.array_records["arrays"]
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    def call(self, content: RecordDict) -> Message:
        reply = super().call(content)
        if "metrics" in reply.content.metric_records:
            probe = reply.content.metric_records["metrics"]["probe"]
            assert isinstance(probe, float)
            self.seen.append(probe)
        return reply

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seen: list[float] = []


class _AbortAfterInputs:
    """A malicious server: it takes the masked inputs, then stops before any unmasking."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.inputs = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def receive(self, site: int, msg: Any) -> None:
        self.inputs += isinstance(msg, MaskedInput)
        self.inner.receive(site, msg)

    def close(self) -> Any:
        if self.inputs:
            raise RuntimeError("the server aborts before unmasking")
        return self.inner.close()


def test_b6_a_server_that_aborts_after_the_masked_inputs_reads_no_metrics(
    tmp_path: Path,
) -> None:
    fed = _federation(tmp_path, 3)
    nodes = _nodes(fed, OracleNode)
    oracle = nodes[0]
    assert isinstance(oracle, OracleNode)
    for index in range(3):  # the same model twice, then another: never a metric
        model = {k: v + (index // 2) for k, v in GLOBAL.items()}
        run = drive_round(
            nodes,
            SPEC,
            model,
            verify_keys=_keys(fed),
            make_server=lambda plan: cast(Any, _AbortAfterInputs(make_server_round(plan))),
        )
        assert run.outcome is None and run.left == {}
    assert oracle.seen == []
    # a completed round releases them, once, with the unmask answer
    done = drive_round(nodes, SPEC, {k: v + 5 for k, v in GLOBAL.items()}, verify_keys=_keys(fed))
    assert done.error is None and done.left == {} and len(oracle.seen) == 1


def test_b6_a_plain_upload_records_the_models_release(tmp_path: Path) -> None:
    spec = AggregationSpec.from_options("plain", {})
    fed = _federation(tmp_path, 3, policy=in_process_policy(spec))
    nodes = _nodes(fed, OracleNode)
    first = drive_round(nodes, spec, GLOBAL)
    assert first.error is None and first.left == {}
    second = drive_round(nodes, spec, GLOBAL)  # the same model under a new round id
    assert set(second.left) == {1, 2, 3}
    assert all("already released" in reason for reason in second.left.values())
    oracle = nodes[0]
    assert isinstance(oracle, OracleNode) and len(oracle.seen) == 1


class CounterNode(Node):
    """A torch-like model: float weights and an int64 counter (``num_batches_tracked``) that
    does not change the trained weights."""

    def train(self, msg: Message, context: Any) -> Message:
        self.train_calls += 1
        sent = msg.content.array_records["arrays"]
        out = {k: (v.numpy() + self.trained[k]).astype(v.dtype) for k, v in sent.items()}
        metrics = MetricRecord({"num-examples": self.num_examples})
        return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)


def test_b2b_a_model_whose_integer_counter_changed_is_the_same_model(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 4)
    rng = np.random.default_rng(1)
    model: dict[str, np.ndarray] = {**GLOBAL, "n": np.array(7, np.int64)}
    nodes: list[Node] = [
        CounterNode(
            e.site_id,
            100 + e.site_id,
            fed.site_configs[e.name],
            {
                "w": rng.normal(0, 0.3, (2, 3)).astype(np.float32),
                "b": rng.normal(0, 0.3, 2).astype(np.float32),
                "n": np.array(1, np.int64),
            },
            10,
        )
        for e in fed.roster
    ]
    first = drive_round(nodes, SPEC, model, verify_keys=_keys(fed))
    assert first.error is None and first.left == {}
    moved: dict[str, np.ndarray] = {
        **model,
        "n": np.array(1007, np.int64),
    }  # the trained weights are bit-identical
    second = drive_round(nodes[:-1], SPEC, moved, verify_keys=_keys(fed, without=4))
    assert set(second.left) == {1, 2, 3}
    assert all("already released" in reason for reason in second.left.values())


def test_b2b_model_digest_keys_by_float_arrays_only() -> None:
    base: dict[str, np.ndarray] = {"w": np.ones(3, np.float32), "n": np.array(7, np.int64)}
    assert model_digest(base) == model_digest({**base, "n": np.array(9, np.int64)})
    assert model_digest(base) == model_digest({"w": base["w"]})
    # the site's dtype decides: an int64 counter sent as float64 is still a counter
    like: dict[str, np.ndarray] = {"w": base["w"], "n": base["n"]}
    assert model_digest({**base, "n": np.array(9.0)}, like) == model_digest(base, like)
    # the documented residual: a one-ulp float nudge IS a new model (only DP bounds it)
    nudged: dict[str, np.ndarray] = {**base, "w": np.nextafter(base["w"], np.float32(2))}
    assert model_digest(nudged) != model_digest(base)
    with pytest.raises(InvalidUpdateError, match="no floating-point array"):
        model_digest({"n": np.array(7, np.int64)})


@pytest.mark.parametrize("protocol", ["ckks", "plain"])
def test_c9_a_site_that_requires_dp_leaves_a_ckks_or_plain_round(
    tmp_path: Path, protocol: str
) -> None:
    # Attack C9: a site whose policy sets a DP floor (min_noise_multiplier / max_dp_rounds)
    # completed a CKKS round or (allow_plain) a plain round with its update in the clear: no
    # distributed DP noise and nothing charged to dp_rounds.jsonl.
    from secure_fl.he.context import PublicContext
    from secure_fl.rounds.ckks import CkksServerRound

    floor: dict[str, Any] = {"min_noise_multiplier": 1.0, "max_dp_rounds": 5}
    if protocol == "plain":
        policy = SitePolicy(aggregations=("secagg+", "plain"), allow_plain=True, **floor)
        fed = _federation(tmp_path, 3, policy=policy)
    else:
        fed = _federation(tmp_path, 3, policy=SitePolicy(**floor), ckks_preset="n8192-add")
    nodes = _nodes(fed, EchoNode)
    make_server = None
    if protocol == "ckks":
        assert fed.ckks_public is not None and fed.ckks_fingerprint is not None
        public = PublicContext.load(fed.ckks_public, expected_fingerprint=fed.ckks_fingerprint)

        def make_server(plan: Any) -> Any:
            return CkksServerRound(plan, public)

    run = drive_round(
        nodes, AggregationSpec.from_options(protocol, {}), GLOBAL, make_server=make_server
    )
    assert set(run.left) == {1, 2, 3}
    assert all("distributed DP" in reason for reason in run.left.values())
    assert isinstance(run.error, ThresholdError)
    assert run.outcome is None or run.outcome.mean is None
    assert not list((tmp_path / "fed").rglob("dp_rounds.jsonl"))


# -- third review: no refusal that depends on the site's data (C5, C7) ----------------------------


def _private_step(labels: np.ndarray) -> Any:
    """An honest one-step GD train function of ``y = w * 1 + b`` on the site's private labels."""

    def train(msg: Message, context: Any) -> Message:
        sent = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        w, b = float(sent["w"][0]), float(sent["b"][0])
        r = w + b - labels
        out = {"w": np.array([w - 0.5 * np.mean(r)]), "b": np.array([b - 0.5 * np.mean(r)])}
        metrics = MetricRecord({"num-examples": 5})
        return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)

    return train


def _ckks_probe(node: Node, model: dict[str, np.ndarray], public: Any) -> tuple[Any, Any]:
    """(train envelope, setup envelope) of one CKKS round on ``model`` as the server sees them."""
    from secure_fl.rounds.ckks import CkksServerRound
    from secure_fl.rounds.plan import plan_round

    rid = int.from_bytes(os.urandom(6), "big") + 1
    content = RecordDict(
        {
            records.KEY: records.to_record(Envelope("train", rid)),
            "arrays": arrays_of(model),
            "config": ConfigRecord({}),
        }
    )
    train = records.read(node.call(content).content)
    weights = {1: 5.0, 2: 5.0, 3: 5.0}
    spec = AggregationSpec.from_options("ckks", {})
    plan = plan_round(spec, weights, vector_length=2, round_id=rid)
    setup = CkksServerRound(plan, public).setup()[1]
    return train, send(node, "setup", rid, codec.encode(setup))


def test_c7_the_ckks_setup_is_no_range_oracle_on_the_data(tmp_path: Path) -> None:
    """C7: a base just below ``max_abs`` that a site's training pushes beyond it iff its mean
    label exceeds a threshold the server picked (binary search of the mean, one bit a round).
    The server sees the same outcome (an upload, nothing left, no marker) whatever the data; a
    base the server sent beyond the bound is refused whatever the data. Fails before the fix:
    the site whose labels exceed the threshold left the round at setup."""
    from secure_fl.he.context import PublicContext

    fed = _federation(tmp_path, 3, ckks_preset="n8192-add")
    assert fed.ckks_public is not None
    public = PublicContext.load(fed.ckks_public, expected_fingerprint=fed.ckks_fingerprint)
    bound = public.preset.max_abs
    probe = {"w": np.array([bound - 2.0]), "b": np.array([-bound + 1e-9])}  # threshold 2
    beyond = {"w": np.array([bound + 1.0]), "b": np.array([0.0])}
    seen: dict[str, list[tuple[Any, ...]]] = {}
    for label, labels in (("low", np.full(5, 1.0)), ("high", np.full(5, 3.0))):
        node = Node(1, 101, fed.site_configs["s1"], {}, 5)
        node.train = _private_step(labels)  # type: ignore[method-assign]
        outcome = []
        for model in (probe, beyond):
            train, setup = _ckks_probe(node, model, public)
            assert train.left is None
            outcome.append((train.weight, setup.left, setup.frame is not None))
        seen[label] = outcome
        shutil.rmtree(Path(fed.site_configs["s1"]).parent / "state", ignore_errors=True)
    assert seen["low"] == seen["high"]
    assert seen["low"][0] == (5.0, None, True)  # uploaded (the high site's model clipped)
    assert (seen["low"][1][1] or "").startswith("PolicyError") and not seen["low"][1][2]
    assert not list((tmp_path / "fed").rglob(FAIL_CLOSED))


def _overflowing_train(ages: list[float]) -> Any:
    """C5's train function: a float32 step that overflows iff mean(age^2) is large."""

    def train(msg: Message, context: Any) -> Message:
        out = {}
        for key, w in msg.content.array_records["arrays"].items():
            x = np.asarray(ages, np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                grad = np.float32(np.mean((w.numpy()[0] * x).astype(np.float64) * x))
                out[key] = (w.numpy() - np.float32(0.01) * grad).astype(np.float32)
        metrics = MetricRecord({"num-examples": 4})
        return Message(RecordDict({"arrays": arrays_of(out), "metrics": metrics}), reply_to=msg)

    return train


def test_c5_unusable_trained_arrays_give_the_reply_of_a_good_train(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """C5: a crafted model makes the site's training overflow iff a record exceeds a threshold;
    the node used to leave naming the array. Now both sites reply alike (site id, weight), the
    overflowing one has sealed a ZERO update, and the reason is in its own log only. Fails
    before the fix: the second site left with "reply arrays['age'] holds a value that is not
    finite"."""
    from secure_fl.integrations.flower import mod as m
    from secure_fl.integrations.flower.node import NodeSealer, site_from_node_config

    fed = _federation(tmp_path, 3)
    crafted = {"age": np.array([np.float32(3.4e38 / 4000.0)], np.float32)}
    replies, updates = [], []
    for ages in ([40.0, 55.0, 61.0, 70.0], [40.0, 55.0, 61.0, 97.0]):
        node = Node(1, 101, fed.site_configs["s1"], {}, 4)
        node.train = _overflowing_train(ages)  # type: ignore[method-assign]
        rid = int.from_bytes(os.urandom(6), "big") + 1
        content = RecordDict(
            {records.KEY: records.to_record(Envelope("train", rid)), "arrays": arrays_of(crafted)}
        )
        with caplog.at_level("WARNING", logger="secure_fl.integrations.flower"):
            reply = node.call(content)
        env = records.read(reply.content)
        assert env is not None
        replies.append((env.left, env.weight, env.frame, set(reply.content.keys())))
        site = site_from_node_config(node.context.node_config)
        raw = m.open_sealed(node.context, m.PENDING, NodeSealer(site.state_dir), 1, rid)
        updates.append(m.unpack_pending(raw)[1])
        shutil.rmtree(Path(fed.site_configs["s1"]).parent / "state", ignore_errors=True)
    assert replies[0] == replies[1] and replies[0][0] is None
    assert np.all(np.isfinite(updates[0])) and np.any(updates[0] != 0)
    assert np.all(updates[1] == 0)  # the zero update, with the reported weight
    assert "not finite" in caplog.text and "zero update" in caplog.text


def test_c5_a_failing_train_function_gives_one_reason_without_its_class(tmp_path: Path) -> None:
    """C5: the class of the user's exception (or which check of the reply failed) was a channel
    of its own; every failure of the train function now leaves with one constant reason."""
    fed = _federation(tmp_path, 3)

    def raises(exc: BaseException) -> Any:
        def train(msg: Message, context: Any) -> Message:
            raise exc

        return train

    def replies(content: RecordDict) -> Any:
        return lambda msg, context: Message(content, reply_to=msg)

    ok_arrays = arrays_of(GLOBAL)
    trains = [
        raises(FloatingPointError("overflow in age")),
        raises(ZeroDivisionError()),
        raises(InvalidUpdateError("a secure_fl error with 1.2345")),
        replies(RecordDict({"arrays": ok_arrays})),  # no metrics
        replies(RecordDict({"arrays": ok_arrays, "metrics": MetricRecord({"num-examples": 0})})),
        replies(RecordDict({"metrics": MetricRecord({"num-examples": 3})})),  # no arrays
    ]
    reasons = set()
    for i, train in enumerate(trains):
        node = Node(1, 101, fed.site_configs["s1"], {}, 3)
        node.train = train  # type: ignore[method-assign]
        rid = 1000 + i
        content = RecordDict(
            {records.KEY: records.to_record(Envelope("train", rid)), "arrays": arrays_of(GLOBAL)}
        )
        env = records.read(node.call(content).content)
        assert env is not None and env.weight is None
        reasons.add(env.left)
        shutil.rmtree(Path(fed.site_configs["s1"]).parent / "state", ignore_errors=True)
    assert reasons == {"InvalidUpdateError: the train function failed"}


# -- round-4 finding D1: no hash of a site's update in the guard, constant refusals ------------


def test_d1_a_train_without_arrays_keys_the_guard_on_no_hash_of_the_update(
    tmp_path: Path,
) -> None:
    """A server that sends no arrays learns nothing from the guard: the same trained arrays
    twice are not refused as "already released" (no link between two rounds' updates), and the
    node's record holds no digest of the update (so no refusal can carry one)."""
    fed = _federation(tmp_path, 4)
    nodes = _nodes(fed, Node)  # Node.train returns its fixed trained arrays, whatever was sent
    first = drive_round(nodes, SPEC, None, verify_keys=_keys(fed))
    assert first.error is None and first.left == {}
    second = drive_round(nodes, SPEC, None, verify_keys=_keys(fed))
    assert second.error is None and second.left == {}  # before the fix: all "already released"
    for node in nodes:
        state_dir = site_from_node_config(node.context.node_config).state_dir
        record = json.loads((state_dir / "flower" / "releases.json").read_text())
        assert model_digest(node.trained) not in record["content"]
        assert len(record["content"]) == 2  # one random digest per round


def test_d1_every_refusal_of_the_release_guard_is_a_constant_text(tmp_path: Path) -> None:
    """A refused re-release names neither the model's digest nor the earlier round id; the
    train cap names no count: the server gets one of the constant REFUSED_* texts."""
    fed = _federation(tmp_path, 4)
    nodes = _nodes(fed, EchoNode)
    rid = 123456789
    first = drive_round(nodes, SPEC, GLOBAL, verify_keys=_keys(fed), round_id=rid)
    assert first.error is None and first.left == {}
    second = drive_round(nodes, SPEC, GLOBAL, verify_keys=_keys(fed))
    digest = model_digest(GLOBAL, {k: v.astype(np.float32) for k, v in GLOBAL.items()})
    assert set(second.left) == {1, 2, 3, 4}
    for reason in second.left.values():
        assert reason == f"PolicyError: {REFUSED_RELEASED}"
        assert digest[:8] not in reason and str(rid) not in reason
    again = drive_round(nodes, SPEC, {"w": GLOBAL["w"] + 1, "b": GLOBAL["b"]}, round_id=rid)
    assert set(again.left) == {1, 2, 3, 4}
    assert all(r == f"PolicyError: {REFUSED_JOINED}" for r in again.left.values())
    node = _nodes(_federation(tmp_path / "cap", 3), ProbeNode)[0]
    for _ in range(MAX_TRAINS_WITHOUT_SETUP):
        _train(node, GLOBAL)
    env = records.read(_train(node, GLOBAL).content)
    assert env is not None and env.left == f"PolicyError: {REFUSED_TRAIN_CAP}"
