"""The server's coordinator driven without sockets, threads or real time (a fake clock and host).

Covers the stage table (a stray message in the wrong stage is refused and the round goes on),
joins and rejoins, a dropout in a SecAgg phase, deadlines, a failed round retried under a fresh
round id, restart from a checkpoint, min_sites, the heartbeat, per-round configuration, site
metrics and the server optimiser.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from coordinator_fakes import (
    NAMES,
    Harness,
    SecAggSite,
    harness,
    make_config,
    model_size,
    plain_update,
)

from secure_fl.errors import ConfigError
from secure_fl.secagg import ServerPhase
from secure_fl.secagg.messages import AdvertiseKeys
from secure_fl.transport import rounds
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.stages import TABLE, Event, Stage, StageError, lookup


def _start_plain(h: Harness, sites: tuple[int, ...] = (1, 2, 3, 4)) -> int:
    h.join(*sites)
    h.tick()
    assert h.coord.stage is Stage.UPDATE
    return h.attempt().round_id


def test_every_transition_is_in_one_table_and_strays_are_refused() -> None:
    """Site events are allowed only where the table says; an internal event elsewhere is a bug."""
    assert lookup(Stage.UPDATE, Event.PLAIN_UPDATE) == ("_on_plain_update", None)
    assert lookup(Stage.WAITING, Event.SITES_READY)[1] is Stage.UPDATE
    assert (Stage.WAITING, Event.PLAIN_UPDATE) not in TABLE
    with pytest.raises(StageError):
        lookup(Stage.FINISHED, Event.SITES_READY)
    h = harness(make_config("secagg"))
    h.join(1, 2, 3, 4)
    # Before any round: an update, a SecAgg message or metrics are refused, nothing changes.
    with pytest.raises(RejectedError, match="no round is collecting updates") as exc:
        h.coord.update_ready(1, 0, 1.0, h.clock())
    assert exc.value.code == "FAILED_PRECONDITION"
    advert = AdvertiseKeys(sender=1, round_id=0, enc_public=b"1" * 32, mask_public=b"2" * 32)
    with pytest.raises(RejectedError, match="no secure aggregation is running"):
        h.coord.secagg_message(1, ServerPhase.COLLECT_KEYS, advert, "AdvertiseKeys", h.clock())
    with pytest.raises(RejectedError):
        h.coord.metrics(1, 0, {"dice": 0.5}, 3, h.clock())
    assert h.coord.stage is Stage.WAITING
    # In the update stage a SecAgg message is a stray too; the round goes on.
    h.tick()
    rid = h.attempt().round_id
    with pytest.raises(RejectedError, match="no secure aggregation"):
        h.coord.secagg_message(1, ServerPhase.COLLECT_KEYS, advert, "AdvertiseKeys", h.clock())
    h.coord.update_ready(1, rid, 2.0, h.clock())
    assert h.attempt().weights == {1: 2.0}


def test_join_first_and_plain_round_completes_with_the_weighted_mean() -> None:
    h = harness(make_config("plain", round_config={"learning_rate": 0.001, "local_epochs": 1}))
    with pytest.raises(RejectedError, match="join first"):
        h.coord.poll(1, 0, 0, h.clock())
    rid = _start_plain(h)
    start = h.inst(1)
    assert start.WhichOneof("kind") == "round_start" and start.round_id == rid
    assert json.loads(start.round_start.round_config_json) == {
        "learning_rate": 0.001,
        "local_epochs": 1,
    }
    for site, (value, weight) in {1: (1.0, 1.0), 2: (3.0, 3.0), 3: (0.0, 1.0)}.items():
        h.coord.plain_update(site, rid, weight, plain_update(value), h.clock())
    with pytest.raises(RejectedError, match="already reported"):
        h.coord.plain_update(1, rid, 1.0, plain_update(1.0), h.clock())
    h.coord.metrics(1, rid, {"dice": 0.5}, 10, h.clock())
    h.coord.metrics(2, rid, {"dice": 0.8}, 30, h.clock())
    with pytest.raises(RejectedError, match="finite"):
        h.coord.metrics(3, rid, {"dice": float("nan")}, 1, h.clock())
    h.tick(59)
    assert h.coord.stage is Stage.UPDATE  # d still has a second
    h.tick(2)  # the update deadline: d is left out, 3 >= min_sites
    assert h.coord.completed == 1
    expected = (1 * 1 + 3 * 3 + 0 * 1) / 5
    assert np.allclose(h.host.model["w"], expected)
    record = h.host.records["round-000000"]
    assert record["completed"] and record["survivors"] == [1, 2, 3]
    assert record["metrics"]["dice"]["pooled"] == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)
    assert record["metrics"]["dice"]["sites"] == {"a": 0.5, "b": 0.8}
    assert record["round_config"]["learning_rate"] == 0.001
    assert h.host.checkpoints[-1].completed_rounds == 1
    outcome = h.inst(4)
    assert outcome.WhichOneof("kind") == "outcome" and outcome.outcome.completed
    assert h.coord.finished and not h.coord.failed  # the only round is done
    finished = h.coord.poll(1, 0, 0, h.clock())
    assert finished is not None and finished.WhichOneof("kind") == "finished"


def test_waits_for_every_site_then_starts_with_min_sites_and_logs_a_heartbeat() -> None:
    h = harness(make_config("plain", min_sites=3))
    h.join(1, 2)
    h.tick()
    beat = h.log.named("waiting")[-1]
    assert beat["waiting_for"] == ["c", "d"] and beat["seconds_left"] == 30
    h.tick(31)  # wait_for_sites_s passed with only 2 < min_sites: keep waiting, warn
    assert h.coord.current is None
    assert h.log.named("waiting-for-sites")[-1]["live"] == ["a", "b"]
    h.join(3)
    h.tick(31)
    assert sorted(h.attempt().participants) == [1, 2, 3]
    rid = h.attempt().round_id
    h.coord.plain_update(1, rid, 1.0, plain_update(1.0), h.clock())
    h.tick(30)
    beat = h.log.named("waiting")[-1]
    assert beat["stage"] == "update" and beat["waiting_for"] == ["b", "c"]
    assert beat["seconds_left"] == 30


def test_too_few_updates_fail_the_round_and_the_retry_gets_a_fresh_round_id() -> None:
    h = harness(make_config("plain", min_sites=3, max_attempts=2))
    first = _start_plain(h)
    h.coord.plain_update(1, first, 1.0, plain_update(1.0), h.clock())
    h.tick(61)
    assert h.coord.completed == 0
    failed = h.host.records["round-000000-failed-1"]
    assert not failed["completed"] and "min_sites is 3" in failed["reason"]
    outcomes = [i for i in h.coord.sites[3].queue if i.WhichOneof("kind") == "outcome"]
    assert outcomes and not outcomes[0].outcome.completed
    h.tick()
    second = h.attempt().round_id
    assert second > first and h.attempt().attempt == 2
    # An update for the old round id is refused.
    with pytest.raises(RejectedError, match="the current round is"):
        h.coord.plain_update(2, first, 1.0, plain_update(1.0), h.clock())
    h.tick(61)  # fails again: max_attempts reached
    h.tick()
    assert h.coord.finished and h.coord.failed and h.coord.gave_up
    assert h.log.named("giving-up")


def test_rejoin_during_update_redoes_the_update_in_the_same_attempt() -> None:
    h = harness(make_config("plain"))
    rid = _start_plain(h)
    h.coord.plain_update(1, rid, 1.0, plain_update(5.0), h.clock())
    assert h.coord.join(1, h.clock()) is True  # restarted process
    assert 1 not in h.attempt().weights
    h.coord.plain_update(1, rid, 1.0, plain_update(1.0), h.clock())
    for site in (2, 3, 4):
        h.coord.plain_update(site, rid, 1.0, plain_update(1.0), h.clock())
    h.tick()
    assert np.allclose(h.host.model["w"], 1.0)


def _secagg_round(h: Harness, values: dict[int, int]) -> tuple[dict[int, SecAggSite], int]:
    sites = {s: SecAggSite(h, s, v) for s, v in values.items()}
    h.join(*sites)
    h.tick()
    rid = h.attempt().round_id
    for s in sites:
        h.coord.update_ready(s, rid, 1.0, h.clock())
    return sites, rid


def _pump(h: Harness, sites: dict[int, SecAggSite], skip: tuple[int, ...] = ()) -> None:
    for _ in range(20):
        h.tick()
        for s, site in sites.items():
            if s not in skip:
                site.step()
        if h.coord.stage is Stage.WAITING:
            return


def test_secagg_round_completes_and_a_dropout_in_a_phase_is_recovered() -> None:
    """4 sites, threshold 3: d answers the key phase then goes silent; its phase closes at the
    deadline, d is a dropout, and the sum of the three survivors is recovered."""
    h = harness(make_config("secagg", threshold=3))
    sites, rid = _secagg_round(h, {1: 1, 2: 2, 3: 3, 4: 4})
    h.tick()  # updates closed -> setup
    assert h.coord.stage is Stage.SECAGG
    setup = h.inst(1).secagg_setup
    assert setup.threshold == 3 and list(setup.site_ids) == [1, 2, 3, 4]
    for site in sites.values():
        site.step()  # adverts
    h.tick()
    for s in (1, 2, 3):
        sites[s].step()
    h.tick(5)
    assert h.coord.stage is Stage.SECAGG  # waits for d until the phase deadline
    h.tick(6)
    _pump(h, sites, skip=(4,))
    assert h.coord.completed == 1, h.log.events
    record = h.host.records["round-000000"]
    assert record["survivors"] == [1, 2, 3]  # d left before sharing keys: not even a dropout
    assert record["sum_sha256"] == rounds.vector_sha256(np.full(model_size(), 6, dtype=np.uint32))
    phases = [e["phase"] for e in h.log.named("phase-closed")]
    assert phases[0] == "collect-keys" and phases[-1] == "collect-unmask"
    assert any(e["missing"] == [4] for e in h.log.named("phase-closed"))
    # A late message from the dropout is refused, the federation is unaffected.
    advert = AdvertiseKeys(sender=4, round_id=rid, enc_public=b"1" * 32, mask_public=b"2" * 32)
    with pytest.raises(RejectedError):
        h.coord.secagg_message(4, ServerPhase.COLLECT_KEYS, advert, "AdvertiseKeys", h.clock())


def test_secagg_round_below_threshold_fails_and_is_retried_fresh() -> None:
    h = harness(make_config("secagg", threshold=4))
    sites, rid = _secagg_round(h, {1: 1, 2: 2, 3: 3, 4: 4})
    h.tick()
    for site in sites.values():
        site.step()
    h.tick()
    for s in (1, 2, 3):
        sites[s].step()
    h.tick(11)  # d missed its share phase: 3 < threshold 4, the round aborts
    assert h.coord.completed == 0
    failed = h.host.records["round-000000-failed-1"]
    assert "threshold" in failed["reason"]
    assert h.coord.stage is Stage.UPDATE and h.attempt().round_id > rid


def test_rejoin_during_a_phase_makes_the_site_a_dropout_of_the_attempt() -> None:
    h = harness(make_config("secagg", threshold=3))
    sites, _ = _secagg_round(h, {1: 1, 2: 2, 3: 3, 4: 4})
    h.tick()
    h.coord.join(4, h.clock())  # its protocol state is gone
    assert 4 in h.attempt().excluded
    _pump(h, sites, skip=(4,))
    assert h.coord.completed == 1
    assert h.host.records["round-000000"]["survivors"] == [1, 2, 3]


def test_resume_from_a_checkpoint_continues_with_the_next_round() -> None:
    h = harness(make_config("plain", rounds=3))
    rid = _start_plain(h)
    for site in (1, 2, 3, 4):
        h.coord.plain_update(site, rid, 1.0, plain_update(2.0), h.clock())
    h.tick()
    saved = h.host.checkpoints[-1]
    # A new coordinator (a restarted server) resumes from what was saved.
    again = harness(make_config("plain", rounds=3))
    again.host.set_model(saved.model)
    again.host.next_id = h.host.next_id
    again.coord.resume(saved.completed_rounds, [dict(r) for r in saved.history])
    assert again.coord.model_round_id == rid
    again.join(1, 2, 3, 4)
    assert again.coord.poll(1, 0, 0, again.clock()) is None
    again.tick()
    start = again.inst(1).round_start
    assert start.round_index == 1 and start.model_round_id == rid
    assert again.attempt().round_id > rid


def test_stop_fails_the_running_round_and_finishes() -> None:
    h = harness(make_config("plain"))
    _start_plain(h)
    h.coord.stop(h.clock())
    h.tick()
    assert h.coord.finished and h.coord.failed
    assert "server stopping" in h.host.records["round-000000-failed-1"]["reason"]


def test_zero_rounds_is_a_failure() -> None:
    h = harness(make_config("plain", max_attempts=1))
    h.join(1, 2)
    h.tick()
    h.tick(31)  # two live sites after wait_for_sites_s: the round starts with them
    assert h.coord.stage is Stage.UPDATE
    h.tick(61)  # nobody reports
    h.tick()
    assert h.coord.finished and h.coord.failed and h.coord.completed == 0


def test_server_optimizer_steps_the_mean_and_its_state_is_checkpointed() -> None:
    from secure_fl.aggregators.server_opt import make_server_optimizer

    spec = {"name": "fedavgm", "lr": 1.0, "momentum": 0.5}
    h = harness(make_config("plain", rounds=2, server_optimizer=spec))
    h.coord.optimizer = make_server_optimizer("fedavgm", lr=1.0, momentum=0.5)
    _start_plain(h)
    for _ in range(2):
        rid = h.attempt().round_id
        for site in (1, 2, 3, 4):
            h.coord.plain_update(site, rid, 1.0, plain_update(1.0), h.clock())
        h.tick()
    # momentum: step 1 = 1, step 2 = 0.5 * 1 + 1 = 1.5 -> model 2.5
    assert np.allclose(h.host.model["w"], 2.5)
    state = h.host.checkpoints[-1].server_optimizer
    assert state is not None and state["steps"] == 2


def test_config_refuses_a_bad_round_config_and_an_optimizer_with_ckks() -> None:
    with pytest.raises(ConfigError, match=r"round_config\.lr"):
        make_config("plain", round_config={"lr": [1, 2]})
    with pytest.raises(ConfigError, match="ckks"):
        make_config("ckks", server_optimizer={"name": "fedavg"})
    with pytest.raises(ConfigError, match="server_optimizer"):
        make_config("plain", server_optimizer={"name": "sgd"})
    assert len(NAMES) == 4 and model_size() == 8


class _FakePrivacy:
    """Stands in for transport.privacy.ServerPrivacy: one round of budget, a visible 'noise'."""

    def __init__(self, rounds: int) -> None:
        self.rounds, self.applied, self.finished = rounds, 0, False

    def before_round(self, round_index: int, participants: dict[int, str]) -> str:
        from secure_fl.errors import BudgetExceededError

        if round_index >= self.rounds:
            raise BudgetExceededError(f"round {round_index + 1}: budget spent")
        return '{"kind": "central_clip/v1", "clip": 1.0}'

    def l2_clip(self) -> float:
        return 1.0

    def apply(
        self,
        round_index: int,
        mean: np.ndarray,
        survivors: dict[int, str],
        weights: dict[int, float],
        record: dict[str, object],
    ) -> np.ndarray:
        self.applied += 1
        record["privacy"] = {"round": round_index + 1}
        return mean + 100.0

    def finish(self, rounds_completed: int) -> None:
        self.finished = True


def test_privacy_noise_is_applied_and_a_spent_budget_stops_gracefully() -> None:
    privacy = _FakePrivacy(rounds=1)
    h = harness(make_config("plain", rounds=3), privacy=privacy)
    rid = _start_plain(h)
    for site in (1, 2, 3, 4):
        h.coord.plain_update(site, rid, 1.0, plain_update(1.0), h.clock())
    h.tick()
    assert np.allclose(h.host.model["w"], 101.0) and privacy.applied == 1
    assert h.host.records["round-000000"]["privacy"] == {"round": 1}
    h.tick()  # round 2: the budget refuses it before any site hears of it
    assert h.coord.finished and not h.coord.failed and h.coord.completed == 1
    assert "budget spent" in h.coord.budget_stop
    assert h.coord.attempts == 1  # no round 2 was started


def test_distributed_dp_json_goes_into_every_secagg_setup() -> None:
    h = harness(make_config("secagg", threshold=3), privacy=_FakePrivacy(rounds=5))
    sites, _ = _secagg_round(h, {1: 1, 2: 2, 3: 3, 4: 4})
    h.tick()
    for site in (1, 2, 3, 4):
        setup = h.inst(site).secagg_setup
        assert json.loads(setup.distributed_dp_json)["kind"] == "central_clip/v1"
    _pump(h, sites)
    assert h.coord.completed == 1
