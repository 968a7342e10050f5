"""The site trainer: local training and evaluation of a torch model (the MONAI 3D-UNet by
default) at one institution.

:class:`SiteTrainer` implements MONAI's federated-learning client interface
(``monai.fl.client.ClientAlgo``: ``initialize``, ``train``, ``get_weights``, ``evaluate``), so the same
object plugs into MONAI FL and NVFlare pipelines as well as into this library's strategies. Any
torch model trains through it (``model_factory``, ``loss``, ``metric``), and it applies DP-SGD by
itself when built with ``privacy=PrivacyConfig(level="sample", ...)``
(:mod:`secure_fl.training.site_dp`), whoever drives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from monai.fl.client.client_algo import ClientAlgo
from monai.fl.utils.constants import FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.data import Case, PreprocessConfig, make_dataset, make_loader
from secure_fl.errors import ConfigError
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.training.dp_sgd import SampleDP, train_dp_sgd
from secure_fl.training.evaluation import Metric, dice_per_case
from secure_fl.training.finetune import freeze_except
from secure_fl.training.local_sgd import train_local, views_loader
from secure_fl.training.model import (
    ModelConfig,
    State,
    build_unet,
    derive_seed,
    get_state,
    set_state,
)
from secure_fl.training.site_dp import DPRound, TrainerDP
from secure_fl.training.threads import check_threads, set_torch_threads
from secure_fl.training.train_config import TrainConfig as TrainConfig

#: ``loss(network(image), label) -> scalar tensor`` (default: MONAI's DiceCE, softmax, one-hot).
Loss = Callable[[Any, Any], Any]


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


class SiteTrainer(ClientAlgo):
    """Trains and evaluates a model (the MONAI 3D-UNet by default) on one site's cases.

    ``train(data, extra)`` starts from the weights in ``data`` (an ``ExchangeObject``) and runs the
    local epochs; ``extra`` may carry ``round`` (makes the randomness a function of run seed, site
    and round, so that a resumed run repeats a round exactly), ``rounds`` (the run's length, for
    the learning-rate schedule) and the per-round settings a server sends
    (:func:`secure_fl.transport.tasks.check_round_config`): ``learning_rate`` (replaces the
    schedule's rate for the round), ``local_epochs`` and ``fedprox_mu``.
    ``get_weights()`` returns the full local weights with the number of executed steps (and,
    under DP-SGD, ``dp_steps`` and ``dp_epsilon``: public values).
    ``evaluate(data)`` returns the mean metric over the site's held-out cases as ``val_dice`` (of
    ``data.weights``, which are required under site-level DP: ``private`` without DP-SGD).

    Any torch model: ``model_factory()`` builds a fresh network (default: the UNet of ``model``),
    ``loss`` scores a batch (default DiceCE), ``metric(probs, label)`` scores one held-out case
    (default whole-tumour Dice; :mod:`secure_fl.training.evaluation`). The factory's network
    takes ``(B, 1, *patch)`` images; evaluation slides a ``patch`` window over each volume.

    ``privacy``: ``PrivacyConfig(level="sample", ...)`` makes the trainer run DP-SGD (Opacus) in
    every round by itself, calibrating ``target_epsilon`` over the run's rounds when given (the
    :attr:`rounds` attribute or ``extra["rounds"]``, default 1: set it before the first round)
    and refusing a round over budget (BudgetExceededError); every round's spend is in
    :attr:`dp_rounds` (:meth:`privacy_events`, :meth:`epsilon`) for the caller's ledger.
    ``level="site"`` only marks the trainer private (the noise is added at aggregation). An
    explicitly set :attr:`sample_dp` (the simulated runner's) takes precedence.

    ``threads``: torch's intra-op threads for this process, set at :meth:`initialize` (None: the
    ``SECURE_FL_THREADS`` environment variable, else every usable CPU; see
    :mod:`secure_fl.training.threads`). ``progress``: progress bars for caching, local steps and
    evaluation (None: only when stderr is a terminal; see :mod:`secure_fl.training.progress`);
    under DP (``private`` or ``sample_dp``) the bar never shows the training loss.

    Errors: ConfigError when there are no training cases, ``threads`` is not an int >= 1,
    ``model_factory`` / ``loss`` / ``metric`` is not callable, ``privacy`` is not a
    PrivacyConfig, or sample-level DP is asked with ``samples_per_volume`` != 1.
    """

    def __init__(
        self,
        name: str,
        train_cases: Sequence[Case],
        val_cases: Sequence[Case],
        *,
        preprocess: PreprocessConfig,
        model: ModelConfig | None = None,
        train: TrainConfig,
        seed: int = 0,
        cache: bool = True,
        threads: int | None = None,
        progress: bool | None = None,
        model_factory: Callable[[], Any] | None = None,
        loss: Loss | None = None,
        metric: Metric | None = None,
        privacy: PrivacyConfig | None = None,
    ) -> None:
        if not train_cases:
            raise ConfigError(f"site {name!r} has no training cases")
        for label, fn in (("model_factory", model_factory), ("loss", loss), ("metric", metric)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{label} must be callable or None, got {type(fn).__name__}")
        if privacy is not None and not isinstance(privacy, PrivacyConfig):
            raise ConfigError(f"privacy must be a PrivacyConfig, got {type(privacy).__name__}")
        model = model if model is not None else ModelConfig()
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
        self.model_factory: Callable[[], Any] = model_factory or (lambda: build_unet(model))
        self.loss = loss
        self.metric = metric
        self.privacy = privacy
        self._initialized = False
        self.rounds = 1  # the run's number of rounds, for the learning-rate schedule
        #: Sample-level DP-SGD settings (None: ordinary training, or the trainer's own DP from
        #: ``privacy``). Set by the simulated runner.
        self.sample_dp: SampleDP | None = None
        #: DP-SGD run by the trainer itself from ``privacy`` (None without sample-level DP).
        self.own_dp = (
            TrainerDP(privacy, samples_per_volume=preprocess.samples_per_volume)
            if privacy is not None and privacy.level == "sample"
            else None
        )
        #: True when the run is under DP (any level; set by the runner, or by ``privacy``):
        #: get_weights then releases no statistic computed on the training patients without
        #: noise (no training loss).
        self.private = privacy is not None and privacy.enabled
        self.last_sample_rate = 1.0
        self.last_lr = float("nan")  # the learning rate of the last round trained
        self.last_loss = float("nan")
        self.last_steps = 0
        self.last_dp: DPRound | None = None  # the trainer's own DP record of the last round

    @property
    def sample_level(self) -> bool:
        """True when training runs DP-SGD (set by the runner, or from ``privacy``)."""
        return self.sample_dp is not None or self.own_dp is not None

    @property
    def dp_rounds(self) -> list[DPRound]:
        """What each round of the trainer's own DP-SGD spent, in order (empty without it)."""
        return list(self.own_dp.rounds_log) if self.own_dp is not None else []

    def privacy_events(self) -> list[Any]:
        """:attr:`dp_rounds` as accountant events (``secure_fl.privacy.PrivacyEvent``), for the
        caller's ledger or its own accounting."""
        return self.own_dp.events() if self.own_dp is not None else []

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent by this site's patients through the trainer's own DP-SGD (0.0 before
        any round). Errors: ConfigError when the trainer has no sample-level ``privacy``."""
        if self.own_dp is None:
            raise ConfigError("epsilon: this trainer was not built with sample-level privacy")
        return self.own_dp.epsilon(delta)

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
        self.network = self.model_factory().to(self.device)
        #: DP-SGD's dimension d: the trainable scalars (``train.trainable``; frozen before Opacus).
        self.dp_dimension = freeze_except(self.network, self.train_config.trainable)
        default_loss: Any = DiceCELoss(to_onehot_y=True, softmax=True)
        self.loss_fn: Any = self.loss if self.loss is not None else default_loss
        self._initialized = True

    @property
    def num_train_cases(self) -> int:
        """The FedAvg weight of this site: its number of training cases."""
        return len(self.train_cases)

    def train(self, data: ExchangeObject, extra: dict[str, Any] | None = None) -> None:
        """Train from ``data.weights`` for the round's local epochs (class docstring).

        Errors: ConfigError for a bad per-round setting (naming ``round_config.<key>``) or FedProx
        with DP-SGD; BudgetExceededError (before anything runs) when the trainer's own DP-SGD
        would exceed ``target_epsilon`` or ``site_budget``.
        """
        import torch

        from secure_fl.transport.tasks import ROUND_CONFIG_KEYS, check_round_config

        self.initialize()
        extra = extra or {}
        settings = check_round_config({k: extra[k] for k in ROUND_CONFIG_KEYS if k in extra})
        cfg = self.train_config
        if "local_epochs" in settings:
            cfg = dataclasses.replace(cfg, local_epochs=settings["local_epochs"])
        round_id = int(extra.get("round", 0))
        rounds = int(extra.get("rounds", self.rounds))
        lr = settings.get("learning_rate", cfg.lr_for_round(round_id, rounds))
        self.last_lr = lr
        tag = extra.get("tag", "")
        mu = settings.get("fedprox_mu", cfg.fedprox_mu)
        dp = self.sample_dp
        if dp is None and self.own_dp is not None:
            shape = {"batch_size": cfg.batch_size, "n_cases": len(self.train_ds)}
            dp = self.own_dp.settings(**shape, epochs=cfg.local_epochs, rounds=rounds)
            self.own_dp.check_budget(self.own_dp.planned_event(**shape, epochs=cfg.local_epochs))
        if data.weights is not None:
            set_state(self.network, data.weights)
        seed = derive_seed(self.seed, "train", tag, self.name, round_id)
        torch.manual_seed(seed)
        transform = getattr(self.train_ds, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        if dp is not None:
            if mu > 0:
                raise ConfigError("FedProx's proximal term is not supported with DP-SGD")
            result = train_dp_sgd(
                self.network,
                self.train_ds,
                settings=dp,
                batch_size=cfg.batch_size,
                epochs=cfg.local_epochs,
                lr=lr,
                optimizer=cfg.optimizer,
                weight_decay=cfg.weight_decay,
                loss_fn=self.loss_fn,
                device=self.device,
                seed=seed,
                augment_multiplicity=cfg.augment_multiplicity,
                max_physical_batch=cfg.max_physical_batch,
                ema=cfg.ema,
            )
            self.last_steps = result.steps
            self.last_loss = result.mean_loss
            self.last_sample_rate = result.sample_rate
            if self.sample_dp is None and self.own_dp is not None:
                self.last_dp = self.own_dp.record(round_id, result.steps, result.sample_rate, dp)
            return
        loader = (
            make_loader(self.train_ds, batch_size=cfg.batch_size, shuffle=True, seed=seed)
            if cfg.augment_multiplicity == 1
            else views_loader(self.train_ds, cfg.augment_multiplicity, cfg.batch_size, seed)
        )
        self.last_steps, self.last_loss = train_local(
            self.network,
            loader,
            optimizer=cfg.optimizer,
            lr=lr,
            weight_decay=cfg.weight_decay,
            epochs=cfg.local_epochs,
            max_steps=cfg.local_steps,
            fedprox_mu=mu,
            amp=cfg.amp,
            loss_fn=self.loss_fn,
            device=self.device,
            desc=f"{self.name}: train round {round_id + 1}",
            progress=self.progress,
            show_loss=not (self.private or self.sample_level),  # never un-noised under DP
            ema=cfg.ema,
        )

    def get_weights(self, extra: dict[str, Any] | None = None) -> ExchangeObject:
        """The local weights and statistics: executed steps, training cases, the training loss
        (never under DP), and with the trainer's own DP-SGD ``dp_steps`` (last round) and
        ``dp_epsilon`` (spent so far, at ``privacy.delta``)."""
        self.initialize()
        statistics: dict[str, Any] = {
            FlStatistics.NUM_EXECUTED_ITERATIONS: self.last_steps,
            "num_train_cases": self.num_train_cases,
        }
        if not (self.private or self.sample_level):  # un-noised: never under DP
            statistics["train_loss"] = self.last_loss
        if self.own_dp is not None and self.last_dp is not None:
            statistics["dp_steps"] = self.last_dp.steps
            statistics["dp_epsilon"] = self.own_dp.epsilon()
        return ExchangeObject(
            weights=get_state(self.network), weight_type=WeightType.WEIGHTS, statistics=statistics
        )

    def evaluate(self, data: ExchangeObject, extra: dict[str, Any] | None = None) -> ExchangeObject:
        """Mean metric (``val_dice``) and per-case scores of ``data.weights`` (or the local
        model) on the held-out cases. Errors: ConfigError under site-level DP without weights."""
        self.initialize()
        if data.weights is None and self.private and not self.sample_level:
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
        """The metric (Dice by default) per held-out case of the ensemble of ``states`` (one
        state: that model alone); [] without held-out cases."""
        self.initialize()
        if self.val_ds is None:
            return []
        return dice_per_case(
            self.val_ds,
            states,
            model_factory=self.model_factory,
            metric=self.metric,
            roi_size=self.preprocess.patch,
            device=self.device,
            progress=self.progress,
            progress_desc=f"{self.name}: Dice",
        )
