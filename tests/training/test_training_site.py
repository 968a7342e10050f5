"""The site trainer through MONAI's federated-learning client interface, on synthetic and real scans."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from monai.fl.client import ClientAlgo
from monai.fl.utils.constants import FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.data import PreprocessConfig, load_datalist, scan_brats_folder, split_by_site
from secure_fl.training import ModelConfig, SiteTrainer, TrainConfig

SAMPLE = Path(
    os.environ.get(
        "SECURE_FL_BRATS_SAMPLE",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "brats2013_sample",
    )
)


def _trainer(train, val, grid=(24, 24, 24), patch=(16, 16, 16)) -> SiteTrainer:
    return SiteTrainer(
        "site",
        train,
        val,
        preprocess=PreprocessConfig(grid=grid, patch=patch, samples_per_volume=1),
        model=ModelConfig(channels=(4, 8, 16), num_res_units=1),
        train=TrainConfig(lr=1e-2, local_steps=2, batch_size=1, device="cpu"),
        seed=0,
    )


def test_site_trainer_is_a_monai_client_algo(tiny_datalist: Path) -> None:
    cases = load_datalist(tiny_datalist)
    train, val = split_by_site(cases, val_fraction=0.34, seed=0)["site-A"]
    algo = _trainer(train, val)
    assert isinstance(algo, ClientAlgo)
    algo.initialize()
    start = algo.get_weights()
    assert start.weight_type == WeightType.WEIGHTS
    algo.train(ExchangeObject(weights=start.weights), {"round": 0})
    after = algo.get_weights()
    assert after.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] == 2
    changed = [k for k in start.weights if not np.array_equal(start.weights[k], after.weights[k])]
    assert changed, "training changed no weight"
    metrics = algo.evaluate(ExchangeObject(weights=after.weights)).metrics
    assert 0.0 <= metrics["val_dice"] <= 1.0
    assert len(metrics["per_case"]) == len(val)
    stats = algo.get_data_stats().statistics[FlStatistics.TOTAL_DATA]
    assert stats == {"train": len(train), "val": len(val)}


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared BraTS sample not present")
def test_training_and_dice_on_real_scans() -> None:
    cases = scan_brats_folder(SAMPLE, sites=2)
    assert len(cases) == 6
    by_site = split_by_site(cases, val_fraction=0.34, seed=0)
    train, val = next(iter(by_site.values()))
    algo = _trainer(train[:2], val[:1], grid=(32, 32, 32), patch=(16, 16, 16))
    algo.train(ExchangeObject(weights=None), {"round": 0})
    dice = algo.evaluate(ExchangeObject(weights=algo.get_weights().weights)).metrics["val_dice"]
    assert 0.0 <= dice <= 1.0


def _small_trainer(train, val, **kwargs) -> SiteTrainer:
    return SiteTrainer(
        "site-P",
        train,
        val,
        preprocess=PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1),
        model=ModelConfig(channels=(4, 8, 16), num_res_units=1),
        train=TrainConfig(lr=1e-2, local_steps=2, batch_size=1, device="cpu"),
        seed=0,
        **kwargs,
    )


def test_progress_bars_name_the_site_and_the_loss_is_hidden_under_dp(
    tiny_datalist: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from secure_fl.training import progress

    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)  # draw every step

    before = torch.get_num_threads()
    cases = load_datalist(tiny_datalist)
    train, val = split_by_site(cases, val_fraction=0.34, seed=0)["site-A"]
    try:
        algo = _small_trainer(train, val, progress=True, threads=1)
        algo.initialize()
        assert torch.get_num_threads() == 1
        algo.train(ExchangeObject(weights=None), {"round": 4})
        algo.evaluate(ExchangeObject(weights=None))
        err = capsys.readouterr().err
        for label in ("caching training cases", "caching held-out cases", "train round 5", "Dice"):
            assert f"site-P: {label}" in err, label
        assert "loss=" in err

        algo.private = True  # under DP the un-noised training loss is never shown
        algo.train(ExchangeObject(weights=None), {"round": 5})
        err = capsys.readouterr().err
        assert "site-P: train round 6" in err and "loss" not in err

        quiet = _small_trainer(train, val)  # auto: no terminal under pytest
        quiet.train(ExchangeObject(weights=None), {"round": 0})
        quiet.evaluate(ExchangeObject(weights=None))
        assert capsys.readouterr() == ("", "")
    finally:
        torch.set_num_threads(before)


def test_thread_count_is_validated(tiny_datalist: Path) -> None:
    from secure_fl.errors import ConfigError

    cases = load_datalist(tiny_datalist)
    train, val = split_by_site(cases, val_fraction=0.34, seed=0)["site-A"]
    with pytest.raises(ConfigError, match="threads"):
        _small_trainer(train, val, threads=0)
