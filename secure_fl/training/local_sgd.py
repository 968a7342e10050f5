"""The ordinary (non-DP) local training loop of :class:`~secure_fl.training.trainer.SiteTrainer`:
Adam or SGD with momentum, optional FedProx term, mixed precision on CUDA, optional EMA of the
weights (:mod:`secure_fl.training.ema`) and several augmented patches per case
(:func:`views_loader`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from secure_fl.training.dp_loop import CaseViews, collate_views
from secure_fl.training.ema import WeightEMA
from secure_fl.training.progress import Progress


def train_local(
    network: Any,
    loader: Any,
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    epochs: int,
    max_steps: int | None,
    fedprox_mu: float,
    amp: bool,
    loss_fn: Any,
    device: Any,
    desc: str,
    progress: bool | None,
    show_loss: bool,
    ema: float | None = None,
) -> tuple[int, float]:
    """Train ``network`` in place for ``epochs`` passes over ``loader`` (at most ``max_steps``
    optimiser steps when set) and return ``(steps, mean training loss)`` (NaN without steps).

    ``fedprox_mu`` > 0 adds ``mu/2 * ||w - w_start||^2`` to the loss (FedProx); ``amp`` uses mixed
    precision when ``device`` is CUDA. The progress bar (``desc``) shows the running loss only
    when ``show_loss`` (never under DP). The caller seeds torch and the loader beforehand. Only
    parameters with ``requires_grad`` train; with ``ema`` the network ends holding the moving
    average of its iterates (:class:`secure_fl.training.ema.WeightEMA`).
    """
    import torch

    params = [p for p in network.parameters() if p.requires_grad]
    averager = WeightEMA(network, ema) if ema is not None else None
    anchor = [p.detach().clone() for p in params] if fedprox_mu > 0 else None
    if optimizer == "adam":
        optim: Any = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    network.train()
    steps, losses = 0, []
    total = epochs * len(loader)
    if max_steps is not None:
        total = min(total, max_steps)
    bar = Progress(total=total, desc=desc, unit="step", enabled=progress)
    with bar:
        for _ in range(epochs):
            for batch in loader:
                image = batch["image"].to(device)
                label = batch["label"].to(device)
                optim.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=use_amp):
                    loss = loss_fn(network(image), label)
                    if anchor is not None:
                        prox = sum(
                            ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                        )
                        loss = loss + 0.5 * fedprox_mu * prox
                scaler.scale(loss).backward()
                scaler.step(optim)
                scaler.update()
                if averager is not None:
                    averager.update()
                losses.append(float(loss.detach()))
                steps += 1
                if show_loss:
                    bar.update(loss=losses[-1])
                else:
                    bar.update()
                if max_steps is not None and steps >= max_steps:
                    break
            if max_steps is not None and steps >= max_steps:
                break
    if averager is not None:
        averager.copy_to_network()
    return steps, float(np.mean(losses)) if losses else float("nan")


def views_loader(dataset: Any, k: int, batch_size: int, seed: int) -> Any:
    """A shuffled loader of ``batch_size`` cases per batch, each case read ``k`` times (``k``
    independently augmented patches: :class:`secure_fl.training.dp_loop.CaseViews`), the case
    order seeded by ``seed`` as :func:`secure_fl.data.make_loader`'s."""
    import torch
    from monai.data.dataloader import DataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        CaseViews(dataset, k, one_patch=False),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate_views,
    )
