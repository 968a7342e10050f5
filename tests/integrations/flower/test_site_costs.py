"""What one secure_fl round costs a Flower site, and that the cheaper paths keep the guarantees:
durable writes per round (each is a file write, an fsync and a directory fsync), the sealed
bytes of the pending update and of the round state, and the sealer's compare-and-set consume
(two processes racing to restore one blob cannot both succeed)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

flwr = pytest.importorskip("flwr")

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402
from site_helpers import Node, arrays_of, drive_round  # noqa: E402

from secure_fl import atomic  # noqa: E402
from secure_fl.errors import DecryptionError  # noqa: E402
from secure_fl.integrations.flower import mod, node, records  # noqa: E402
from secure_fl.integrations.flower.node import NodeSealer  # noqa: E402
from secure_fl.integrations.flower.provision import provision_flower  # noqa: E402
from secure_fl.integrations.flower.records import Envelope  # noqa: E402
from secure_fl.rounds.local import make_server_round  # noqa: E402
from secure_fl.rounds.plan import plan_round  # noqa: E402
from secure_fl.rounds.policy import SitePolicy  # noqa: E402
from secure_fl.rounds.secagg import SecAggSiteRound  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402

N = 400


def _nodes(tmp_path: Path, n: int, policy: SitePolicy) -> tuple[list[Node], dict[int, bytes]]:
    fed = provision_flower([f"site-{i}" for i in range(1, n + 1)], tmp_path, policy=policy)
    rng = np.random.default_rng(3)
    nodes = [
        Node(
            e.site_id,
            100 + e.site_id,
            fed.site_configs[e.name],
            {"w": rng.normal(size=N).astype(np.float32)},
            num_examples=10,
        )
        for e in fed.roster
    ]
    keys = {e.site_id: e.verify_key for e in fed.roster if e.verify_key is not None}
    return nodes, keys


@pytest.mark.parametrize(("active", "durable", "fsyncs"), [(False, 7, 17), (True, 8, 19)])
def test_a_secagg_plus_round_costs_a_site_few_durable_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, active: bool, durable: int, fsyncs: int
) -> None:
    # Durable writes (file + fsync + folder fsync), semi-honest: train 1 (charge_train), setup 2
    # (claim, state), key roster 1 (state), shares 2 (contribute, state), unmask 1 (claim) and
    # one sync of the unmask's consume (2 fsyncs, no write); active: + the consistency check 1;
    # fsyncs: 2 a durable write, 2 the sync, 1 the sealer key created at the node's first round.
    # Each restore's consume is a rename made durable by the next state's fsynced write; an
    # advance of an already consumed state writes nothing.
    policy = SitePolicy(aggregations=("secagg+",), require_active=active)
    nodes, keys = _nodes(tmp_path, 4, policy)
    writes: Counter[str] = Counter()
    syncs = [0]
    real_write, real_fsync = atomic.atomic_write, os.fsync

    def counting(path: Any, data: Any, **kw: Any) -> Any:
        writes[str(Path(path).parent.parent)] += 1  # per state_dir: per site
        return real_write(path, data, **kw)

    def fsync(fd: int) -> None:
        syncs[0] += 1
        real_fsync(fd)

    monkeypatch.setattr(node, "atomic_write", counting)
    monkeypatch.setattr(os, "fsync", fsync)
    spec = AggregationSpec.from_options("secagg+", {"active": active})
    glob = {"w": np.zeros(N, np.float32)}
    run = drive_round(nodes, spec, glob, verify_keys=keys)
    assert run.error is None and run.left == {} and run.outcome is not None
    assert run.outcome.survivors == frozenset(n.site_id for n in nodes)
    assert len(writes) == len(nodes) and max(writes.values()) <= durable, writes
    assert syncs[0] <= fsyncs * len(nodes), syncs


def test_a_consume_is_visible_at_once_and_durable_after_sync(tmp_path: Path) -> None:
    half, policy, rid = _secagg_half(8)
    blob = half.export_state(NodeSealer(tmp_path))
    sealer = NodeSealer(tmp_path)
    SecAggSiteRound.restore(blob, sealer, site_id=1, round_id=rid, policy=policy)
    counters = tmp_path / "flower" / node.SEALER_COUNTERS
    assert json.loads(counters.read_text())[f"1:{rid}"]["open"] is False  # every process sees it
    assert oct(counters.stat().st_mode & 0o777) == oct(0o600)
    assert sealer._unsynced
    sealer.sync()
    assert not sealer._unsynced


def test_the_pending_update_holds_no_base_without_a_ckks_context(tmp_path: Path) -> None:
    nodes, _ = _nodes(tmp_path, 3, SitePolicy(aggregations=("secagg+",)))
    site = nodes[0]
    content = RecordDict(
        {
            records.KEY: records.to_record(Envelope("train", 41)),
            "config": ConfigRecord({}),
            "arrays": arrays_of({"w": np.zeros(N, np.float32)}),
        }
    )
    env = records.read(site.call(content).content)
    assert env is not None and env.left is None
    sealed = site.context.state.config_records[mod.PENDING]["sealed"]
    assert isinstance(sealed, bytes)
    # the float64 update only (8 bytes a value) plus a small header, not update + base (16)
    assert 8 * N < len(sealed) < 8 * N + 2048


def _secagg_half(length: int) -> tuple[SecAggSiteRound, SitePolicy, int]:
    spec = AggregationSpec.from_options("secagg", {"active": False})
    plan = plan_round(spec, {1: 1.0, 2: 1.0, 3: 1.0}, vector_length=length, round_id=91)
    setup = make_server_round(plan).setup()[1]
    policy = SitePolicy(require_active=False)
    half = SecAggSiteRound(1, policy=policy, roster={1: None, 2: None, 3: None})
    half.on_setup(setup, update=np.linspace(-1, 1, length), reported_weight=1.0)
    return half, policy, 91


def test_the_state_blob_carries_the_input_as_raw_words(tmp_path: Path) -> None:
    length = 20_000
    half, policy, rid = _secagg_half(length)
    assert half.client is not None
    words = np.asarray(half.client._input).copy()
    blob = half.export_state(NodeSealer(tmp_path))
    # raw words (4 or 8 bytes each), never hex in JSON (twice that)
    assert words.nbytes < len(blob) < words.nbytes + 16_384
    back = SecAggSiteRound.restore(
        blob, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy
    )
    assert isinstance(back, SecAggSiteRound) and back.client is not None
    restored = np.asarray(back.client._input)
    assert restored.dtype == words.dtype and np.array_equal(restored, words)
    assert restored.flags.writeable


def test_two_processes_cannot_both_restore_one_blob(tmp_path: Path) -> None:
    half, policy, rid = _secagg_half(8)
    blob = half.export_state(NodeSealer(tmp_path))
    first, second = NodeSealer(tmp_path), NodeSealer(tmp_path)  # two processes of one node
    first._current(1, rid)
    second._current(1, rid)  # both read the counter before either consumed it
    first._consume(1, rid)
    with pytest.raises(DecryptionError):
        second._consume(1, rid)
    with pytest.raises(DecryptionError):  # and the blob is spent for everyone
        SecAggSiteRound.restore(blob, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)


def test_an_advance_of_a_consumed_state_writes_nothing_and_kills_nothing_alive(
    tmp_path: Path,
) -> None:
    half, policy, rid = _secagg_half(8)
    old = half.export_state(NodeSealer(tmp_path))
    restored = SecAggSiteRound.restore(
        old, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy
    )
    counters = tmp_path / "flower" / node.SEALER_COUNTERS
    before = counters.stat()
    NodeSealer(tmp_path).advance(1, rid)  # already consumed: no blob can be restored
    after = counters.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    new = restored.export_state(NodeSealer(tmp_path))
    with pytest.raises(DecryptionError):  # the older blob stays dead after the new issue
        SecAggSiteRound.restore(old, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)
    SecAggSiteRound.restore(new, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)
    # an advance of an OPEN state still kills it (written)
    live = restored.export_state(NodeSealer(tmp_path))
    NodeSealer(tmp_path).advance(1, rid)
    with pytest.raises(DecryptionError):
        SecAggSiteRound.restore(live, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)


def test_an_unchanged_site_json_is_parsed_once_and_any_change_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = provision_flower(["site-1", "site-2", "site-3"], tmp_path, policy=SitePolicy())
    path = Path(fed.site_configs["site-1"])
    fresh = node.load_flower_site(path)
    assert node.load_flower_site(path) is not fresh  # just written: parsed again every time
    # "settled": no system call sets ctime back, so the test shortens the settling time instead
    monkeypatch.setattr(node, "_SETTLED_NS", -1)
    old = time.time() - 60
    os.utime(path, (old, old))
    first = node.load_flower_site(path)
    assert node.load_flower_site(path) is first and first == fresh
    data = json.loads(path.read_text())
    data["name"], data["site_id"] = "site-2", 2  # same size, another site
    path.write_text(json.dumps(data))
    os.utime(path, (old + 1, old + 1))  # a change of content and time, settled again
    again = node.load_flower_site(path)
    assert again.name == "site-2" and again.site_id == 2
