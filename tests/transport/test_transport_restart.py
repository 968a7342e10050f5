"""A server killed (SIGKILL) in the middle of a federation and restarted resumes from its
checkpoint: no completed round is redone or lost, the sites reconnect by themselves, and the
final model equals the in-process simulation of all rounds."""

from __future__ import annotations

from collections.abc import Callable

from transport_helpers import Federation, assert_matches, wait_until


def test_server_killed_and_restarted_resumes_from_its_checkpoint(
    federation: Callable[..., Federation],
) -> None:
    names = ["a", "b", "c"]
    fed = federation(
        names,
        protocol="secagg+",
        rounds=3,
        task_options={"delay_s": 1.0},  # each round takes at least a second of "training"
    )
    fed.start_all()

    def one_round_done() -> bool:
        cp = fed.checkpoint()
        return cp is not None and cp["completed_rounds"] >= 1

    wait_until(one_round_done, 60, "the first checkpoint")
    fed.kill("server")  # SIGKILL, in the middle of round 1 (the sites are "training")
    cp = fed.checkpoint()
    assert cp is not None
    killed_after = cp["completed_rounds"]
    assert killed_after < 3

    port = fed.address.rsplit(":", 1)[1]
    fed.patch_server(listen=f"127.0.0.1:{port}")  # the sites know this address
    fed.start_server()
    codes = fed.wait_all(timeout=120)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()

    assert '"event":"resumed"' in fed.log_text("server")
    cp = fed.checkpoint()
    assert cp is not None and cp["completed_rounds"] == 3
    assert [h["round"] for h in cp["history"]] == [0, 1, 2]  # each round exactly once
    assert_matches(fed, fed.simulate(3))
    for name in names:
        assert '"event":"rejoin"' in fed.log_text(name) or '"event":"reconnecting"' in fed.log_text(
            name
        )
