"""The sans-IO site driver, without sockets: instructions in, replies out.

A round of three drivers against the round layer's server half (converted through the wire's
protobuf messages) gives the weighted mean; a setup the site's policy forbids, a round dropped
for a new attempt, an unknown instruction, per-round configuration and metrics are each checked
on the replies (what would leave the site). Privacy floors and CKKS: test_site_driver_privacy.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from site_driver_helpers import (
    TO_WIRE,
    DriverFed,
    FixedTask,
    from_wire,
    make_federation,
    round_start,
    secagg_setup,
)

from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.site_driver import EXIT_FINISHED, EXIT_NOT_TRAINED
from secure_fl.transport.site_replies import Call
from secure_fl.transport.site_round import parse_round_config


@pytest.fixture
def fed(tmp_path: Path) -> DriverFed:
    return make_federation(tmp_path, ["a", "b", "c"], ckks=False)


def test_a_secagg_round_of_three_drivers_gives_the_weighted_mean(fed: DriverFed) -> None:
    drivers = {c.site_id: fed.driver(n)[0] for n, c in fed.configs.items()}
    for d in drivers.values():
        replies = d.handle(round_start(1, 1, fed.digest), fed.fetch).replies
        assert [r.rpc for r in replies] == ["ReportUpdateReady"]
    server, setups = secagg_setup(fed, 1, sorted(drivers))
    pending = {s: [setups[s]] for s in drivers}
    index = 1
    while True:
        for site, insts in pending.items():
            for inst in insts:
                for reply in drivers[site].handle(inst, fed.fetch).replies:
                    server.receive(site, from_wire(reply, site))
        out = server.close()
        if server.done:
            break
        index += 1
        pending = {}
        for site, message in out.items():
            kind, to_pb = TO_WIRE[type(message)]
            inst = pb.Instruction(attempt=1, index=index, round_id=1)
            field: Any = getattr(inst, kind)
            field.CopyFrom(to_pb(message))
            pending[site] = [inst]
    outcome = server.outcome()
    assert outcome.survivors == frozenset(drivers)
    weights = {s: 10.0 * s for s in drivers}
    want = sum(weights[s] * 0.01 * (s + 1) for s in drivers) / sum(weights.values())
    assert outcome.mean is not None
    np.testing.assert_allclose(outcome.mean, want, atol=1e-5)
    # Each site recorded the survivor set it unmasked for, before answering.
    for d in drivers.values():
        record = json.loads((d.config.state_dir / "unmasked.json").read_text())
        assert record[d.config.federation] == {"1": sorted(drivers)}


def test_a_setup_the_policy_forbids_is_refused_and_nothing_is_sent(fed: DriverFed) -> None:
    driver, log = fed.driver("a")
    assert driver.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    _, setups = secagg_setup(fed, 1, [1, 2, 3], active=False)  # the semi-honest variant
    step = driver.handle(setups[1], fed.fetch)
    assert step.replies == ()
    refused = log.named("policy-refused")
    assert len(refused) == 1 and "active" in refused[0]["reason"]
    assert refused[0]["round"] == 1 and driver.round is not None and driver.round.failed
    # Later instructions of that round are skipped: still nothing sent.
    later = pb.Instruction(attempt=1, index=2, round_id=1, key_roster=pb.KeyRoster())
    assert driver.handle(later, fed.fetch).replies == ()


def test_plain_is_refused_before_the_task_runs_or_the_model_is_fetched(fed: DriverFed) -> None:
    task = FixedTask(1)
    driver, log = fed.driver("a", task=task)

    def fetch(digest: bytes) -> bytes:
        raise AssertionError("nothing may be fetched for a refused aggregation")

    assert driver.handle(round_start(1, 1, fed.digest, "plain"), fetch).replies == ()
    assert task.calls == [] and log.named("policy-refused")


def test_a_round_is_dropped_when_a_new_attempt_starts(fed: DriverFed) -> None:
    driver, log = fed.driver("a")
    first = driver.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    assert [r.message.round_id for r in first if isinstance(r, Call)] == [1]
    second = driver.handle(round_start(2, 2, fed.digest), fed.fetch).replies
    assert [r.message.round_id for r in second if isinstance(r, Call)] == [2]
    left = log.named("left-round")
    assert left == [{"round": 1, "round_id": 1, "reason": "a new attempt started"}]
    assert driver.round is not None and driver.round.round_id == 2
    assert (driver.cursor.attempt, driver.cursor.next_index) == (2, 1)
    # An old round id is never taken again (fresh ids only).
    assert driver.handle(round_start(3, 2, fed.digest), fed.fetch).replies == ()
    assert "round id" in log.named("policy-refused")[-1]["reason"]


def test_an_unknown_instruction_is_refused_and_never_acted_on(fed: DriverFed) -> None:
    driver, log = fed.driver("a")
    driver.handle(round_start(1, 1, fed.digest), fed.fetch)
    head = pb.Instruction(attempt=1, index=1, round_id=1).SerializeToString()
    unknown = pb.Instruction.FromString(head + b"\xa2\x01\x02\x08\x01")  # field 20: a message
    assert driver.handle(unknown, fed.fetch).replies == ()
    refused = log.named("refused-unknown-instruction")
    assert refused and refused[0]["fields"] == [20]
    assert driver.round is not None and driver.round.failed
    assert (driver.cursor.attempt, driver.cursor.next_index) == (1, 2)  # acknowledged


def test_round_config_reaches_the_task_and_a_non_object_is_refused(fed: DriverFed) -> None:
    task = FixedTask(1)
    driver, log = fed.driver("a", task=task)
    config = json.dumps({"learning_rate": 0.1, "local_epochs": 2})
    driver.handle(round_start(1, 1, fed.digest, round_config_json=config), fed.fetch)
    assert task.calls == [(0, {"learning_rate": 0.1, "local_epochs": 2})]
    bad = round_start(2, 2, fed.digest, round_config_json="[1, 2]")
    assert driver.handle(bad, fed.fetch).replies == ()
    assert "must be a JSON object, got list" in log.named("protocol-error")[-1]["reason"]
    assert len(task.calls) == 1  # refused before the task ran
    assert parse_round_config("") is None
    with pytest.raises(Exception, match="not valid JSON"):
        parse_round_config("{")


def test_metrics_are_reported_before_the_update(fed: DriverFed) -> None:
    task = FixedTask(1, metrics={"dice": 0.8}, samples=12)
    driver, _ = fed.driver("a", task=task)
    replies = driver.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    assert [r.rpc for r in replies] == ["ReportMetrics", "ReportUpdateReady"]
    assert isinstance(replies[0], Call)
    metrics = replies[0].message
    assert isinstance(metrics, pb.SiteMetrics)
    assert (metrics.round_id, dict(metrics.metrics), metrics.samples) == (1, {"dice": 0.8}, 12)


def test_finished_after_zero_rounds_writes_no_model(fed: DriverFed) -> None:
    driver, log = fed.driver("a")
    done = pb.Instruction(finished=pb.Finished(rounds_completed=0))
    assert driver.handle(done, fed.fetch).exit_status == EXIT_NOT_TRAINED
    assert log.named("federation-not-trained")
    ok = pb.Instruction(finished=pb.Finished(rounds_completed=2))
    assert driver.handle(ok, fed.fetch).exit_status == EXIT_FINISHED
