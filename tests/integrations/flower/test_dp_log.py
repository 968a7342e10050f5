"""The durable DP-SGD log of a Flower node (secure_fl.integrations.flower.dp_log)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

flwr = pytest.importorskip("flwr")

from secure_fl.errors import ConfigError  # noqa: E402
from secure_fl.integrations.flower.dp_log import DPSGDLog, durable_dp_history  # noqa: E402
from secure_fl.training.site_dp import DPRound  # noqa: E402


def _round(r: int) -> DPRound:
    return DPRound(r, 12, 1.1, 0.25, 1.0, "csprng")


DELTA, TARGET = 1e-5, 8.0


def _trainer(delta: float = DELTA, target: float | None = TARGET) -> SimpleNamespace:
    privacy = SimpleNamespace(delta=delta, target_epsilon=target)
    return SimpleNamespace(own_dp=SimpleNamespace(rounds_log=[], privacy=privacy))


def test_rounds_are_appended_and_read_back(tmp_path: Path) -> None:
    log = DPSGDLog(tmp_path / "flower" / "dp_sgd.jsonl")
    assert log.read() == []
    with log.held():
        log.append([_round(0)], delta=DELTA, target_epsilon=TARGET)
        log.append([_round(1), _round(0)], delta=DELTA, target_epsilon=TARGET)
    assert log.read() == [_round(0), _round(1), _round(0)]
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_history_replaces_the_trainer_log_and_survives_a_failing_block(tmp_path: Path) -> None:
    log = DPSGDLog(tmp_path / "dp_sgd.jsonl")
    trainer = _trainer()
    trainer.own_dp.rounds_log = [_round(r) for r in range(50)]  # whatever it held: not trusted
    with durable_dp_history(trainer, log):
        assert trainer.own_dp.rounds_log == []
        trainer.own_dp.rounds_log.append(_round(0))
    fresh = _trainer()
    with pytest.raises(RuntimeError), durable_dp_history(fresh, log):
        assert fresh.own_dp.rounds_log == [_round(0)]
        fresh.own_dp.rounds_log.append(_round(1))  # a round ran, then the train step failed
        raise RuntimeError("after the round")
    assert log.read() == [_round(0), _round(1)]  # the spend is kept all the same


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("{not json", "not JSON"),
        ('{"round": 0}', "fields"),
        (
            '{"round": -1, "steps": 1, "noise_multiplier": 1.0, "sample_rate": 0.5, '
            '"clip": 1.0, "noise_source": "csprng", "delta": 1e-5, "target_epsilon": 8.0}',
            "round",
        ),
        (
            '{"round": 0, "steps": 1, "noise_multiplier": 0.0, "sample_rate": 0.5, '
            '"clip": 1.0, "noise_source": "csprng", "delta": 1e-5, "target_epsilon": 8.0}',
            "noise_multiplier",
        ),
        (
            '{"round": 0, "steps": 1, "noise_multiplier": 1.0, "sample_rate": 2.0, '
            '"clip": 1.0, "noise_source": "csprng", "delta": 1e-5, "target_epsilon": 8.0}',
            "sample_rate",
        ),
        (
            '{"round": 0, "steps": 1, "noise_multiplier": 1.0, "sample_rate": 0.5, '
            '"clip": 1.0, "noise_source": "none", "delta": 1e-5, "target_epsilon": 8.0}',
            "noise_source",
        ),
    ],
)
def test_a_malformed_log_is_refused_not_read_as_empty(
    tmp_path: Path, line: str, field: str
) -> None:
    path = tmp_path / "dp_sgd.jsonl"
    path.write_text(line + "\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=field):
        DPSGDLog(path).read()
    with pytest.raises(ConfigError, match=field), durable_dp_history(_trainer(), DPSGDLog(path)):
        pass


def test_a_truncated_or_shared_log_is_refused(tmp_path: Path) -> None:
    log = DPSGDLog(tmp_path / "dp_sgd.jsonl")
    log.append([_round(0)], delta=DELTA, target_epsilon=TARGET)
    text = log.path.read_text()
    log.path.write_text(text[:-5])
    with pytest.raises(ConfigError, match="incomplete"):
        log.read()
    log.path.write_text(text)
    os.chmod(log.path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        log.read()
    assert json.loads(text)["steps"] == 12


def test_a_trainer_without_own_dp_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(ConfigError, match="own_dp"),
        durable_dp_history(SimpleNamespace(own_dp=None), DPSGDLog(tmp_path / "x")),
    ):
        pass


def test_each_round_records_its_delta_and_target_epsilon(tmp_path: Path) -> None:
    log = DPSGDLog(tmp_path / "dp_sgd.jsonl")
    log.append([_round(0)], delta=DELTA, target_epsilon=TARGET)
    line = json.loads(log.path.read_text())
    assert line["delta"] == DELTA and line["target_epsilon"] == TARGET


@pytest.mark.parametrize(
    ("delta", "target", "field"),
    [(0.5, TARGET, "delta"), (DELTA, 80.0, "target_epsilon"), (DELTA, None, "target_epsilon")],
)
def test_a_round_at_another_delta_or_target_is_refused_before_training(
    tmp_path: Path, delta: float, target: float | None, field: str
) -> None:
    """B4: re-judging the recorded spend at a larger delta (or a higher target) would reopen
    the budget; the log refuses the round, naming the file and the field, and logs nothing."""
    log = DPSGDLog(tmp_path / "dp_sgd.jsonl")
    log.append([_round(0)], delta=DELTA, target_epsilon=TARGET)
    trainer = _trainer(delta, target)
    ran = []
    with (
        pytest.raises(ConfigError, match=rf"dp_sgd.jsonl line 1: {field} was"),
        durable_dp_history(trainer, log),
    ):
        ran.append(1)
    assert ran == [] and log.read(delta=DELTA, target_epsilon=TARGET) == [_round(0)]
    with pytest.raises(ConfigError, match=field):
        log.append([_round(1)], delta=delta, target_epsilon=target)


def test_a_log_without_delta_is_refused(tmp_path: Path) -> None:
    """A line from before delta was recorded cannot be judged: refused, not read at any delta."""
    path = tmp_path / "dp_sgd.jsonl"
    path.write_text(
        '{"round": 0, "steps": 1, "noise_multiplier": 1.0, "sample_rate": 0.5, '
        '"clip": 1.0, "noise_source": "csprng"}\n'
    )
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="fields must be exactly"):
        DPSGDLog(path).read()


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, "x"])
def test_a_recorded_delta_outside_0_1_is_refused(tmp_path: Path, delta: object) -> None:
    path = tmp_path / "dp_sgd.jsonl"
    line = json.loads(_line_text())
    line["delta"] = delta
    path.write_text(json.dumps(line) + "\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="delta"):
        DPSGDLog(path).read()


def _line_text() -> str:
    return (
        '{"round": 0, "steps": 1, "noise_multiplier": 1.0, "sample_rate": 1.0, "clip": 1.0, '
        '"noise_source": "csprng", "delta": 1e-5, "target_epsilon": 8.0}'
    )


def test_sample_rate_one_and_no_target_are_valid(tmp_path: Path) -> None:
    path = tmp_path / "dp_sgd.jsonl"
    line = json.loads(_line_text())
    line["target_epsilon"] = None
    path.write_text(json.dumps(line) + "\n")
    os.chmod(path, 0o600)
    (entry,) = DPSGDLog(path).read(delta=1e-5, target_epsilon=None)
    assert entry.sample_rate == 1.0
