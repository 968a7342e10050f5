"""The 3D-UNet trainer as a task of the gRPC federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from secure_fl.training.remote import initial_model, unet_site_task, write_initial_model
from secure_fl.transport.tasks import SiteTask, check_result
from secure_fl.transport.tensors import loads


def test_unet_task_returns_a_weighted_delta_of_the_model(
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
        rounds=2,
    )
    assert isinstance(task, SiteTask)
    model = loads(write_initial_model(tmp_path / "init.tensors", channels).read_bytes())
    assert list(model) == list(initial_model(channels))
    result = check_result(task.compute_update(model, 0), model)
    assert result.weight == 4.0  # site-A's training cases
    assert any(np.abs(v).max() > 0 for v in result.update.values())


def test_unet_task_follows_the_learning_rate_schedule_over_the_run(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    """Over gRPC the trainer is told the run's length, so the cosine schedule runs (it used to stay
    at the initial rate every round)."""
    channels = (4, 8, 16)
    task = unet_site_task(
        "site-A",
        datalist=str(tiny_datalist),
        grid=(24, 24, 24),
        patch=(16, 16, 16),
        channels=channels,
        device="cpu",
        rounds=10,
        lr=3e-3,
    )
    model = loads(write_initial_model(tmp_path / "init.tensors", channels).read_bytes())
    config = task.trainer.train_config
    rates = []
    for round_index in (0, 9):
        task.compute_update(model, round_index)
        rates.append(task.trainer.last_lr)
    assert rates == [config.lr_for_round(0, 10), config.lr_for_round(9, 10)]
    assert rates[1] < rates[0] / 10
