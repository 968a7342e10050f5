"""Sample-level DP-SGD for the site trainer, through Opacus.

Each optimiser step draws a Poisson sample of the site's training *cases* (each case independently
with probability ``q = batch_size / n_cases``), computes one gradient per case with Opacus'
per-sample gradients (functorch mode, which handles MONAI's Conv3d, ConvTranspose3d, PReLU and
instance-norm layers), clips each to ``clip`` in L2, sums them, adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` and divides by the expected batch size. An empty sample still
takes a (noise-only) step, as the analysis of the Poisson-subsampled Gaussian assumes.

Guarantee: each round is ``steps`` compositions of the Poisson-subsampled Gaussian mechanism with
(``noise_multiplier``, ``q``) over the site's patients; the privacy unit is one patient (one case),
which is why sample-level DP requires one patch per case per draw (``samples_per_volume == 1``).
The noise comes from torch's generator seeded per round (reproducible research runs); production
deployments should draw it from a cryptographically secure generator (Opacus ``secure_mode``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings of one site: noise multiplier and per-patient clip norm."""

    noise_multiplier: float
    clip: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(
                f"privacy.noise_multiplier must be > 0 for DP-SGD, got {self.noise_multiplier}"
            )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"privacy.clip must be > 0, got {self.clip}")


@dataclass(frozen=True)
class DPSGDResult:
    """What a DP-SGD round did: optimiser steps (empty samples included), sampling rate, loss."""

    steps: int
    sample_rate: float
    mean_loss: float
    empty_steps: int


def sample_rate(batch_size: int, n_cases: int) -> float:
    """The Poisson sampling rate ``q = batch_size / n_cases`` (at most 1)."""
    if n_cases < 1:
        raise ConfigError("a site needs at least one training case for DP-SGD")
    return min(1.0, batch_size / n_cases)


def steps_per_epoch(batch_size: int, n_cases: int) -> int:
    """Poisson draws per local epoch: ``ceil(1 / q)``."""
    return math.ceil(1.0 / sample_rate(batch_size, n_cases))


def check_dp_compatible(network: Any) -> None:
    """Refuse a network Opacus cannot compute per-sample gradients for (e.g. batch norm).

    Errors: ConfigError naming the offending layers and the fix (model.norm = "instance").
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(network, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:3])
        raise ConfigError(
            f"the model is not compatible with DP-SGD ({listed}); use model.norm = 'instance' "
            "or 'group'"
        )


def train_dp_sgd(
    network: Any,
    dataset: Any,
    *,
    settings: SampleDP,
    batch_size: int,
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    loss_fn: Any,
    device: Any,
    seed: int,
) -> DPSGDResult:
    """Run ``epochs`` local epochs of DP-SGD on ``network`` (in place) over ``dataset``'s cases."""
    import torch
    from opacus import PrivacyEngine

    check_dp_compatible(network)
    n = len(dataset)
    q = sample_rate(batch_size, n)
    expected = max(1, round(q * n))
    steps_total = epochs * steps_per_epoch(batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Opacus draws its noise from torch's default generator
    params = [p for p in network.parameters() if p.requires_grad]
    if optimizer == "adam":
        optim: Any = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    # The loader only tells Opacus the expected batch size; batches are drawn below.
    size_hint: Any = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(n)), batch_size=expected
    )
    with warnings.catch_warnings():
        # "Secure RNG turned off": documented in the module docstring (research runs).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        module, dp_optim, _ = engine.make_private(
            module=network,
            optimizer=optim,
            data_loader=size_hint,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.clip,
            poisson_sampling=False,
            grad_sample_mode="functorch",
        )
    module.train()
    losses: list[float] = []
    with warnings.catch_warnings():
        # The input needs no gradient, so torch notes that full backward hooks fire on outputs:
        # expected with per-sample gradients, and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _loop(
            module,
            dp_optim,
            params,
            dataset,
            steps_total,
            n,
            q,
            generator,
            loss_fn,
            device,
            losses,
        )


def _loop(
    module: Any,
    dp_optim: Any,
    params: list[Any],
    dataset: Any,
    steps_total: int,
    n: int,
    q: float,
    generator: Any,
    loss_fn: Any,
    device: Any,
    losses: list[float],
) -> DPSGDResult:
    import torch
    from monai.data.utils import list_data_collate

    empty = 0
    try:
        for _ in range(steps_total):
            chosen = torch.nonzero(torch.rand(n, generator=generator) < q).flatten().tolist()
            dp_optim.zero_grad(set_to_none=True)
            if not chosen:
                # Noise-only step: per-sample gradients of an empty batch.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
                dp_optim.step()
                empty += 1
                continue
            items = []
            for index in chosen:
                item = dataset[index]
                items.extend(item if isinstance(item, list) else [item])
            if len(items) != len(chosen):
                raise ConfigError(
                    "sample-level DP needs one patch per case per draw: set "
                    "preprocess.samples_per_volume = 1"
                )
            batch = list_data_collate(items)
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            loss = loss_fn(module(image), label)
            loss.backward()
            dp_optim.step()
            losses.append(float(loss.detach()))
    finally:
        module._close()  # remove Opacus' hooks: the network is used without them afterwards
    return DPSGDResult(
        steps=steps_total,
        sample_rate=q,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        empty_steps=empty,
    )
