"""Shared helpers of the "DP that learns" tests (imported by module name: keep the basename
unique)."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses.dice import DiceCELoss

from secure_fl.training.dp_sgd import SampleDP, train_dp_sgd


class Patches(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``n`` fixed 8^3 cases (a bright cube labelled 1), no augmentation."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            image = torch.randn(1, 8, 8, 8, generator=g) * 0.1
            label = torch.zeros(1, 8, 8, 8)
            label[:, 2:6, 2:6, 2:6] = 1
            self.items.append({"image": image + label, "label": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.items[index].items()}


def dp_round(network: Any, dataset: Any, **options: Any) -> Any:
    defaults: dict[str, Any] = {
        "settings": SampleDP(noise_multiplier=1.0, clip=1.0, reproducible=True),
        "batch_size": 2,
        "epochs": 1,
        "lr": 1e-2,
        "optimizer": "sgd",
        "weight_decay": 0.0,
        "loss_fn": DiceCELoss(to_onehot_y=True, softmax=True),
        "device": torch.device("cpu"),
        "seed": 7,
    }
    defaults.update(options)
    return train_dp_sgd(network, dataset, **defaults)
