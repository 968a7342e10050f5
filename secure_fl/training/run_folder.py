"""The run folder of a simulated experiment (:mod:`secure_fl.training.runner`): checkpoints and
final models (torch state dicts, written atomically), the budget stop record, JSON-safe metrics
rows and the checks that decide whether an existing folder may be resumed.

Errors: ConfigError when a run folder cannot be resumed with the given configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError
from secure_fl.training.config import ExperimentConfig, config_diff, describe_diff
from secure_fl.training.strategies import StrategyState

Log = Callable[[str], None]


STOPPED_FILENAME = "stopped.json"
"""Written into the run folder when a privacy budget stopped the run."""


@dataclass(frozen=True)
class BudgetStop:
    """A privacy budget refused round ``round`` (numbered from 1) of ``strategy`` before it ran:
    the run ended after round ``round - 1`` (``message``: the budget check's
    spent/projected/budget/remaining)."""

    strategy: str
    round: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": "privacy_budget",
            "strategy": self.strategy,
            "round": self.round,
            "message": self.message,
        }


def _save_checkpoint(path: Path, strategy: str, round_id: int, state: StrategyState) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(
        {
            "strategy": strategy,
            "round": round_id,
            "state": {
                k: {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in v.items()}
                for k, v in state.items()
            },
        },
        buf,
    )
    atomic_write(path, buf.getvalue())


def _load_checkpoint(path: Path) -> tuple[int, StrategyState]:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: {n: t.numpy() for n, t in v.items()} for k, v in data["state"].items()}
    return int(data["round"]), state


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _finished_rounds(run: Path, strategies: tuple[str, ...]) -> dict[str, int]:
    """How many rounds each strategy's checkpoint in ``run`` has finished (0: none)."""
    done = {}
    for name in strategies:
        ckpt = run / "checkpoints" / f"{name}.pt"
        done[name] = _load_checkpoint(ckpt)[0] + 1 if ckpt.exists() else 0
    return done


def _check_resume(run: Path, config: ExperimentConfig, previous: Any, log: Log) -> None:
    """Refuse to resume ``run`` with ``config`` unless config.json holds the same configuration,
    or one that differs only in ``rounds`` (extending a run, or ending it earlier) with no round
    beyond the new count already finished and no privacy target calibrated for the old count.

    Errors: ConfigError listing every difference (``key: old -> new``) and what to do instead.
    """
    resolved = config.to_dict()
    if previous == resolved:
        return
    diff = config_diff(
        previous if isinstance(previous, dict) else {}, resolved, ExperimentConfig().to_dict()
    )
    if not diff:
        return  # only options added since, at their defaults
    changes = describe_diff(diff)
    if [key for key, _, _ in diff] != ["rounds"]:
        raise ConfigError(
            f"{run} holds a run with another configuration ({changes}); only rounds may change "
            "when resuming: use another --run-dir, or --no-resume to start over in this one"
        )
    old_rounds = int(previous["rounds"])
    finished = max(_finished_rounds(run, config.strategies).values(), default=0)
    if config.rounds < finished:
        raise ConfigError(
            f"{run} has already finished {finished} round(s) ({changes}): --rounds must be at "
            f"least {finished}, or use --no-resume to start over"
        )
    p = config.privacy
    if p.enabled and p.target_epsilon is not None:
        raise ConfigError(
            f"{run} calibrated its noise so that target_epsilon={p.target_epsilon:g} holds "
            f"over {old_rounds} rounds ({changes}): more or fewer rounds would not keep that "
            "guarantee; start a new run (another --run-dir) with the rounds you want"
        )
    verb = "extending" if config.rounds > old_rounds else "shortening"
    note = ""
    if p.enabled:
        note = "; the privacy budgets are checked before every new round"
    log(
        f"{verb} the run from {old_rounds} to {config.rounds} rounds ({finished} finished); "
        f"the learning-rate schedule of the remaining rounds is planned over {config.rounds}"
        f"{note}"
    )


def _check_numbering(metrics_path: Path, rows: list[dict[str, Any]]) -> None:
    if any(isinstance(r.get("round"), int) and r["round"] < 1 for r in rows):
        raise ConfigError(
            f"{metrics_path} numbers rounds from 0 (written by an older secure-fl): it cannot "
            "be resumed; use --no-resume to start over, or another --run-dir"
        )


def _save_models(path: Path, state: StrategyState) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(
        {
            k: {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in v.items()}
            for k, v in state.items()
        },
        buf,
    )
    atomic_write(path, buf.getvalue())
