"""The secure_fl ClientApp mod, driven in process with Flower Message/Context objects against the
round layer's server halves: the sums, dropouts, state freshness across messages, the site's
policy refusals (nothing derived from the data sent), and what never leaves the node."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

flwr = pytest.importorskip("flwr")

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from site_helpers import (  # noqa: E402
    Node,
    drive_round,
    expected_mean,
    instruction,
    send,
)

from secure_fl.integrations.flower import records  # noqa: E402
from secure_fl.integrations.flower.mod import (  # noqa: E402
    FAIL_CLOSED,
    PENDING,
    STATE,
    make_secure_fl_mod,
    secure_fl_mod,
)
from secure_fl.integrations.flower.provision import FlowerFederation, provision_flower  # noqa: E402
from secure_fl.integrations.flower.records import Envelope  # noqa: E402
from secure_fl.rounds import codec  # noqa: E402
from secure_fl.rounds.policy import SitePolicy  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402

GLOBAL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, np.float32)}


def _federation(tmp_path: Path, n: int, policy: SitePolicy) -> FlowerFederation:
    return provision_flower([f"site-{i}" for i in range(1, n + 1)], tmp_path, policy=policy)


def _nodes(fed: FlowerFederation, seed: int = 0) -> list[Node]:
    rng = np.random.default_rng(seed)
    nodes = []
    for entry in fed.roster:
        trained = {k: (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) for k, v in GLOBAL.items()}
        nodes.append(
            Node(
                entry.site_id,
                100 + entry.site_id,
                fed.site_configs[entry.name],
                trained,
                num_examples=10 * entry.site_id,
            )
        )
    return nodes


def _keys(fed: FlowerFederation) -> dict[int, bytes]:
    return {e.site_id: e.verify_key for e in fed.roster if e.verify_key is not None}


def _update_bytes(node: Node) -> bytes:
    flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in node.trained.values()])
    base = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in GLOBAL.values()])
    return bytes((flat - base).astype("<f8").tobytes())


def _state_bytes(context: Context) -> bytes:
    out = b""
    for rec in context.state.config_records.values():
        for value in rec.values():
            out += value if isinstance(value, bytes) else repr(value).encode()
    return out


CASES = [
    ("secagg+", {"active": True}, SitePolicy()),
    ("secagg", {"active": False}, SitePolicy(require_active=False)),
    ("plain", {}, SitePolicy(aggregations=("plain",), allow_plain=True)),
]


@pytest.mark.parametrize(("protocol", "options", "policy"), CASES)
def test_round_mean_is_the_weighted_mean(
    tmp_path: Path, protocol: str, options: dict[str, Any], policy: SitePolicy
) -> None:
    fed = _federation(tmp_path, 3, policy)
    nodes = _nodes(fed)
    spec = AggregationSpec.from_options(protocol, options)
    run = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed))
    assert run.error is None and run.left == {}
    assert run.outcome is not None and run.outcome.mean is not None
    assert run.outcome.survivors == frozenset({1, 2, 3})
    assert run.weights == {1: 10.0, 2: 20.0, 3: 30.0}
    tol = 1e-12 if protocol == "plain" else 1e-5
    np.testing.assert_allclose(run.outcome.mean, expected_mean(nodes, GLOBAL), atol=tol)
    for node in nodes:  # the round is over: nothing of it stays in context.state
        assert not any(k.startswith("secure_fl.") for k in node.context.state)


def test_train_reply_holds_weight_and_metrics_never_arrays(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)
    run = drive_round(
        nodes, AggregationSpec.from_options("secagg+", {}), GLOBAL, verify_keys=_keys(fed)
    )
    for site, reply in run.train_replies.items():
        assert len(reply.content.array_records) == 0
        # the user's metrics leave only with the masked input (test_mod_attacks.py, A3)
        assert set(reply.content.keys()) == {records.KEY}
        env = records.read(reply.content)
        assert env is not None and env.weight == 10 * site and env.proof is not None


def test_a_site_vanishing_before_its_masked_input_is_dropped(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 4, SitePolicy())
    nodes = _nodes(fed, seed=1)
    spec = AggregationSpec.from_options("secagg+", {})
    # site 4 answers train, setup and share keys, then vanishes before its masked input
    run = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed), vanish_after={4: 3})
    assert run.error is None and run.outcome is not None and run.outcome.mean is not None
    assert run.outcome.survivors == frozenset({1, 2, 3})
    assert run.outcome.dropped == frozenset({4})
    np.testing.assert_allclose(run.outcome.mean, expected_mean(nodes[:3], GLOBAL), atol=1e-5)


def test_no_secret_in_the_clear_in_context_state(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)
    seen: dict[int, list[bytes]] = {n.site_id: [] for n in nodes}
    keys_seen: set[str] = set()

    def look(node: Node, stage: str, n: int) -> None:
        seen[node.site_id].append(_state_bytes(node.context))
        keys_seen.update(node.context.state.keys())

    run = drive_round(
        nodes,
        AggregationSpec.from_options("secagg+", {}),
        GLOBAL,
        verify_keys=_keys(fed),
        before=look,
    )
    assert run.error is None and {PENDING, STATE} <= keys_seen
    for node in nodes:
        folder = Path(fed.site_configs[f"site-{node.site_id}"]).parent
        update = _update_bytes(node)
        secrets = [
            update[:16],
            update[-16:],
            (folder / "state" / "flower" / "sealer.key").read_bytes(),
            (folder / "signing.key").read_bytes(),
        ]
        assert len(seen[node.site_id]) >= 4
        for blob in seen[node.site_id]:
            assert blob and not any(secret in blob for secret in secrets)


def test_a_replayed_state_blob_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)
    saved: dict[str, Any] = {}

    def replay(node: Node, stage: str, n: int) -> None:
        if node.site_id != 2:
            return
        if n == 3:  # before the key roster: keep the blob the setup exported
            saved["blob"] = node.context.state.config_records[STATE]
        if n == 4:  # before the share delivery: hand back the older blob
            node.context.state[STATE] = saved["blob"]

    run = drive_round(
        nodes,
        AggregationSpec.from_options("secagg+", {}),
        GLOBAL,
        verify_keys=_keys(fed),
        before=replay,
    )
    assert run.left[2].startswith("DecryptionError")
    assert run.outcome is not None and run.outcome.survivors == frozenset({1, 3})
    assert run.outcome.dropped == frozenset({2})  # its masks were recovered, nothing revealed


def _left_without_frame(run: Any, site: int, error: str) -> None:
    assert run.left.get(site, "").startswith(error), run.left


@pytest.mark.parametrize(
    ("protocol", "options", "policy", "error"),
    [
        ("plain", {}, SitePolicy(), "PolicyError"),
        ("secagg+", {"active": False}, SitePolicy(), "PolicyError"),
        ("secagg+", {"threshold": 2}, SitePolicy(corrupt_fraction=0.3), "PolicyError"),
        ("secagg+", {}, SitePolicy(require_dp=True), "PolicyError"),
    ],
    ids=["plain-not-allowed", "semi-honest", "threshold-too-low", "dp-required"],
)
def test_policy_refusals_leave_and_send_nothing(
    tmp_path: Path, protocol: str, options: dict[str, Any], policy: SitePolicy, error: str
) -> None:
    fed = _federation(tmp_path, 4, policy)
    nodes = _nodes(fed)
    sent: list[Envelope] = []

    def watch(site: int, stage: str, env: Envelope) -> Envelope:
        sent.append(env)
        return env

    run = drive_round(
        nodes,
        AggregationSpec.from_options(protocol, options),
        GLOBAL,
        verify_keys=_keys(fed),
        tamper=watch,
    )
    assert set(run.left) == {1, 2, 3, 4}
    for site in run.left:
        _left_without_frame(run, site, error)
    assert all(env.frame is None for env in sent)  # no setup reply carried anything
    assert run.outcome is None
    for node in nodes:
        assert PENDING not in node.context.state and STATE not in node.context.state


def test_a_dp_round_below_the_site_floor_is_refused(tmp_path: Path) -> None:
    from secure_fl.privacy.codec_noise import CodecNoiseConfig

    fed = _federation(tmp_path, 3, SitePolicy(min_noise_multiplier=2.0))
    nodes = _nodes(fed)
    length = sum(v.size for v in GLOBAL.values())
    weak = CodecNoiseConfig(
        mechanism="discrete_gaussian",
        clip=1.0,
        noise_multiplier=0.5,
        honest_threshold=2,
        threshold=2,
        colluders=0,
        num_sites=3,
        dimension=length,
    )
    spec = AggregationSpec.from_options("secagg+", {"l2_clip": 1.0})
    run = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed), dp_json=weak.to_json())
    assert set(run.left) == {1, 2, 3}
    assert all("floor" in reason for reason in run.left.values()), run.left


def test_messages_without_secure_fl_pass_through_and_bad_ones_never_raise(
    tmp_path: Path,
) -> None:
    # (B1) a train message without the secure_fl record is refused: the user's train function
    # does not run and no array leaves; evaluate / query pass through unless the reply holds
    # arrays
    fed = _federation(tmp_path, 2, SitePolicy())
    node = _nodes(fed)[0]
    for kind in ("train", "train.finetune"):
        plain_msg = _typed(
            instruction(RecordDict({"config": ConfigRecord({"x": 1})}), node.node_id), kind
        )
        reply = secure_fl_mod(plain_msg, node.context, node.train)
        assert node.train_calls == 0 and reply.has_error() and not reply.has_content()
        assert "without the secure_fl record" in (reply.error.reason or "")
    for kind in ("evaluate", "query.x"):
        msg = _typed(
            instruction(RecordDict({"config": ConfigRecord({"x": 1})}), node.node_id), kind
        )
        reply = secure_fl_mod(msg, node.context, node.train)  # its reply holds arrays
        assert node.train_calls == 1 and reply.has_error() and not reply.has_content()
        assert "holds arrays" in (reply.error.reason or "")
        node.train_calls = 0

        def score(msg: Message, context: Context) -> Message:
            return Message(RecordDict({"metrics": MetricRecord({"dice": 0.5})}), reply_to=msg)

        reply = secure_fl_mod(msg, node.context, score)
        assert not reply.has_error() and reply.content.metric_records["metrics"]["dice"] == 0.5
    bad = instruction(RecordDict({records.KEY: ConfigRecord({"v": 9})}), node.node_id)
    reply = secure_fl_mod(bad, node.context, node.train)
    assert reply.has_error() and "RemoteProtocolError" in (reply.error.reason or "")
    # a step with no state, a setup with no pending update, a user train function that raises
    step_env = send(node, "step", 5, b"junk")
    assert step_env.left is not None and step_env.frame is None
    setup_env = send(node, "setup", 5, b"SFR\x01\x02{}")
    assert setup_env.left is not None and setup_env.frame is None

    def boom(msg: Message, context: Context) -> Message:
        raise RuntimeError("secret 3.14159 in a user error")

    content = RecordDict({records.KEY: records.to_record(Envelope("train", 7))})
    reply = make_secure_fl_mod()(instruction(content, node.node_id), node.context, boom)
    env = records.read(reply.content)
    assert env is not None and env.left is not None and "3.14159" not in env.left
    assert env.left == "InvalidUpdateError: the train function failed"  # not even the class


def _typed(msg: Message, message_type: str) -> Message:
    """``msg`` (from :func:`instruction`) with another message type."""
    msg.metadata.message_type = message_type
    return msg


def test_bad_user_replies_leave(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 2, SitePolicy())
    node = _nodes(fed)[0]
    node.num_examples = 0
    run = drive_round(
        [node, _nodes(fed)[1]],
        AggregationSpec.from_options("secagg+", {}),
        GLOBAL,
        verify_keys=_keys(fed),
    )
    assert run.left[1] == "InvalidUpdateError: the train function failed"
    node.num_examples = 3
    node.trained = {"w": GLOBAL["w"]}  # keys differ from the sent arrays
    content = RecordDict({records.KEY: records.to_record(Envelope("train", 8))})
    from site_helpers import arrays_of

    content["arrays"] = arrays_of(GLOBAL)
    env = records.read(node.call(content).content)
    # (C5) unusable trained arrays: a zero update, and the reply of a good train
    assert env is not None and env.left is None and env.weight == 3


def test_a_reused_round_id_or_model_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)
    spec = AggregationSpec.from_options("secagg+", {})
    first = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed), round_id=1234)
    assert first.error is None and first.left == {}
    again = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed), round_id=1234)
    assert set(again.left) == {1, 2, 3} and "already took part" in again.left[1]
    # the same global model under a fresh round id: its update was released already
    same_model = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed))
    assert set(same_model.left) == {1, 2, 3} and "already released" in same_model.left[1]
    moved = {k: v + 1 for k, v in GLOBAL.items()}
    for node in nodes:
        node.trained = {k: v + 1 for k, v in node.trained.items()}
    fresh = drive_round(nodes, spec, moved, verify_keys=_keys(fed))
    assert fresh.error is None and fresh.left == {}


def test_a_node_that_failed_closed_takes_no_more_rounds(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)
    marker = Path(fed.site_configs["site-1"]).parent / "state" / "flower" / FAIL_CLOSED
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"reason": "test"}))
    run = drive_round(
        nodes, AggregationSpec.from_options("secagg+", {}), GLOBAL, verify_keys=_keys(fed)
    )
    assert run.left[1].startswith("PolicyError") and "failed closed" in run.left[1]
    assert nodes[0].train_calls == 0


def test_site_fixed_in_the_mod_and_no_arrays_sent(tmp_path: Path) -> None:
    from secure_fl.integrations.flower.node import load_flower_site

    fed = _federation(tmp_path, 3, SitePolicy(require_active=False))
    nodes = _nodes(fed)
    sites = {e.site_id: load_flower_site(fed.site_configs[e.name]) for e in fed.roster}
    for node in nodes:
        node.context.node_config = {}
        site = sites[node.site_id]
        node.source = site if node.site_id != 2 else (lambda ctx, site=site: site)
    run = drive_round(nodes, AggregationSpec.from_options("secagg", {"active": False}), None)
    assert run.error is None and run.outcome is not None and run.outcome.mean is not None
    np.testing.assert_allclose(run.outcome.mean, expected_mean(nodes, None), atol=1e-5)
    assert dataclasses.is_dataclass(sites[1])
    assert all(len(r.content.array_records) == 0 for r in run.train_replies.values())


def test_ckks_round_sites_decrypt_the_new_global_model(tmp_path: Path) -> None:
    pytest.importorskip("tenseal")
    from secure_fl.he.context import PublicContext
    from secure_fl.rounds.ckks import CkksServerRound
    from secure_fl.rounds.messages import CkksResult
    from secure_fl.rounds.plan import RoundPlan

    fed = provision_flower(["a", "b", "c"], tmp_path, ckks_preset="n8192-add")
    assert fed.ckks_public is not None and fed.ckks_fingerprint is not None
    nodes = _nodes(fed, seed=3)
    public = PublicContext.load(fed.ckks_public, expected_fingerprint=fed.ckks_fingerprint)

    def server(plan: RoundPlan) -> CkksServerRound:
        return CkksServerRound(plan, public)

    rid = 4242
    spec = AggregationSpec.from_options("ckks", {})
    run = drive_round(nodes, spec, GLOBAL, round_id=rid, make_server=server)
    assert run.error is None and run.left == {}, (run.error, run.left)
    assert run.outcome is not None and run.outcome.encrypted is not None
    result = codec.encode(CkksResult(rid, run.outcome.encrypted))
    trained = expected_mean(nodes, None)  # the mean of the new local models
    for node in nodes:
        env = send(node, "result", rid, result)
        assert env.left is None and env.frame is None
        folder = fed.site_configs[{1: "a", 2: "b", 3: "c"}[node.site_id]].parent
        with np.load(folder / "state" / "flower" / f"model-{rid}.npz") as model:
            assert list(model.keys()) == list(GLOBAL)
            flat = np.concatenate([model[k].astype(np.float64).reshape(-1) for k in GLOBAL])
        np.testing.assert_allclose(flat, trained, atol=1e-5)
    # a second result for the round (or one for a round it did not encrypt in) is refused
    again = send(nodes[0], "result", rid, result)
    assert again.left is not None and "RemoteProtocolError" in again.left


def test_a_dp_round_adds_noise_and_is_charged_to_the_site_budget(tmp_path: Path) -> None:
    from secure_fl.privacy.codec_noise import CodecNoiseConfig
    from secure_fl.rounds.plan import plan_round

    policy = SitePolicy(min_noise_multiplier=0.5, max_dp_rounds=1)
    fed = _federation(tmp_path, 3, policy)
    nodes = _nodes(fed)
    length = sum(v.size for v in GLOBAL.values())
    spec = AggregationSpec.from_options("secagg+", {"l2_clip": 1.0, "bits": 64})
    probe = plan_round(
        spec,
        {1: 10.0, 2: 20.0, 3: 30.0},
        vector_length=length,
        round_id=1,
        verify_keys=_keys(fed),
    )
    assert probe.secagg is not None
    t = probe.secagg.threshold
    cfg = CodecNoiseConfig(
        mechanism="discrete_gaussian",
        clip=1.0,
        noise_multiplier=1.0,
        honest_threshold=t,
        threshold=t,
        colluders=0,
        num_sites=3,
        dimension=length,
    )
    run = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed), dp_json=cfg.to_json())
    assert run.error is None and run.left == {}, (run.error, run.left)
    assert run.outcome is not None and run.outcome.mean is not None
    error = np.abs(run.outcome.mean - expected_mean(nodes, GLOBAL))
    assert 1e-4 < float(error.max()) < 10.0  # noised, around the true mean
    for entry in fed.roster:
        record = fed.site_configs[entry.name].parent / "state" / "flower" / "dp_rounds.jsonl"
        lines = [json.loads(line) for line in record.read_text().splitlines()]
        assert len(lines) == 1 and lines[0]["stage"] == "masked_input"
        assert lines[0]["survivors"] == [1, 2, 3]
    for node in nodes:  # a new model, but the budget of one DP round is spent
        node.trained = {k: v + 1 for k, v in node.trained.items()}
    moved = {k: v + 1 for k, v in GLOBAL.items()}
    second = drive_round(nodes, spec, moved, verify_keys=_keys(fed), dp_json=cfg.to_json())
    assert set(second.left) == {1, 2, 3} and "max_dp_rounds" in second.left[1]


def test_a_check_on_secret_values_fails_closed_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from secure_fl.errors import PostDecryptionError
    from secure_fl.integrations.flower import mod_stages

    fed = _federation(tmp_path, 3, SitePolicy())
    node = _nodes(fed)[0]

    def fails(*args: Any) -> bytes:
        raise PostDecryptionError("chunk 0 failed the check after decryption")

    monkeypatch.setattr(mod_stages, "run_stage", fails)
    env = send(node, "result", 11, b"frame")
    assert (env.left or "").startswith("PostDecryptionError") and env.frame is None
    marker = fed.site_configs["site-1"].parent / "state" / "flower" / FAIL_CLOSED
    assert marker.exists()
    monkeypatch.undo()
    run = drive_round(
        _nodes(fed), AggregationSpec.from_options("secagg+", {}), GLOBAL, verify_keys=_keys(fed)
    )
    assert "failed closed" in run.left[1] and 2 not in run.left


def test_a_pending_update_of_another_round_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)
    spec = AggregationSpec.from_options("secagg+", {})
    kept: dict[str, Any] = {}

    def keep(node: Node, stage: str, n: int) -> None:
        if node.site_id == 1 and n == 2:
            kept["pending"] = node.context.state.config_records[PENDING]

    first = drive_round(nodes, spec, GLOBAL, verify_keys=_keys(fed), before=keep)
    assert first.error is None and first.left == {}
    folder = fed.site_configs["site-1"].parent / "state" / "flower"
    record = json.loads((folder / "releases.json").read_text())
    assert record["contributed"] == record["joined"] and len(record["joined"]) == 1
    assert list(record["unmasked"].values()) == [[1, 2, 3]]

    def swap(node: Node, stage: str, n: int) -> None:
        if node.site_id == 1 and n == 2:  # the old round's sealed update, relabelled
            old = kept["pending"]
            node.context.state[PENDING] = ConfigRecord(
                {
                    "round": node.context.state.config_records[PENDING]["round"],
                    "sealed": old["sealed"],
                }
            )

    moved = {k: v + 1 for k, v in GLOBAL.items()}
    for node in nodes:
        node.trained = {k: v + 1 for k, v in node.trained.items()}
    second = drive_round(nodes, spec, moved, verify_keys=_keys(fed), before=swap)
    assert second.left[1].startswith("DecryptionError")
    assert second.outcome is not None and second.outcome.survivors == frozenset({2, 3})


def test_a_frame_of_another_round_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, 3, SitePolicy())
    nodes = _nodes(fed)

    def relabel(node: Node, stage: str, n: int) -> None:
        if node.site_id == 3 and n == 2:
            rec = node.context.state.config_records[PENDING]
            node.context.state[PENDING] = ConfigRecord({"round": 1, "sealed": rec["sealed"]})

    run = drive_round(
        nodes,
        AggregationSpec.from_options("secagg+", {}),
        GLOBAL,
        verify_keys=_keys(fed),
        before=relabel,
    )
    assert run.left[3].startswith("RemoteProtocolError")
    node = nodes[0]
    from secure_fl.rounds.messages import PlainSetup

    setup = codec.encode(PlainSetup(9, (1, 2), 8, {1: 10.0, 2: 20.0}))
    env = send(node, "setup", 10, setup)  # the frame says round 9, the envelope round 10
    assert (env.left or "").startswith("RemoteProtocolError") and env.frame is None
