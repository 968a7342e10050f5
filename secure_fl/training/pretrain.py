"""Public pretraining for DP fine-tuning: train the experiment's model, without DP, on a
designated *public* synthetic cohort and save a checkpoint for ``model.pretrained``.

The public cohort is a synthetic federation of its own (:func:`public_cohort`): generated from
``data.synthetic_seed + PUBLIC_SEED_OFFSET``, so its institutions (scanner profiles) and patients
are distinct from every private site of the experiment, like a public dataset from other
hospitals. Nothing of the private sites is read, so the checkpoint costs their patients no
privacy; fine-tuning it under DP (``train.trainable``) then needs far fewer trainable parameters.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError

if TYPE_CHECKING:
    from secure_fl.training.config import ExperimentConfig

#: Added to ``data.synthetic_seed`` for the public cohort (no private site shares its seed).
PUBLIC_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` wrote: the checkpoint, the public cohort's datalist, its number of
    cases, the epochs run, the final training loss and the wall time in seconds."""

    checkpoint: Path
    datalist: Path
    cases: int
    epochs: int
    loss: float
    seconds: float


def public_cohort(
    config: ExperimentConfig, out_dir: str | Path, *, cases: int, sites: int = 2
) -> Path:
    """Generate (or reuse) the public synthetic cohort of ``config`` (an ExperimentConfig) under
    ``out_dir``: ``sites`` public institutions of ``ceil(cases / sites)`` cases each, at the
    experiment's ``data.synthetic_shape``; returns its datalist path.

    Errors: ConfigError for counts out of range or an ``out_dir`` holding something else.
    """
    from secure_fl.data import generate_federation

    if isinstance(cases, bool) or not isinstance(cases, int) or not 1 <= cases <= 10_000:
        raise ConfigError(f"pretrain: cases must be an int in [1, 10000], got {cases!r}")
    data = config.data
    per_site = -(-cases // sites)
    return generate_federation(
        Path(out_dir),
        sites=sites,
        cases_per_site=per_site,
        shape=data.synthetic_shape,
        seed=data.synthetic_seed + PUBLIC_SEED_OFFSET,
    )


def pretrain(
    config: ExperimentConfig,
    out: str | Path,
    *,
    public_dir: str | Path | None = None,
    cases: int = 32,
    epochs: int = 20,
    threads: int | None = None,
) -> PretrainResult:
    """Pretrain ``config``'s model (an ExperimentConfig: ``model``, ``preprocess``, ``train``'s
    optimiser, lr and batch size) without DP on the public cohort (:func:`public_cohort`, under
    ``public_dir``, default ``<out's folder>/public-cohort``) for ``epochs`` epochs, and write
    its weights to ``out`` as a state dict (``name -> tensor``, loadable as
    ``model.pretrained``).

    Guarantee: reads no private site; the checkpoint's keys are exactly the model's floating-point
    state (every parameter trains: ``train.trainable``, ``ema`` and ``model.pretrained`` of
    ``config`` are ignored here). Deterministic in ``config.seed``.
    Errors: ConfigError for ``epochs`` not in [1, 10000] or a bad cohort size.
    """
    import torch
    from monai.fl.utils.exchange_object import ExchangeObject

    from secure_fl.data import load_datalist
    from secure_fl.training.model import get_state
    from secure_fl.training.trainer import SiteTrainer

    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 10_000:
        raise ConfigError(f"pretrain: epochs must be an int in [1, 10000], got {epochs!r}")
    t0 = time.perf_counter()
    target = Path(out)
    folder = Path(public_dir) if public_dir is not None else target.parent / "public-cohort"
    datalist = public_cohort(config, folder, cases=cases)
    public = load_datalist(datalist)
    cfg = config
    train = dataclasses.replace(
        cfg.train,
        trainable=(),
        ema=None,
        augment_multiplicity=1,
        local_epochs=epochs,
        local_steps=None,
        lr_schedule="constant",
    )
    model = dataclasses.replace(cfg.model, pretrained=None)
    trainer = SiteTrainer(
        "public",
        public,
        [],
        preprocess=cfg.preprocess,
        model=model,
        train=train,
        seed=cfg.seed,
        threads=threads,
        progress=False,
    )
    trainer.train(ExchangeObject(weights=None), extra={"round": 0, "rounds": 1, "tag": "public"})
    state = {k: torch.from_numpy(v) for k, v in get_state(trainer.network).items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, buf.getvalue())
    return PretrainResult(
        checkpoint=target,
        datalist=datalist,
        cases=len(public),
        epochs=epochs,
        loss=trainer.last_loss,
        seconds=time.perf_counter() - t0,
    )
