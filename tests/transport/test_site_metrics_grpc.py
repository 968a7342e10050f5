"""Per-round configuration reaches the site's task and its metrics reach the server, over gRPC.

The real server (``FederationServer``) and three :class:`SiteRunner` threads over mutual TLS on
loopback (the harness of ``tests/adversary/test_grpc.py``), each site with a task that records
the ``round_config`` it was given and returns a Dice metric.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversary.test_grpc import Fed, SpyServer

from secure_fl.transport.config import load_server_config
from secure_fl.transport.site import SiteRunner
from secure_fl.transport.tasks import TaskResult


class _MetricTask:
    def __init__(self, site_id: int) -> None:
        self.site_id = site_id
        self.configs: list[Any] = []

    def compute_update(
        self, global_model: Mapping[str, np.ndarray], round_id: int, round_config: Any = None
    ) -> TaskResult:
        self.configs.append(dict(round_config or {}))
        update = {k: np.full_like(v, 0.01) for k, v in global_model.items()}
        return TaskResult(update, 10.0, {"dice": 0.5 + 0.1 * self.site_id}, 4)


def test_round_config_and_metrics_travel_over_grpc(tmp_path: Path) -> None:
    fed = Fed(tmp_path / "fed", ["a", "b", "c"])
    fed.patch_server(round_config={"learning_rate": 0.25})
    server = SpyServer(load_server_config(fed.server_json))
    server.start()
    tasks: dict[str, _MetricTask] = {}
    status: dict[str, int] = {}
    threads = []
    try:
        for name in fed.names:
            config = dataclasses.replace(fed.site_config(name), server=server.address)
            tasks[name] = _MetricTask(config.site_id)
            runner = SiteRunner(config, task=tasks[name])

            def work(runner: SiteRunner = runner, name: str = name) -> None:
                status[name] = runner.run()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            threads.append(thread)
        assert server.wait(timeout=60) == 0
        for thread in threads:
            thread.join(timeout=30)
    finally:
        server.stop()
    assert status == {"a": 0, "b": 0, "c": 0}
    assert all(t.configs == [{"learning_rate": 0.25}] for t in tasks.values())
    calls = server.sent("ReportMetrics", "ReportUpdateReady")
    for name in fed.names:
        mine = [method for method, site in calls if site == name]
        assert mine == ["ReportMetrics", "ReportUpdateReady"], (name, calls)
