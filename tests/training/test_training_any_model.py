"""Any torch model in the SiteTrainer, and DP-SGD that the trainer switches on by itself when
another framework (MONAI FL, NVIDIA FLARE) drives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.data import PreprocessConfig, load_datalist, split_by_site
from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy import PrivacyConfig
from secure_fl.privacy.accounting import compute_epsilon
from secure_fl.training import SiteTrainer, TrainConfig
from secure_fl.training.model import get_state

PRE = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1)


class TinyConvNet(torch.nn.Module):
    """Not a UNet: two 3-D convolutions, 2 output classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv3d(3, 2, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def _cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, (label[:, 0] > 0.5).long())


def _foreground_fraction(probs: Any, label: Any) -> float:
    return float((probs.argmax(dim=1) == 1).float().mean())


def _site(tiny_datalist: Path) -> tuple[list[Any], list[Any]]:
    return split_by_site(load_datalist(tiny_datalist), val_fraction=0.34, seed=0)["site-A"]


def test_a_non_unet_model_trains_a_round_with_its_loss_and_metric(tiny_datalist: Path) -> None:
    train, val = _site(tiny_datalist)
    calls = {"loss": 0, "metric": 0}

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        calls["loss"] += 1
        return _cross_entropy(logits, label)

    def metric(probs: Any, label: Any) -> float:
        calls["metric"] += 1
        return _foreground_fraction(probs, label)

    algo = SiteTrainer(
        "site-A",
        train,
        val,
        preprocess=PRE,
        train=TrainConfig(lr=1e-2, local_steps=2, batch_size=1, device="cpu"),
        model_factory=TinyConvNet,
        loss=loss,
        metric=metric,
    )
    start = algo.get_weights().weights
    assert start is not None and set(start) == set(get_state(TinyConvNet()))
    algo.train(ExchangeObject(weights=start), {"round": 0})
    after = algo.get_weights().weights
    assert after is not None
    assert any(not np.array_equal(start[k], after[k]) for k in start)
    assert calls["loss"] == 2
    metrics = algo.evaluate(ExchangeObject(weights=after)).metrics
    assert calls["metric"] == len(val) == len(metrics["per_case"])
    assert 0.0 <= metrics["val_dice"] <= 1.0


def test_bad_hooks_are_refused(tiny_datalist: Path) -> None:
    train, val = _site(tiny_datalist)
    with pytest.raises(ConfigError, match="model_factory must be callable"):
        SiteTrainer("s", train, val, preprocess=PRE, train=TrainConfig(), model_factory=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="samples_per_volume = 1"):
        SiteTrainer(
            "s",
            train,
            val,
            preprocess=PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16)),
            train=TrainConfig(),
            privacy=PrivacyConfig(level="sample", noise_multiplier=1.0),
        )


def _dp_trainer(train: list[Any], val: list[Any], privacy: PrivacyConfig) -> SiteTrainer:
    return SiteTrainer(
        "site-A",
        train,
        val,
        preprocess=PRE,
        train=TrainConfig(lr=1e-2, local_epochs=1, batch_size=1, device="cpu"),
        model_factory=TinyConvNet,
        loss=_cross_entropy,
        privacy=privacy,
    )


def test_a_trainer_built_with_sample_dp_runs_dp_sgd_when_driven_directly(
    tiny_datalist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As MONAI FL / NVIDIA FLARE drive it: no runner, no ledger; the trainer attaches Opacus
    itself, the noise is fresh (two identical trainers train differently) and it reports what
    it spent."""
    from opacus import PrivacyEngine

    attached: list[float] = []
    original = PrivacyEngine.make_private

    def spy(self: Any, **kwargs: Any) -> Any:
        attached.append(kwargs["noise_multiplier"])
        return original(self, **kwargs)

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    train, val = _site(tiny_datalist)
    privacy = PrivacyConfig(level="sample", noise_multiplier=1.5, clip=1.0, delta=1e-4)
    a, b = _dp_trainer(train, val, privacy), _dp_trainer(train, val, privacy)
    start = a.get_weights().weights
    assert start is not None
    for algo in (a, b):
        algo.train(ExchangeObject(weights=start), {"round": 0})
    assert attached == [1.5, 1.5]
    wa, wb = a.get_weights(), b.get_weights()
    assert any(not np.array_equal(wa.weights[k], wb.weights[k]) for k in start)  # noised
    stats = wa.statistics or {}
    assert "train_loss" not in stats  # un-noised statistic: never under DP
    (record,) = a.dp_rounds
    assert record.round == 0 and record.noise_multiplier == 1.5 and record.noise_source == "csprng"
    assert stats["dp_steps"] == record.steps == len(train)  # q = 1/n: n draws per epoch
    expected = compute_epsilon(1.5, 1 / len(train), record.steps, 1e-4)
    assert stats["dp_epsilon"] == pytest.approx(expected) and expected > 0
    assert a.epsilon() == pytest.approx(expected)
    a.train(ExchangeObject(weights=start), {"round": 1})
    assert len(a.privacy_events()) == 2 and a.epsilon() > expected  # spending composes


def test_the_trainers_own_target_epsilon_is_a_budget(tiny_datalist: Path) -> None:
    train, val = _site(tiny_datalist)
    privacy = PrivacyConfig(level="sample", target_epsilon=4.0, clip=1.0, delta=1e-4)
    algo = _dp_trainer(train, val, privacy)
    algo.rounds = 2
    start = algo.get_weights().weights
    algo.train(ExchangeObject(weights=start), {"round": 0})
    assert 0 < algo.epsilon() < 4.0
    # a server asking for more local epochs than the noise was calibrated for is refused
    with pytest.raises(BudgetExceededError, match=r"budget 4\.000"):
        algo.train(ExchangeObject(weights=start), {"round": 1, "local_epochs": 5})
    assert len(algo.dp_rounds) == 1  # nothing ran
    algo.train(ExchangeObject(weights=start), {"round": 1})
    assert algo.epsilon() <= 4.0 + 1e-9
