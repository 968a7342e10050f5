"""The 3D-UNet trainer as a task of the gRPC federation (``secure-fl site``).

In a site's config::

    "task": {"kind": "python", "factory": "secure_fl.training.remote:unet_site_task",
             "options": {"datalist": "/data/site-a.json", "grid": [48, 48, 48],
                         "patch": [32, 32, 32], "channels": [16, 32, 64, 128]}}

and the server's initial model written by :func:`write_initial_model` with the same ``channels``
(``secure-fl`` sites and server must agree on the architecture; the tensor names and shapes are
checked on every round). The site trains its own cases (those of its datalist whose ``site`` is the
site's name, or every case when none matches) from the global model and returns the model delta,
weighted by its number of training cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.data import PreprocessConfig, load_datalist, split_by_site
from secure_fl.data.checks import default_workers, require_valid
from secure_fl.errors import ConfigError
from secure_fl.training.model import ModelConfig, build_unet, derive_seed, get_state
from secure_fl.training.threads import check_threads, set_torch_threads
from secure_fl.training.trainer import SiteTrainer, TrainConfig


class UNetSiteTask:
    """A :class:`secure_fl.transport.tasks.SiteTask` that trains the 3D-UNet locally each round."""

    def __init__(self, trainer: SiteTrainer, rounds: int) -> None:
        self.trainer = trainer
        self.trainer.rounds = rounds

    def compute_update(self, global_model: Mapping[str, np.ndarray], round_id: int) -> Any:
        from secure_fl.transport.tasks import TaskResult

        weights = {k: np.asarray(v, dtype=np.float32) for k, v in global_model.items()}
        self.trainer.train(
            ExchangeObject(weights=weights),
            {"round": round_id, "rounds": self.trainer.rounds, "tag": "grpc"},
        )
        local = self.trainer.get_weights().weights
        assert local is not None
        update = {k: (local[k] - weights[k]).astype(global_model[k].dtype) for k in global_model}
        metrics = {"train_loss": self.trainer.last_loss, "steps": float(self.trainer.last_steps)}
        return TaskResult(
            update=update, weight=float(self.trainer.num_train_cases), metrics=metrics
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
) -> UNetSiteTask:
    """Build the training task of ``site_name`` (the factory named in a site's task config).

    ``threads``: torch's CPU threads in this site process, set here, at process start (default:
    the ``SECURE_FL_THREADS`` environment variable, else the CPUs this process may use, i.e. its
    affinity capped by a cgroup quota; :mod:`secure_fl.training.threads`). When several site
    processes share one machine, give each ``usable CPUs // sites`` (or pin each to its own cores
    with ``taskset``, which the default follows). ``progress``: progress bars on stderr (default:
    only when stderr is a terminal).

    Errors: ConfigError when the datalist is missing or holds no case for the site, or
    ``threads`` is not an integer >= 1; DataError (every bad case, with its file and reason) when
    one of the site's scans is unreadable or unfit.
    """
    set_torch_threads(check_threads(threads, "task.options.threads"), who=f"site {site_name}")
    path = Path(datalist)
    if not path.is_file():
        raise ConfigError(f"task.options.datalist: file not found: {path}")
    cases = load_datalist(path)
    mine = [c for c in cases if c.site == site_name] or cases
    require_valid(mine, label_values=None, workers=default_workers())  # DataError names bad scans
    train, val = split_by_site(
        [c.__class__(c.case_id, site_name, c.image, c.label, c.brainmask) for c in mine],
        val_fraction=val_fraction,
        seed=seed,
    )[site_name]
    trainer = SiteTrainer(
        site_name,
        train,
        val,
        preprocess=PreprocessConfig(grid=tuple(grid), patch=tuple(patch)),  # type: ignore[arg-type]
        model=ModelConfig(channels=tuple(channels)),
        train=TrainConfig(lr=lr, local_epochs=local_epochs, batch_size=batch_size, device=device),
        seed=seed,
        threads=threads,
        progress=progress,
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
