"""The site trainer: local training and evaluation of the 3D-UNet at one institution.

:class:`SiteTrainer` implements MONAI's federated-learning client interface
(``monai.fl.client.ClientAlgo``: ``initialize``, ``train``, ``get_weights``, ``evaluate``), so the same
object plugs into MONAI FL and NVFlare pipelines as well as into this library's strategies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.fl.client.client_algo import ClientAlgo
from monai.fl.utils.constants import FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.data import Case, PreprocessConfig, make_dataset, make_loader
from secure_fl.errors import ConfigError
from secure_fl.training.dp_sgd import SampleDP, train_dp_sgd
from secure_fl.training.evaluation import dice_per_case
from secure_fl.training.model import (
    ModelConfig,
    State,
    build_unet,
    derive_seed,
    get_state,
    set_state,
)
from secure_fl.training.progress import Progress
from secure_fl.training.threads import check_threads, set_torch_threads


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round.

    ``local_epochs`` passes over the site's training cases, capped at ``local_steps`` optimiser steps
    when that is set. ``fedprox_mu`` > 0 adds FedProx's proximal term ``mu/2 * ||w - w_global||^2``.
    ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; ``amp`` uses mixed
    precision on CUDA only. ``lr_schedule="cosine"`` lowers the learning rate from ``lr`` to
    ``lr / 20`` along a cosine over the rounds of the run (constant within a round).
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


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


class SiteTrainer(ClientAlgo):
    """Trains and evaluates the 3D-UNet on one site's cases.

    ``train(data, extra)`` starts from the weights in ``data`` (an ``ExchangeObject``) and runs the
    local epochs; ``extra`` may carry ``round`` (makes the randomness a function of run seed, site
    and round, so that a resumed run repeats a round exactly), ``rounds`` (the run's length, for
    the learning-rate schedule) and ``fedprox_mu``.
    ``get_weights()`` returns the full local weights with the number of executed steps.
    ``evaluate(data)`` returns the mean Dice over the site's held-out cases (of ``data.weights``,
    which are required under site-level DP: ``private`` without ``sample_dp``).

    ``threads``: torch's intra-op threads for this process, set at :meth:`initialize` (None: the
    ``SECURE_FL_THREADS`` environment variable, else every usable CPU; see
    :mod:`secure_fl.training.threads`). ``progress``: progress bars for caching, local steps and
    evaluation (None: only when stderr is a terminal; see :mod:`secure_fl.training.progress`);
    under DP (``private`` or ``sample_dp``) the bar never shows the training loss.

    Errors: ConfigError when there are no training cases or ``threads`` is not an int >= 1.
    """

    def __init__(
        self,
        name: str,
        train_cases: Sequence[Case],
        val_cases: Sequence[Case],
        *,
        preprocess: PreprocessConfig,
        model: ModelConfig,
        train: TrainConfig,
        seed: int = 0,
        cache: bool = True,
        threads: int | None = None,
        progress: bool | None = None,
    ) -> None:
        if not train_cases:
            raise ConfigError(f"site {name!r} has no training cases")
        self.threads = check_threads(threads)
        #: Progress bars: True/False, or None for "only when stderr is a terminal".
        self.progress = progress
        self.name = name
        self.train_cases = list(train_cases)
        self.val_cases = list(val_cases)
        self.preprocess = preprocess
        self.model_config = model
        self.train_config = train
        self.seed = seed
        self.cache = cache
        self._initialized = False
        self.rounds = 1  # the run's number of rounds, for the learning-rate schedule
        #: Sample-level DP-SGD settings (None: ordinary training). Set by the runner.
        self.sample_dp: SampleDP | None = None
        #: True when the run is under DP (any level; set by the runner): get_weights then releases
        #: no statistic computed on the training patients without noise (no training loss).
        self.private = False
        self.last_sample_rate = 1.0
        self.last_lr = float("nan")  # the learning rate of the last round trained
        self.last_loss = float("nan")
        self.last_steps = 0

    # -- ClientAlgo ------------------------------------------------------------------------

    def initialize(self, extra: dict[str, Any] | None = None) -> None:
        """Build the datasets (cached after the deterministic transforms), the network and loss."""
        if self._initialized:
            return
        import torch
        from monai.losses.dice import DiceCELoss

        set_torch_threads(self.threads, who=f"site {self.name}")
        self.device = resolve_device(self.train_config.device)
        self.train_ds = make_dataset(
            self.train_cases,
            self.preprocess,
            train=True,
            cache=self.cache,
            progress=self.progress,
            progress_desc=f"{self.name}: caching training cases",
        )
        self.val_ds = (
            make_dataset(
                self.val_cases,
                self.preprocess,
                train=False,
                cache=self.cache,
                progress=self.progress,
                progress_desc=f"{self.name}: caching held-out cases",
            )
            if self.val_cases
            else None
        )
        torch.manual_seed(derive_seed(self.seed, "init", self.name))
        self.network = build_unet(self.model_config).to(self.device)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self._initialized = True

    @property
    def num_train_cases(self) -> int:
        """The FedAvg weight of this site: its number of training cases."""
        return len(self.train_cases)

    def train(self, data: ExchangeObject, extra: dict[str, Any] | None = None) -> None:
        import torch

        self.initialize()
        extra = extra or {}
        cfg = self.train_config
        round_id = int(extra.get("round", 0))
        lr = cfg.lr_for_round(round_id, int(extra.get("rounds", self.rounds)))
        self.last_lr = lr
        tag = extra.get("tag", "")
        mu = float(extra.get("fedprox_mu", cfg.fedprox_mu))
        if data.weights is not None:
            set_state(self.network, data.weights)
        seed = derive_seed(self.seed, "train", tag, self.name, round_id)
        torch.manual_seed(seed)
        transform = getattr(self.train_ds, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        if self.sample_dp is not None:
            if mu > 0:
                raise ConfigError("FedProx's proximal term is not supported with DP-SGD")
            result = train_dp_sgd(
                self.network,
                self.train_ds,
                settings=self.sample_dp,
                batch_size=cfg.batch_size,
                epochs=cfg.local_epochs,
                lr=lr,
                optimizer=cfg.optimizer,
                weight_decay=cfg.weight_decay,
                loss_fn=self.loss_fn,
                device=self.device,
                seed=seed,
            )
            self.last_steps = result.steps
            self.last_loss = result.mean_loss
            self.last_sample_rate = result.sample_rate
            return
        loader = make_loader(self.train_ds, batch_size=cfg.batch_size, shuffle=True, seed=seed)
        params = list(self.network.parameters())
        anchor = [p.detach().clone() for p in params] if mu > 0 else None
        if cfg.optimizer == "adam":
            optim: Any = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            optim = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
        use_amp = cfg.amp and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.network.train()
        steps, losses = 0, []
        total = cfg.local_epochs * len(loader)
        if cfg.local_steps is not None:
            total = min(total, cfg.local_steps)
        show_loss = not (self.private or self.sample_dp is not None)  # never un-noised under DP
        bar = Progress(
            total=total,
            desc=f"{self.name}: train round {round_id + 1}",
            unit="step",
            enabled=self.progress,
        )
        with bar:
            for _ in range(cfg.local_epochs):
                for batch in loader:
                    image = batch["image"].to(self.device)
                    label = batch["label"].to(self.device)
                    optim.zero_grad(set_to_none=True)
                    with torch.autocast(self.device.type, enabled=use_amp):
                        loss = self.loss_fn(self.network(image), label)
                        if anchor is not None:
                            prox = sum(
                                ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                            )
                            loss = loss + 0.5 * mu * prox
                    scaler.scale(loss).backward()
                    scaler.step(optim)
                    scaler.update()
                    losses.append(float(loss.detach()))
                    steps += 1
                    if show_loss:
                        bar.update(loss=losses[-1])
                    else:
                        bar.update()
                    if cfg.local_steps is not None and steps >= cfg.local_steps:
                        break
                if cfg.local_steps is not None and steps >= cfg.local_steps:
                    break
        self.last_steps = steps
        self.last_loss = float(np.mean(losses)) if losses else float("nan")

    def get_weights(self, extra: dict[str, Any] | None = None) -> ExchangeObject:
        self.initialize()
        statistics: dict[str, Any] = {
            FlStatistics.NUM_EXECUTED_ITERATIONS: self.last_steps,
            "num_train_cases": self.num_train_cases,
        }
        if not (self.private or self.sample_dp is not None):  # un-noised: never under DP
            statistics["train_loss"] = self.last_loss
        return ExchangeObject(
            weights=get_state(self.network), weight_type=WeightType.WEIGHTS, statistics=statistics
        )

    def evaluate(self, data: ExchangeObject, extra: dict[str, Any] | None = None) -> ExchangeObject:
        self.initialize()
        if data.weights is None and self.private and self.sample_dp is None:
            # Site-level DP releases only the noised aggregate: the local model is not released,
            # so neither is its Dice.
            raise ConfigError(
                "evaluate: under site-level DP the local model is not released; pass the "
                "released (global) weights in data.weights"
            )
        if data.weights is not None:
            set_state(self.network, data.weights)
        scores = self.dice([get_state(self.network)])
        mean = float(np.nanmean(scores)) if scores else float("nan")
        return ExchangeObject(metrics={"val_dice": mean, "per_case": scores})

    def get_data_stats(self, extra: dict[str, Any] | None = None) -> ExchangeObject:
        return ExchangeObject(
            statistics={
                FlStatistics.TOTAL_DATA: {
                    "train": len(self.train_cases),
                    "val": len(self.val_cases),
                }
            }
        )

    # -- helpers ---------------------------------------------------------------------------

    def dice(self, states: Sequence[State]) -> list[float]:
        """Dice per held-out case of the ensemble of ``states`` (one state: that model alone)."""
        self.initialize()
        if self.val_ds is None:
            return []
        return dice_per_case(
            self.val_ds,
            states,
            model_config=self.model_config,
            roi_size=self.preprocess.patch,
            device=self.device,
            progress=self.progress,
            progress_desc=f"{self.name}: Dice",
        )
