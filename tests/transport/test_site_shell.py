"""The gRPC shell of a site (:class:`SiteRunner`) around its driver, with a scripted stub (no
sockets): what it sends, in which order, and what a server's refusal of one reply does."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from secure_fl.transport import tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes
from secure_fl.transport.config import load_server_config, load_site_config
from secure_fl.transport.provision import provision
from secure_fl.transport.rounds import initial_model, sha256
from secure_fl.transport.site import SiteRunner
from secure_fl.transport.tasks import TaskResult


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"refused with {self._code.name}"


grpc.Call.register(_Refused)


class _StopError(Exception):
    pass


class _Stub:
    """Join, a scripted Poll, one model; refuses the RPCs named in ``refuse``."""

    def __init__(self, site_id: int, blob: bytes, script: list[pb.Instruction]) -> None:
        self.site_id, self.blob, self.script = site_id, blob, list(script)
        self.refuse: dict[str, grpc.StatusCode] = {}
        self.calls: list[str] = []

    def Join(self, request: Any, timeout: float = 0) -> pb.JoinReply:
        return pb.JoinReply(site_id=self.site_id, site_name="a", poll_wait_ms=100)

    def Poll(self, request: Any, timeout: float = 0) -> pb.Instruction:
        if not self.script:
            raise _StopError
        return self.script.pop(0)

    def __getattr__(self, name: str) -> Any:
        def call(message: Any, timeout: float = 0) -> pb.Ack:
            self.calls.append(name)
            if name in self.refuse:
                raise _Refused(self.refuse[name])
            return pb.Ack()

        return call

    def download(self, request: Any, timeout: float = 0) -> Iterator[bytes]:
        header = pb.PayloadHeader(kind=pb.MODEL, length=1)
        yield from iter_chunk_bytes(header, self.blob, 1 << 16)


class _Task:
    def compute_update(
        self, model: Mapping[str, np.ndarray], round_id: int, round_config: Any = None
    ) -> TaskResult:
        update = {k: np.zeros_like(v) for k, v in model.items()}
        return TaskResult(update, 5.0, {"dice": 0.7}, 3)


def _runner(tmp_path: Path) -> tuple[SiteRunner, _Stub]:
    done = provision(tmp_path / "fed", ["a", "b", "c"], ckks=False)
    config = load_site_config(done.site_configs["a"])
    blob = tensors.dumps(initial_model(load_server_config(done.server_config).model))
    start = pb.Instruction(
        attempt=1,
        index=0,
        round_id=1,
        round_start=pb.RoundStart(aggregation="secagg+", model_sha256=sha256(blob)),
    )
    runner = SiteRunner(config, task=_Task())
    stub = _Stub(config.site_id, blob, [start])
    runner._connect = lambda: stub  # type: ignore[method-assign,assignment,return-value]
    runner._raw = stub  # type: ignore[assignment]
    return runner, stub


def test_a_refused_metrics_report_does_not_keep_the_site_out(tmp_path: Path) -> None:
    runner, stub = _runner(tmp_path)
    stub.refuse["ReportMetrics"] = grpc.StatusCode.UNIMPLEMENTED  # an older server
    with pytest.raises(_StopError):
        runner._session_loop()
    assert stub.calls == ["ReportMetrics", "ReportUpdateReady"]
    assert runner._round is not None and not runner._round.failed


def test_a_refused_update_report_ends_the_round(tmp_path: Path) -> None:
    runner, stub = _runner(tmp_path)
    stub.refuse["ReportUpdateReady"] = grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(_StopError):
        runner._session_loop()
    assert stub.calls == ["ReportMetrics", "ReportUpdateReady"]
    assert runner._round is not None and runner._round.failed


def test_a_lost_connection_while_sending_is_not_a_refusal(tmp_path: Path) -> None:
    runner, stub = _runner(tmp_path)
    stub.refuse["ReportMetrics"] = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError):
        runner._session_loop()  # run() reconnects
    assert stub.calls == ["ReportMetrics"]
