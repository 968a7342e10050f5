"""The 3D-UNet trainer as a task of the gRPC federation (``secure-fl site``).

In a site's config::

    "task": {"kind": "python", "factory": "secure_fl.training.remote:unet_site_task",
             "options": {"datalist": "/data/site-a.json", "grid": [48, 48, 48],
                         "patch": [32, 32, 32], "channels": [16, 32, 64, 128]}}

and the server's initial model written by :func:`write_initial_model` with the same ``channels``
(``secure-fl`` sites and server must agree on the architecture; the tensor names and shapes are
checked on every round). The site trains its own cases (those of its datalist whose ``site`` is the
site's name, or every case when none matches) from the global model and returns the model delta,
weighted by its number of training cases, with the server's per-round settings applied
(``learning_rate``, ``local_epochs``, ``fedprox_mu``). Before training it scores the received
global model on its validation cases (``val_fraction`` > 0) and returns ``metrics={"dice": ...}``
with ``metric_samples`` = the number of validation cases; these are sent to the server. The
training loss is never sent (it stays in ``trainer.last_loss`` for the site's own log).
``privacy = {level = "sample", ...}`` (a :class:`~secure_fl.privacy.PrivacyConfig` table) makes the
trainer run DP-SGD by itself; its per-round spend is in ``task.trainer.dp_rounds``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.data import PreprocessConfig, load_datalist, split_by_site
from secure_fl.data.checks import default_workers, require_valid
from secure_fl.errors import ConfigError
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.training.model import ModelConfig, build_unet, derive_seed, get_state
from secure_fl.training.threads import check_threads, set_torch_threads
from secure_fl.training.trainer import SiteTrainer, TrainConfig


class UNetSiteTask:
    """A :class:`secure_fl.transport.tasks.SiteTask` that trains a :class:`SiteTrainer` (the
    3D-UNet by default) locally each round (module docstring)."""

    def __init__(self, trainer: SiteTrainer, rounds: int) -> None:
        self.trainer = trainer
        self.trainer.rounds = rounds

    def compute_update(
        self,
        global_model: Mapping[str, np.ndarray],
        round_id: int,
        round_config: Mapping[str, Any] | None = None,
    ) -> Any:
        """Score the received model on the validation cases, train from it with the round's
        settings, return the delta, the weight and ``{"dice": ...}`` (when there are validation
        cases). Errors: ConfigError for a bad ``round_config`` (naming the key and the allowed
        keys or range); BudgetExceededError when the trainer's own DP budget refuses the round.
        """
        from secure_fl.transport.tasks import TaskResult, check_round_config

        settings = check_round_config(round_config)
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in global_model.items()}
        scores = self.trainer.dice([weights])  # the released global model: public to score
        metrics = {"dice": float(np.mean(scores))} if scores else {}
        self.trainer.train(
            ExchangeObject(weights=weights),
            {"round": round_id, "rounds": self.trainer.rounds, "tag": "grpc", **settings},
        )
        local = self.trainer.get_weights().weights
        if local is None:  # pragma: no cover - get_weights always returns the weights
            raise ConfigError("the trainer returned no weights")
        update = {k: (local[k] - weights[k]).astype(global_model[k].dtype) for k in global_model}
        return TaskResult(
            update=update,
            weight=float(self.trainer.num_train_cases),
            metrics=metrics,
            metric_samples=len(scores),
        )


def unet_site_task(
    site_name: str,
    *,
    datalist: str,
    grid: Sequence[int] = (48, 48, 48),
    patch: Sequence[int] = (32, 32, 32),
    channels: Sequence[int] = (16, 32, 64, 128),
    lr: float = 3e-3,
    local_epochs: int = 1,
    batch_size: int = 2,
    rounds: int = 10,
    val_fraction: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    progress: bool | None = None,
    fedprox_mu: float = 0.0,
    privacy: Mapping[str, Any] | None = None,
) -> UNetSiteTask:
    """Build the training task of ``site_name`` (the factory named in a site's task config).

    ``threads``: torch's CPU threads in this site process, set here, at process start (default:
    the ``SECURE_FL_THREADS`` environment variable, else the CPUs this process may use, i.e. its
    affinity capped by a cgroup quota; :mod:`secure_fl.training.threads`). When several site
    processes share one machine, give each ``usable CPUs // sites`` (or pin each to its own cores
    with ``taskset``, which the default follows). ``progress``: progress bars on stderr (default:
    only when stderr is a terminal). ``val_fraction``: the share of the site's cases kept for
    validation (the Dice sent to the server; 0: no metrics). ``privacy``: a PrivacyConfig table;
    with ``level = "sample"`` the trainer runs DP-SGD by itself (one patch per case per draw).

    Errors: ConfigError when the datalist is missing or holds no case for the site, ``threads``
    is not an integer >= 1, or ``privacy`` is not a valid PrivacyConfig table; DataError (every bad case, with its file and reason) when
    one of the site's scans is unreadable or unfit.
    """
    set_torch_threads(check_threads(threads, "task.options.threads"), who=f"site {site_name}")
    if privacy is not None and not isinstance(privacy, Mapping):
        raise ConfigError(f"task.options.privacy must be a table, got {type(privacy).__name__}")
    try:
        dp = PrivacyConfig(**dict(privacy)) if privacy is not None else None
    except TypeError as exc:
        raise ConfigError(f"task.options.privacy: {exc}") from exc
    sample_level = dp is not None and dp.level == "sample"
    path = Path(datalist)
    if not path.is_file():
        raise ConfigError(f"task.options.datalist: file not found: {path}")
    cases = load_datalist(path)
    mine = [c for c in cases if c.site == site_name] or cases
    require_valid(mine, label_values=None, workers=default_workers())  # DataError names bad scans
    train, val = split_by_site(
        [dataclasses.replace(c, site=site_name) for c in mine],
        val_fraction=val_fraction,
        seed=seed,
    )[site_name]
    trainer = SiteTrainer(
        site_name,
        train,
        val,
        preprocess=PreprocessConfig(
            grid=tuple(grid),  # type: ignore[arg-type]
            patch=tuple(patch),  # type: ignore[arg-type]
            samples_per_volume=1 if sample_level else 2,
        ),
        model=ModelConfig(channels=tuple(channels)),
        train=TrainConfig(
            lr=lr,
            local_epochs=local_epochs,
            batch_size=batch_size,
            device=device,
            fedprox_mu=fedprox_mu,
        ),
        seed=seed,
        threads=threads,
        progress=progress,
        privacy=dp,
    )
    return UNetSiteTask(trainer, rounds)


def initial_model(
    channels: Sequence[int] = (16, 32, 64, 128), seed: int = 0
) -> dict[str, np.ndarray]:
    """The initial global 3D-UNet weights (float tensors, in the model's order)."""
    import torch

    torch.manual_seed(derive_seed(seed, "initial-model"))
    return get_state(build_unet(ModelConfig(channels=tuple(channels))))


def write_initial_model(
    path: str | Path, channels: Sequence[int] = (16, 32, 64, 128), seed: int = 0
) -> Path:
    """Write :func:`initial_model` as the server's ``model.path`` tensors file."""
    from secure_fl.transport.tensors import dumps

    out = Path(path)
    out.write_bytes(dumps(initial_model(channels, seed)))
    return out
