"""The Flower benchmarks (benchmarks/flower_*.py): their instruments, and the scripts at a tiny size."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

flower_common = importlib.import_module("flower_common")
flower_scale = importlib.import_module("flower_scale")
flower_side_by_side = importlib.import_module("flower_side_by_side")


class _EchoGrid(Grid):
    """A Grid whose nodes 1 and 2 answer each message with a record of 1,000 float32 zeros."""

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type)

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def push_messages(self, messages: Any) -> list[str]:
        return []

    def pull_messages(self, message_ids: Any) -> list[Any]:
        return []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        zeros = ArrayRecord({"x": Array(np.zeros(1000, np.float32))})
        return [Message(RecordDict({"a": zeros}), reply_to=m) for m in messages]


def test_content_bytes_counts_the_serialised_arrays() -> None:
    small = RecordDict({"c": ConfigRecord({"k": 1})})
    big = RecordDict({"a": ArrayRecord({"x": Array(np.zeros(1000, np.float32))})})
    assert flower_common.content_bytes(big) >= 4000 > flower_common.content_bytes(small) > 0


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's process-wide sender identity, which ``Message()`` reads (restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1 << 40)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.usefixtures("server_identity")
def test_timing_grid_counts_bytes_per_node_and_its_own_seconds() -> None:
    grid = flower_common.TimingGrid(_EchoGrid())
    assert list(grid.get_node_ids()) == [1, 2]
    small = RecordDict({"c": ConfigRecord({"k": 1})})
    sent = [grid.create_message(small, "train", node, "g") for node in (1, 2, 2)]
    replies = list(grid.send_and_receive(sent))
    assert [r.metadata.src_node_id for r in replies] == [1, 2, 2]
    one = flower_common.content_bytes(small)
    assert dict(grid.bytes_to) == {1: one, 2: 2 * one}
    assert grid.bytes_from[2] == 2 * grid.bytes_from[1] >= 2 * 4000
    assert grid.grid_seconds > 0
    grid.reset()
    assert not grid.bytes_to and not grid.bytes_from and grid.grid_seconds == 0


@pytest.mark.usefixtures("server_identity")
def test_timing_mod_logs_each_message_and_site_seconds_sums_per_node(tmp_path: Path) -> None:
    log = tmp_path / "sites.jsonl"
    mod = flower_common.timing_mod(log)
    message = Message(
        RecordDict({"c": ConfigRecord({"k": 1})}), dst_node_id=7, message_type="train"
    )
    for node in (7, 7, 9):
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        assert mod(message, context, lambda m, c: m) is message
    seconds = flower_common.site_seconds(log)
    assert set(seconds) == {7, 9}
    assert all(s >= 0 for s in seconds.values())
    assert len(log.read_text().splitlines()) == 3
    assert flower_common.site_seconds(tmp_path / "absent.jsonl") == {}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_process_memory_counts_own_descendants_by_name_only() -> None:
    child = subprocess.Popen(["bash", "-c", "exec -a ray::ClientAppActorProbe sleep 5"])
    other = subprocess.Popen(["bash", "-c", "exec -a other-name sleep 5"])
    try:
        deadline = time.monotonic() + 5
        peaks: dict[int, float] = {}
        while not peaks and time.monotonic() < deadline:
            peaks = flower_common.ProcessMemory(interval=0.05).start().stop()
        assert set(peaks) == {child.pid}
        assert peaks[child.pid] > 0
        assert flower_common.ProcessMemory(prefix="no-such-process").start().stop() == {}
    finally:
        child.kill()
        other.kill()
        child.wait()
        other.wait()


def test_wait_for_nodes_and_the_plan_flower_is_given() -> None:
    assert flower_common.wait_for_nodes(_EchoGrid(), 2) == [1, 2]
    with pytest.raises(RuntimeError, match="2 of 3 nodes"):
        flower_common.wait_for_nodes(_EchoGrid(), 3, timeout_s=0.0)
    assert flower_common.degree_and_threshold(10) == (9, 6)
    k, threshold = flower_common.degree_and_threshold(100)
    assert k < 99 and 2 <= threshold <= k + 1


def test_markdown_table_and_ratio() -> None:
    text = flower_common.markdown_table(["a", "b"], [[1, 0.123456]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]
    assert flower_common.ratio(2.0, 4.0) == "0.5x"
    assert flower_common.ratio(1.0, 0.0) == "n/a"


def test_per_site_cost_secagg_plus_sparse_against_complete_graph() -> None:
    plus = flower_scale.per_site_cost(60, 50, "secagg+")
    full = flower_scale.per_site_cost(60, 50, "secagg")
    assert full["k"] == 59
    assert plus["k"] is not None and plus["k"] < 59
    assert plus["survivors"] == full["survivors"] == 60
    assert plus["max_abs_error"] < 1e-4 and full["max_abs_error"] < 1e-4
    # fewer neighbours -> fewer key shares to send
    assert plus["site_bytes_sent_mean"] < full["site_bytes_sent_mean"]


def test_scale_sites_part_prints_a_row_per_size(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "scale.json"
    assert (
        flower_scale.main(
            [
                "--part",
                "sites",
                "--sizes",
                "5,8",
                "--small-length",
                "20",
                "--max-complete",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    rows = data["sites"]["rows"]
    assert [(r["n"], r["protocol"]) for r in rows] == [
        (5, "secagg+"), (5, "secagg"), (8, "secagg+"),
    ]  # fmt: skip
    assert len((tmp_path / "scale.rows.jsonl").read_text().splitlines()) == 3
    assert "| 8 |" in capsys.readouterr().out


def test_scale_refuses_bad_sizes() -> None:
    with pytest.raises(SystemExit):
        flower_scale.main(["--part", "sites", "--sizes", "2"])


@pytest.mark.slow
def test_side_by_side_runs_both_sides_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "sbs.json"
    assert (
        flower_side_by_side.main(
            ["--sites", "3", "--length", "200", "--warmup", "0", "--rounds", "2", "--out", str(out)]
        )
        == 0
    )
    data = json.loads(out.read_text())
    flower = data["flower"]
    assert flower["sites_seen"] == 3
    assert len(flower["round_walls_s"]) == 2
    assert flower["round_wall_s"] == min(flower["round_walls_s"])
    assert flower["bytes_from_site_mean"] > 4 * 200
    assert flower["max_abs_error"] < 0.01  # Flower's 2^22-level quantisation
    if data["secure_fl_pending"] is None:
        ours = data["secure_fl"]
        assert ours["survivors"] == 3
        assert len(ours["round_walls_s"]) == 2
        assert ours["sites_seen"] == 3
        assert ours["max_abs_error"] < 1e-4


@pytest.mark.slow
def test_scale_ray_part_at_a_tiny_size(tmp_path: Path) -> None:
    if flower_side_by_side.ours_available() is not None:
        pytest.skip(flower_side_by_side.ours_available() or "")
    out = tmp_path / "scale.json"
    args = ["--part", "ray", "--ray-sites", "4", "--length", "100", "--out", str(out)]
    assert flower_scale.main(args) == 0
    result = json.loads(out.read_text())["ray"]["result"]
    assert result["survivors"] == 4
    assert result["server_peak_rss_mib"] > 0
