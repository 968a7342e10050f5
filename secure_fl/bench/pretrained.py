"""The benchmark's public pretraining step and its *pretrained-only* line.

:func:`pretrained_checkpoint` pretrains the profile's model once per output folder
(``DIR/pretrained/public.pt``) on a public synthetic cohort
(:func:`secure_fl.training.pretrain.pretrain`: institutions and patients of their own, generated
under ``DIR/pretrained/public-cohort``; no private site is read, so the checkpoint costs the
private patients no privacy). ``DIR/pretrained/pretrain.json`` records what made it; a later
benchmark into the same folder with other pretraining settings is refused rather than silently
fine-tuning a checkpoint of another model.

:func:`pretrained_only` evaluates that checkpoint, untrained on any private site, on the same
held-out cases as every run (the pooled Dice of ``evaluate_strategy``): the line that DP
fine-tuning has to beat to have learnt anything from the private sites.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError

Log = Callable[[str], None]

PRETRAIN_FOLDER = "pretrained"
CHECKPOINT_NAME = "public.pt"
RECORD_NAME = "pretrain.json"


def _settings(config: Any, cases: int, epochs: int) -> dict[str, Any]:
    """What determines the checkpoint: the model, preprocessing, optimiser, seeds, cohort."""
    resolved = config.to_dict()
    train = resolved["train"]
    return {
        "model": {k: v for k, v in resolved["model"].items() if k != "pretrained"},
        "preprocess": resolved["preprocess"],
        "train": {k: train[k] for k in ("optimizer", "lr", "weight_decay", "batch_size")},
        "seed": resolved["seed"],
        "synthetic_seed": resolved["data"]["synthetic_seed"],
        "shape": resolved["data"]["synthetic_shape"],
        "cases": cases,
        "epochs": epochs,
    }


def pretrained_checkpoint(
    config: Any, out: Path, *, cases: int, epochs: int, log: Log = print
) -> tuple[Path, float]:
    """The public pretrained checkpoint of ``config`` (an ExperimentConfig without DP; its
    ``data.synthetic_shape`` and ``synthetic_seed`` define the public cohort) under
    ``out/pretrained``, made now unless an earlier benchmark into ``out`` made it with the same
    settings; returns (checkpoint path, seconds the pretraining took when it was made).

    Guarantee: reads no private site (:func:`secure_fl.training.pretrain.pretrain`).
    Errors: ConfigError when ``out/pretrained`` holds a checkpoint made with other settings
    (listing them: use a new ``--out``) or an unreadable record; pretrain's errors.
    """
    from secure_fl.training.pretrain import pretrain

    folder = out / PRETRAIN_FOLDER
    checkpoint = folder / CHECKPOINT_NAME
    record_path = folder / RECORD_NAME
    wanted = _settings(config, cases, epochs)
    if record_path.is_file() and checkpoint.is_file():
        try:
            record = json.loads(record_path.read_text())
            made_with, seconds = record["settings"], float(record["seconds"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{record_path} is unreadable ({exc}); use a new --out") from exc
        if made_with != wanted:
            keys = sorted(
                k for k in set(wanted) | set(made_with) if wanted.get(k) != made_with.get(k)
            )
            raise ConfigError(
                f"{checkpoint} was pretrained with other settings ({', '.join(keys)} differ); "
                "use a new --out"
            )
        log(f"pretrained checkpoint: {checkpoint} (made earlier, {seconds:.0f} s)")
        return checkpoint, seconds
    result = pretrain(
        config, checkpoint, public_dir=folder / "public-cohort", cases=cases, epochs=epochs
    )
    record = {
        "settings": wanted,
        "seconds": result.seconds,
        "public_cases": result.cases,
        "loss": result.loss,
    }
    atomic_write(record_path, (json.dumps(record, indent=2) + "\n").encode())
    log(
        f"pretrained checkpoint: {result.cases} public cases, {result.epochs} epochs, "
        f"loss {result.loss:.3f}, {result.seconds:.0f} s"
    )
    return checkpoint, result.seconds


def pretrained_only(config: Any, run_dir: Path) -> tuple[dict[str, float], float]:
    """Dice of ``config.model.pretrained`` (no training on any private site) on every site's
    held-out cases, split exactly as the runs of ``config`` split them: (per site, pooled over
    all held-out cases). Writes ``run_dir/evaluation.json`` and ``run_dir/config.json``.

    Errors: ConfigError when ``config.model.pretrained`` is unset or does not fit the model;
    data errors of the federation.
    """
    import numpy as np

    from secure_fl.training.heldout import resolve_data
    from secure_fl.training.runner import build_federation, resolve_cases

    if not config.model.pretrained:
        raise ConfigError("pretrained-only: model.pretrained must be set")
    plan = resolve_data(config, resolve_cases(config, lambda _: None))
    fed = build_federation(config, list(plan.train_pool), pooled=False, plan=plan)
    dice: dict[str, float] = {}
    everything: list[float] = []
    for name in fed.names:
        scores = fed.sites[name].dice([fed.initial])
        everything.extend(scores)
        dice[name] = float(np.mean(scores)) if scores else float("nan")
    pooled = float(np.mean(everything)) if everything else float("nan")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    result = {"dice": dice, "pooled": pooled, "checkpoint": config.model.pretrained}
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return dice, pooled
