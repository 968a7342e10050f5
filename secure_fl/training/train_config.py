"""Local training settings of a site (``train.*`` of an experiment configuration).

Besides the optimiser and its schedule, the options that make DP-SGD learn (De et al. 2022):
``trainable`` (fine-tune a subset: :mod:`secure_fl.training.finetune`), ``augment_multiplicity``
(several augmented patches of one patient averaged before clipping), ``ema`` (an exponential
moving average of the weights: :mod:`secure_fl.training.ema`) and ``max_physical_batch`` (large
logical batches through Opacus' BatchMemoryManager). Each is validated here and recorded in the
run's ``config.json`` like every field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secure_fl.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round.

    ``local_epochs`` passes over the site's training cases, capped at ``local_steps`` optimiser steps
    when that is set. ``fedprox_mu`` > 0 adds FedProx's proximal term ``mu/2 * ||w - w_global||^2``.
    ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; ``amp`` uses mixed
    precision on CUDA only. ``lr_schedule="cosine"`` lowers the learning rate from ``lr`` to
    ``lr / 20`` along a cosine over the rounds of the run (constant within a round).

    ``trainable``: parameter-name patterns (named groups such as ``"decoder"``, ``"head"``,
    ``"norm"``, or globs) of the only parameters trained; the rest are frozen before Opacus wraps
    the model, so DP-SGD's dimension ``d`` shrinks (empty: everything trains).
    ``augment_multiplicity`` ``K`` in [1, 64]: each drawn case contributes ``K`` independently
    augmented patches whose gradients are averaged into the case's one gradient (before clipping,
    under DP-SGD: the sensitivity is unchanged; without DP the batch simply holds ``K`` patches
    per case). ``ema`` in (0, 1) or unset: the weights a round returns are the exponential moving
    average of its iterates (post-processing: no privacy cost). ``max_physical_batch`` (DP-SGD
    only, >= 1 or unset): the Poisson batch (expected size ``batch_size``) is processed in chunks
    of at most this many cases (times ``K`` patches), one noisy step per logical batch.
    """

    def lr_for_round(self, round_id: int, rounds: int) -> float:
        """The learning rate of round ``round_id`` of ``rounds``."""
        if self.lr_schedule == "constant" or rounds <= 1:
            return self.lr
        low = self.lr / 20
        progress = min(max(round_id / (rounds - 1), 0.0), 1.0)
        return low + 0.5 * (self.lr - low) * (1 + math.cos(math.pi * progress))

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 2
    fedprox_mu: float = 0.0
    device: str = "auto"
    amp: bool = True
    lr_schedule: str = "cosine"
    trainable: tuple[str, ...] = ()
    augment_multiplicity: int = 1
    ema: float | None = None
    max_physical_batch: int | None = None

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"train.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.local_epochs < 1:
            raise ConfigError(f"train.local_epochs must be >= 1, got {self.local_epochs}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"train.local_steps must be >= 1 or unset, got {self.local_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.fedprox_mu < 0:
            raise ConfigError(f"train.fedprox_mu must be >= 0, got {self.fedprox_mu}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        for i, pattern in enumerate(self.trainable):
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(
                    f"train.trainable[{i}] must be a non-empty parameter-name pattern, got "
                    f"{pattern!r}"
                )
        if len(set(self.trainable)) != len(self.trainable):
            raise ConfigError(f"train.trainable must not repeat a pattern, got {self.trainable}")
        k = self.augment_multiplicity
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
            raise ConfigError(f"train.augment_multiplicity must be an int in [1, 64], got {k!r}")
        if self.ema is not None and not (
            isinstance(self.ema, float | int) and 0.0 < self.ema < 1.0
        ):
            raise ConfigError(f"train.ema must be in (0, 1) or unset, got {self.ema!r}")
        if self.ema is not None:
            object.__setattr__(self, "ema", float(self.ema))
        m = self.max_physical_batch
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"train.max_physical_batch must be an int >= 1 or unset, got {m!r}")
