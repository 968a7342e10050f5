"""DP that learns, in the site trainer (however it is driven): ``train.*`` options reach DP-SGD
and ordinary training, the frozen subset gives d, and the round returns the EMA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.fl.utils.exchange_object import ExchangeObject
from monai.losses.dice import DiceCELoss

from secure_fl.data import PreprocessConfig, load_datalist
from secure_fl.privacy import PrivacyConfig
from secure_fl.training import ModelConfig, SiteTrainer, TrainConfig

PRE = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1)
MODEL = ModelConfig(channels=(4, 8, 16), num_res_units=1, norm="group")


def trainer(datalist: Path, privacy: PrivacyConfig | None, **train: Any) -> tuple[Any, list[int]]:
    seen: list[int] = []
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss(out: Any, label: Any) -> Any:
        seen.append(int(out.shape[0]))
        return dice_ce(out, label)

    cases = [c for c in load_datalist(datalist) if c.site == "site-A"]
    site = SiteTrainer(
        "site-A",
        cases,
        [],
        preprocess=PRE,
        model=MODEL,
        train=TrainConfig(device="cpu", batch_size=2, **train),
        seed=4,
        threads=1,
        progress=False,
        loss=loss,
        privacy=privacy,
    )
    return site, seen


def test_dp_sgd_in_the_trainer_uses_k_views_frozen_subset_and_ema(tiny_datalist: Path) -> None:
    privacy = PrivacyConfig(level="sample", noise_multiplier=1.0, reproducible_noise=True)
    options: dict[str, Any] = {"trainable": ("head", "norm"), "augment_multiplicity": 3}
    site, seen = trainer(tiny_datalist, privacy, ema=0.9, max_physical_batch=1, **options)
    site.initialize()
    initial: dict[str, Any] = dict(site.get_weights().weights or {})
    start = ExchangeObject(weights={k: v.copy() for k, v in initial.items()})
    site.train(start, extra={"round": 0, "rounds": 1})
    assert seen and all(b == 3 for b in seen)  # one case per physical batch, K patches each
    assert site.dp_dimension < sum(p.numel() for p in site.network.parameters()) / 4
    assert site.last_dp is not None and site.last_dp.sample_rate == 2 / 4  # per patient
    averaged: dict[str, Any] = dict(site.get_weights().weights or {})
    frozen = [k for k in averaged if not k.startswith("model.2.") and ".adn.N." not in k]
    assert all(np.array_equal(averaged[k], initial[k]) for k in frozen)
    # Same round without the EMA: the last iterate, which differs from the returned average.
    plain, _ = trainer(tiny_datalist, privacy, max_physical_batch=1, **options)
    plain.initialize()
    plain.train(start, extra={"round": 0, "rounds": 1})
    last: dict[str, Any] = dict(plain.get_weights().weights or {})
    assert any(not np.allclose(last[k], averaged[k]) for k in averaged)


def test_ordinary_training_feeds_k_patches_per_case(tiny_datalist: Path) -> None:
    site, seen = trainer(tiny_datalist, None, augment_multiplicity=2, ema=0.5)
    torch.manual_seed(0)
    site.train(ExchangeObject(weights=None), extra={"round": 0, "rounds": 1})
    assert seen == [4, 4]  # 4 training cases, 2 per batch, 2 patches each
