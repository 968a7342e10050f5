"""Real processes on loopback: a server and site processes run SecAgg / SecAgg+ rounds over gRPC
with mutual TLS; the aggregate equals the in-process simulation of the same rounds bit for bit."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transport_helpers import Federation, assert_matches, site_channel, wait_until

from secure_fl.crypto import SigningKey
from secure_fl.secagg import Phase
from secure_fl.transport.checkpoint import model_blob


def test_secagg_plus_rounds_match_the_simulation_bit_for_bit(
    federation: Callable[..., Federation],
) -> None:
    names = ["a", "b", "c", "d", "e"]
    # k=2 on 5 sites: a sparse Harary graph, derived by the sites from their committed and
    # revealed nonces (the reveal phase travels over gRPC). 60 500
    # parameters: models and masked vectors travel in several 64 KiB chunks.
    fed = federation(
        names,
        protocol="secagg+",
        rounds=2,
        shapes=[[200, 300], [500]],
        # No dropouts and no corrupt sites assumed: the sites' own minimum degree is then 2.
        aggregation={"k": 2, "threshold": 2, "dropout_rate": 0.0},
        limits={"max_message_bytes": 256 * 1024, "chunk_bytes": 64 * 1024},
    )
    fed.start_server()
    with site_channel(fed, "a") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="secure_fl.federation.v1.Federation"),
            timeout=10,
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for name in names:
        fed.start_site(name)
    codes = fed.wait_all(timeout=90)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()

    expected = fed.simulate(2)
    assert expected[0].config.sparse and fed.round_record(0)["k"] == 2  # really sparse
    assert_matches(fed, expected)
    record = fed.round_record(1)
    assert record["dropped"] == []
    assert record["bytes_in"] > 5 * 4 * 60_500  # five masked vectors
    assert record["model_bytes_out"] > 5 * 4 * 60_500  # five model downloads
    # Every site wrote the final model it downloaded, equal to the reference.
    final = model_blob(expected[-1].model)[0]
    for name in names:
        assert (fed.site_dir(name) / "final_model.tensors").read_bytes() == final
    # No secret material in the logs.
    for key in ["server", *names]:
        text = fed.log_text(key)
        assert "PRIVATE KEY" not in text
        assert '"level":"error"' not in text, text


def test_site_killed_mid_round_is_a_dropout_and_rejoins(
    federation: Callable[..., Federation],
) -> None:
    """Active SecAgg (signed adverts, consistency check) with 4 sites, threshold 3 (the sites'
    own minimum for n = 4); site c kills itself
    (SIGKILL) just before sending its masked input in round 0. The masked-input phase closes at
    its deadline, the round completes with the three survivors (c's masks are recovered), and c,
    restarted after the round, takes part in round 1."""
    names = ["a", "b", "c", "d"]
    fed = federation(
        names,
        protocol="secagg",
        rounds=2,
        aggregation={"active": True, "threshold": 3},
        deadlines={"phase_s": 5.0},
    )
    fed.patch_site("c", test_crash_before="masked_input", test_crash_round=0)
    fed.start_all()
    crashed = fed.procs["c"]
    wait_until(lambda: crashed.poll() is not None, 60, "site c to kill itself")
    assert crashed.returncode == -9, fed.log_text("c")
    round0 = fed.state_dir / "rounds" / "round-000000.json"
    wait_until(round0.exists, 60, "round 0 to complete without c")
    fed.patch_site("c", test_crash_before=None, test_crash_round=None)
    fed.start_site("c")
    codes = fed.wait_all(timeout=90)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()

    c = fed.ids["c"]
    keys = {fed.ids[n]: SigningKey.generate() for n in names}  # keys do not enter the sum
    expected = fed.simulate(2, dropouts={0: {c: Phase.MASKED_INPUT}}, signing_keys=keys)
    assert c not in expected[0].survivors
    assert_matches(fed, expected)
    assert fed.round_record(0)["dropped"] == [c]
    assert fed.round_record(1)["survivors"] == sorted(fed.ids.values())


def test_status_codes_for_a_site_that_never_joined(federation: Callable[..., Federation]) -> None:
    fed = federation(["a", "b"], rounds=1)
    fed.start_server()
    from secure_fl.transport._generated import federation_pb2 as pb
    from secure_fl.transport._generated.federation_pb2_grpc import FederationStub

    with site_channel(fed, "a") as channel:
        stub = FederationStub(channel)
        try:
            stub.Poll(pb.PollRequest(session=b"x" * 16, wait_ms=10), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "session" in exc.details()
        else:
            raise AssertionError("a poll with a foreign session must be refused")


def test_plain_aggregation_uploads_updates_in_chunks(federation: Callable[..., Federation]) -> None:
    """The insecure baseline: updates travel in the clear as chunk streams (several chunks each,
    with a small chunk limit); the new model is the weighted mean, as computed in process."""
    names = ["a", "b", "c"]
    fed = federation(
        names,
        protocol="plain",
        rounds=1,
        shapes=[[64, 64], [64]],
        limits={"max_message_bytes": 65536, "chunk_bytes": 4096},
    )
    fed.start_all()
    codes = fed.wait_all(timeout=60)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    from secure_fl.encoding import flatten
    from secure_fl.rounds.local import run_local
    from secure_fl.rounds.plan import plan_round
    from secure_fl.transport.config import load_server_config
    from secure_fl.transport.rounds import apply_mean, initial_model

    config = load_server_config(fed.server_config)
    model = initial_model(config.model)
    results = {s: t.compute_update(model, 0) for s, t in fed.tasks().items()}
    # The same plain round, run in process by the round layer's own driver.
    vectors = {s: flatten(dict(r.update))[0] for s, r in results.items()}
    plan = plan_round(
        config.aggregation,
        {s: r.weight for s, r in results.items()},
        vector_length=len(vectors[1]),
        round_id=0,
    )
    expected = apply_mean(model, run_local(plan, vectors).mean)
    record = fed.round_record(0)
    assert record["completed"] and record["survivors"] == [1, 2, 3]
    assert record["model_sha256"] == model_blob(expected)[1]
    assert record["bytes_in"] > 3 * 4 * 64 * 65  # every update arrived, in chunks of 4 KiB


def test_round_below_threshold_aborts_and_is_retried(federation: Callable[..., Federation]) -> None:
    """Threshold 3 of 3: when c dies before its masked input, the attempt aborts (nothing is
    revealed), the failure is recorded, and the round is run again with c back; the retried
    round equals the simulation."""
    names = ["a", "b", "c"]
    fed = federation(
        names, protocol="secagg", rounds=1, aggregation={"threshold": 3}, deadlines={"phase_s": 3.0}
    )
    fed.patch_site("c", test_crash_before="masked_input", test_crash_round=0)
    fed.start_all()
    failed = fed.state_dir / "rounds" / "round-000000-failed-1.json"
    wait_until(failed.exists, 60, "the first attempt to fail")
    import json

    record = json.loads(failed.read_text())
    assert not record["completed"] and "threshold" in record["reason"]
    assert fed.procs["c"].poll() == -9
    fed.patch_site("c", test_crash_before=None, test_crash_round=None)
    fed.start_site("c")
    codes = fed.wait_all(timeout=90)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    assert fed.round_record(0)["attempt"] == 2
    assert_matches(fed, fed.simulate(1))


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_two_site_federation_trains_over_grpc(
    federation: Callable[..., Federation], protocol: str
) -> None:
    """Two sites: t = 2, no dropout tolerance, the active variant by default; each party is
    warned once that it can derive the other's update from the mean."""
    names = ["a", "b"]
    fed = federation(names, protocol=protocol, rounds=2)
    fed.start_all()
    codes = fed.wait_all(timeout=90)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    assert_matches(fed, fed.simulate(2))
    assert fed.round_record(0)["threshold"] == 2
    for key in ["server", *names]:
        text = fed.log_text(key)
        assert text.count('"event":"two-site-round"') == 1, text
        assert "derive the other" in text


def test_zero_round_federation_exits_non_zero_everywhere(
    federation: Callable[..., Federation],
) -> None:
    """A federation that stops after 0 rounds: the server and every site exit non-zero with a
    clear message, and no site writes the untrained model as its final model."""
    names = ["a", "b", "c"]
    fed = federation(names, protocol="secagg", rounds=1, deadlines={"update_s": 2.0})
    fed.patch_server(max_attempts=1)
    # One site does not accept this federation's aggregation: the round cannot complete.
    fed.patch_site("c", policy={"aggregations": ["ckks"]})
    fed.patch_server(min_sites=3)
    fed.start_all()
    codes = fed.wait_all(timeout=60)
    assert codes["server"] == 1 and all(codes[n] == 5 for n in names), (codes, fed.all_logs())
    for key in ["server", *names]:
        assert "stopped after 0 rounds" in fed.log_text(key)
    for name in names:
        assert not (fed.site_dir(name) / "final_model.tensors").exists()
    assert "policy-refused" in fed.log_text("c")


@pytest.mark.slow
def test_full_size_secagg_plus_round_matches_the_simulation(
    federation: Callable[..., Federation],
) -> None:
    """Five sites, 1.2 M parameters (about 4.8 MB per masked vector), two rounds."""
    names = ["a", "b", "c", "d", "e"]
    fed = federation(names, protocol="secagg+", rounds=2, shapes=[[1000, 1000], [200_000]])
    fed.start_all()
    codes = fed.wait_all(timeout=300)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    assert_matches(fed, fed.simulate(2))
