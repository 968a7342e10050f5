"""The step loop of sample-level DP-SGD (:func:`secure_fl.training.dp_sgd.train_dp_sgd`): Poisson
draws of cases, augmentation multiplicity, physical batches, the EMA of the iterates.

* **Draws** (:class:`PoissonDraws`): each logical step includes each of the site's ``n`` cases
  independently with probability ``q``, from the sampling generator; an empty draw still takes a
  noise-only step. The privacy unit and the accountant's sample rate are per *case* (patient),
  whatever the options below.
* **Augmentation multiplicity** ``K`` (De et al. 2022; :class:`CaseViews`): a drawn case yields
  ``K`` independently augmented patches; the network sees ``b * K`` patches, and before the
  optimiser clips, each case's ``K`` per-patch gradients are averaged into one
  (:func:`average_views`). One patient therefore still contributes exactly one gradient of norm
  at most ``clip``: the sensitivity is unchanged.
* **Physical batches** (``max_physical_batch``): the drawn cases of one logical step go through
  Opacus' ``BatchMemoryManager`` in chunks of at most that many cases; the optimiser clips each
  chunk's per-case gradients into a running sum and adds the noise once, at the logical step's
  last chunk. The accounting (steps, ``q``, divisor ``q * n``) is that of the logical batch.
* **EMA** (:class:`secure_fl.training.ema.WeightEMA`): updated after each logical step; the
  network ends the round holding the average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError
from secure_fl.training.ema import WeightEMA


class PoissonDraws:
    """A batch sampler: ``steps`` Poisson draws (lists of case indices, possibly empty) of ``n``
    cases at rate ``q`` from ``generator``."""

    def __init__(self, n: int, q: float, steps: int, generator: Any) -> None:
        self.n, self.q, self.steps, self.generator = n, q, steps, generator

    def __iter__(self) -> Iterator[list[int]]:
        import torch

        for _ in range(self.steps):
            draw = torch.rand(self.n, generator=self.generator) < self.q
            yield torch.nonzero(draw).flatten().tolist()

    def __len__(self) -> int:
        return self.steps


class CaseViews:
    """``dataset`` with each case read ``k`` times (``k`` augmented patches, in order).

    Errors (on access, with ``one_patch``, as DP-SGD needs): ConfigError when a read yields other
    than one patch (``preprocess.samples_per_volume`` != 1).
    """

    def __init__(self, dataset: Any, k: int, *, one_patch: bool = True) -> None:
        self.dataset, self.k, self.one_patch = dataset, k, one_patch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[Any]:
        views: list[Any] = []
        for _ in range(self.k):
            item = self.dataset[index]
            views.extend(item if isinstance(item, list) else [item])
        if self.one_patch and len(views) != self.k:
            raise ConfigError(
                "sample-level DP needs one patch per case per draw: set "
                "preprocess.samples_per_volume = 1"
            )
        return views


def collate_views(batch: list[list[Any]]) -> dict[str, Any] | None:
    """The cases' patches as one batch (case-major: a case's ``K`` patches are consecutive), or
    None for an empty draw."""
    from monai.data.utils import list_data_collate

    if not batch:
        return None
    return list_data_collate([view for views in batch for view in views])  # type: ignore[no-any-return]


def average_views(params: list[Any], k: int) -> None:
    """Replace each parameter's per-patch gradients ``(b * K, ...)`` by their per-case means
    ``(b, ...)`` (consecutive groups of ``k``), in place, before the optimiser clips.

    Errors: ConfigError when a per-sample gradient's batch size is not a multiple of ``k``.
    """
    import torch

    for p in params:
        gs = p.grad_sample
        if isinstance(gs, list):
            gs = torch.cat(gs, dim=0)
        if gs is None:
            continue
        if gs.shape[0] % k:
            raise ConfigError(
                f"augmentation multiplicity: {gs.shape[0]} per-patch gradients are not {k} per case"
            )
        p.grad_sample = gs.reshape(gs.shape[0] // k, k, *gs.shape[1:]).mean(dim=1)


@dataclass(frozen=True)
class LoopResult:
    """What the loop did: logical (noisy) steps, empty draws, physical batches, mean loss."""

    logical_steps: int
    empty_steps: int
    physical_batches: int
    mean_loss: float


def run_steps(
    module: Any,
    dp_optim: Any,
    params: list[Any],
    dataset: Any,
    draws: PoissonDraws,
    *,
    loss_fn: Any,
    device: Any,
    multiplicity: int,
    max_physical_batch: int | None,
    ema: float | None,
) -> LoopResult:
    """Run every draw of ``draws`` as one noisy step of ``dp_optim`` (module docstring).

    Guarantee: exactly ``len(draws)`` noisy optimiser steps are taken (checked: a mismatch is
    a RuntimeError, never a silently different accounting). Opacus' hooks are removed from
    ``module`` on exit. With ``ema`` the network ends holding the average of its iterates.
    """
    import torch
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader

    loader: Any = DataLoader(
        CaseViews(dataset, multiplicity),  # type: ignore[arg-type]
        batch_sampler=draws,
        collate_fn=collate_views,
        num_workers=0,
    )
    averager = WeightEMA(module, ema) if ema is not None else None
    manager: Any = (
        BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=max_physical_batch, optimizer=dp_optim
        )
        if max_physical_batch is not None
        else contextlib.nullcontext(loader)
    )
    losses: list[float] = []
    logical = empty = physical = 0
    try:
        with manager as batches:
            for batch in batches:
                dp_optim.zero_grad(set_to_none=True)
                physical += 1
                if batch is None:
                    # Noise-only step: per-sample gradients of an empty batch.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
                    empty += 1
                else:
                    image = batch["image"].to(device)
                    label = batch["label"].to(device)
                    loss = loss_fn(module(image), label)
                    loss.backward()
                    if multiplicity > 1:
                        average_views(params, multiplicity)
                    losses.append(float(loss.detach()))
                dp_optim.step()
                if not dp_optim._is_last_step_skipped:
                    logical += 1
                    if averager is not None:
                        averager.update()
    finally:
        module._close()  # remove Opacus' hooks: the network is used without them afterwards
    if logical != len(draws):
        raise RuntimeError(  # pragma: no cover - an invariant of the batch splitting
            f"DP-SGD took {logical} noisy steps, {len(draws)} were accounted"
        )
    if averager is not None:
        averager.copy_to_network()
    return LoopResult(
        logical_steps=logical,
        empty_steps=empty,
        physical_batches=physical,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
    )
