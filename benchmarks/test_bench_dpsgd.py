"""The cost of DP-SGD per training step of the 3D-UNet against plain training (pytest-benchmark).

One step: a batch of 2 patches of 32^3 through MONAI's UNet with channels (16, 32, 64, 128)
(1.2 M parameters); DP-SGD adds per-sample gradients (Opacus, functorch mode), per-sample clipping
and Gaussian noise.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from secure_fl.training import ModelConfig, build_unet

pytestmark = pytest.mark.slow


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 32, generator=g)
    y = (torch.rand(2, 1, 32, 32, 32, generator=g) > 0.8).float()
    return x, y


def test_plain_step_baseline(benchmark) -> None:
    from monai.losses.dice import DiceCELoss

    torch.manual_seed(0)
    net = build_unet(ModelConfig())
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x, y = _batch()

    def step() -> None:
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()

    benchmark.group = "3D-UNet training step (1.2M, 2 x 32^3)"
    benchmark.name = "plain step (baseline)"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)


def test_dp_sgd_step(benchmark) -> None:
    from monai.losses.dice import DiceCELoss
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    net = build_unet(ModelConfig())
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x, y = _batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, dp_opt, _ = PrivacyEngine().make_private(
            module=net,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="functorch",
        )

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_opt.zero_grad()
            loss_fn(module(x), y).backward()
            dp_opt.step()

    benchmark.group = "3D-UNet training step (1.2M, 2 x 32^3)"
    benchmark.name = "DP-SGD step (Opacus functorch)"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
