"""Per-round configuration from the server and site metrics sent back (SiteTask, TaskResult)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.training.remote import unet_site_task, write_initial_model
from secure_fl.transport.tasks import (
    SyntheticTask,
    TaskResult,
    check_result,
    check_round_config,
    run_task,
)
from secure_fl.transport.tensors import loads

MODEL = {"w": np.zeros((3, 2), np.float32), "b": np.ones(4, np.float32)}


def test_round_config_is_validated_naming_the_key() -> None:
    assert check_round_config(None) == {}
    assert check_round_config({"learning_rate": 1, "local_epochs": 3, "fedprox_mu": 0}) == {
        "learning_rate": 1.0,
        "local_epochs": 3,
        "fedprox_mu": 0.0,
    }
    cases = [
        ({"lr": 0.1}, r"round_config\.lr .*allowed: learning_rate, local_epochs, fedprox_mu"),
        ({"learning_rate": 0.0}, r"round_config\.learning_rate must be a finite number > 0"),
        ({"learning_rate": float("nan")}, r"learning_rate"),
        ({"local_epochs": 0}, r"round_config\.local_epochs must be an integer in \[1, 1000\]"),
        ({"local_epochs": 2.0}, r"local_epochs"),
        ({"local_epochs": True}, r"local_epochs"),
        ({"fedprox_mu": -1e-3}, r"round_config\.fedprox_mu must be a finite number >= 0"),
    ]
    for config, match in cases:
        with pytest.raises(ConfigError, match=match):
            check_round_config(config)
    with pytest.raises(ConfigError, match=r"round_config\.fedprox_mu .*allowed: learning_rate$"):
        check_round_config({"fedprox_mu": 0.1}, allowed=["learning_rate"])


def test_synthetic_task_applies_the_round_config() -> None:
    task = SyntheticTask("a", seed=1, noise=0.0)
    plain = task.compute_update(MODEL, 0)
    same = task.compute_update(MODEL, 0, {"local_epochs": 1, "fedprox_mu": 0.0})
    for k in MODEL:  # one epoch, no mu: bit-identical to no round config
        assert plain.update[k].tobytes() == same.update[k].tobytes()
    gap = {k: plain.update[k].astype(np.float64) / 0.5 for k in MODEL}  # target - global
    faster = task.compute_update(MODEL, 0, {"learning_rate": 0.25})
    two = task.compute_update(MODEL, 0, {"local_epochs": 2})
    prox = task.compute_update(MODEL, 0, {"local_epochs": 2, "fedprox_mu": 1.0})
    for k in MODEL:
        np.testing.assert_allclose(faster.update[k], 0.25 * gap[k], rtol=1e-6)
        np.testing.assert_allclose(two.update[k], 0.75 * gap[k], rtol=1e-6)  # 0.5 + 0.5 * 0.5
        np.testing.assert_allclose(prox.update[k], 0.5 * gap[k], rtol=1e-6)  # pulled back
    with pytest.raises(ConfigError, match=r"round_config\.epochs"):
        task.compute_update(MODEL, 0, {"epochs": 2})


class _LegacyTask:
    """A task written before round_config existed."""

    def compute_update(self, global_model: Mapping[str, np.ndarray], round_id: int) -> TaskResult:
        return TaskResult(update={k: np.zeros_like(v) for k, v in global_model.items()}, weight=1)


def test_run_task_calls_old_and_new_tasks() -> None:
    assert run_task(_LegacyTask(), MODEL, 0).weight == 1  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"round_config\.learning_rate.*accepts no per-round"):
        run_task(_LegacyTask(), MODEL, 0, {"learning_rate": 0.1})  # type: ignore[arg-type]
    result = run_task(SyntheticTask("a"), MODEL, 0, {"learning_rate": 0.1})
    assert set(result.update) == set(MODEL)


def test_metrics_must_be_finite_numbers_with_their_sample_count() -> None:
    update = {k: np.zeros_like(v) for k, v in MODEL.items()}
    ok = TaskResult(update=update, weight=2.0, metrics={"dice": 0.5}, metric_samples=3)
    assert check_result(ok, MODEL).metric_samples == 3
    for bad, match in (
        ({"metrics": {"dice": float("nan")}, "metric_samples": 1}, "finite"),
        ({"metrics": {"dice": "high"}, "metric_samples": 1}, "finite"),
        ({"metrics": {"dice": 0.5}}, "metric_samples must be >= 1"),
        ({"metric_samples": -1}, "metric_samples must be an integer >= 0"),
    ):
        with pytest.raises(InvalidUpdateError, match=match):
            check_result(TaskResult(update=update, weight=2.0, **bad), MODEL)  # type: ignore[arg-type]


def test_unet_task_takes_the_round_config_and_sends_validation_dice(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    channels = (4, 8, 16)
    task = unet_site_task(
        "site-A",
        datalist=str(tiny_datalist),
        grid=(24, 24, 24),
        patch=(16, 16, 16),
        channels=channels,
        device="cpu",
        rounds=4,
        batch_size=2,
        val_fraction=0.25,
    )
    trainer = task.trainer
    model = loads(write_initial_model(tmp_path / "init.tensors", channels).read_bytes())
    base = task.compute_update(model, 0)
    base_steps = trainer.last_steps
    assert trainer.last_lr == trainer.train_config.lr_for_round(0, 4)
    result = check_result(
        task.compute_update(model, 0, {"learning_rate": 0.5, "local_epochs": 2}), model
    )
    assert trainer.last_lr == 0.5
    assert trainer.last_steps == 2 * base_steps
    # the received model is scored on the validation cases, and only that is sent
    assert set(result.metrics) == {"dice"} and 0.0 <= result.metrics["dice"] <= 1.0
    assert result.metric_samples == len(trainer.val_cases) >= 1
    expected = float(np.mean(trainer.dice([{k: v.astype(np.float32) for k, v in model.items()}])))
    assert result.metrics["dice"] == pytest.approx(expected)
    assert base.metrics == result.metrics  # same received model, same score
    with pytest.raises(ConfigError, match=r"round_config\.momentum"):
        task.compute_update(model, 1, {"momentum": 0.9})
