"""The server's deployment habits over real gRPC: per-round configuration in RoundStart, site
metrics through ReportMetrics (recorded per site, refused twice or out of round), and the
``waiting`` heartbeat naming the sites the server waits for."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import grpc
import pytest
from transport_helpers import Federation, site_channel, wait_until

from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport._generated.federation_pb2_grpc import FederationStub
from secure_fl.transport.config import FEDERATION_PROTOCOL


def _next_instruction(
    stub: FederationStub, session: bytes, timeout: float = 20.0
) -> pb.Instruction:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inst = stub.Poll(pb.PollRequest(session=session, wait_ms=500), timeout=10)
        if inst.WhichOneof("kind") != "wait":
            return inst
    raise AssertionError("no instruction arrived")


def test_round_config_metrics_and_heartbeat_over_grpc(
    federation: Callable[..., Federation],
) -> None:
    fed = federation(
        ["a", "b"],
        protocol="plain",
        rounds=1,
        deadlines={"wait_for_sites_s": 1.0, "update_s": 30.0, "heartbeat_s": 0.2},
    )
    fed.patch_server(round_config={"learning_rate": 0.001, "local_epochs": 2, "fedprox_mu": 0.0})
    fed.start_server()
    try:
        channels = {name: site_channel(fed, name) for name in ("a", "b")}
        stubs = {name: FederationStub(ch) for name, ch in channels.items()}
        sessions = {
            name: stub.Join(
                pb.JoinRequest(protocol_version=FEDERATION_PROTOCOL), timeout=20
            ).session
            for name, stub in stubs.items()
        }
        start = _next_instruction(stubs["a"], sessions["a"])
        assert start.WhichOneof("kind") == "round_start"
        config = json.loads(start.round_start.round_config_json)
        assert config == {"learning_rate": 0.001, "local_epochs": 2, "fedprox_mu": 0.0}
        rid = start.round_id
        metrics = pb.SiteMetrics(round_id=rid, metrics={"dice": 0.75, "loss": 0.5}, samples=12)
        ack = stubs["a"].ReportMetrics(metrics, timeout=10)
        assert ack.phase == "metrics"
        with pytest.raises(grpc.RpcError) as err:
            stubs["a"].ReportMetrics(metrics, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            stubs["b"].ReportMetrics(pb.SiteMetrics(round_id=rid + 99), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        def heartbeat_names_both() -> bool:
            events = [json.loads(line) for line in fed.log_text("server").splitlines() if line]
            beats = [e for e in events if e["event"] == "waiting" and e.get("stage") == "update"]
            return bool(beats) and beats[-1]["waiting_for"] == ["a", "b"]

        wait_until(heartbeat_names_both, 10, "a heartbeat naming a and b")
        events = [json.loads(line) for line in fed.log_text("server").splitlines() if line]
        received = [e for e in events if e["event"] == "site-metrics-received"]
        assert received and received[0]["site"] == "a" and received[0]["metric_dice"] == 0.75
        for channel in channels.values():
            channel.close()
    finally:
        fed.kill_all()
