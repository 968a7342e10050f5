"""The durable DP-SGD history of a Flower node: what its own DP-SGD spent, in its own folder.

The MONAI app (:mod:`.monai_app`) trains with DP-SGD through
:class:`~secure_fl.training.site_dp.TrainerDP`, whose ``rounds_log`` is what its target epsilon
is judged on (BudgetExceededError). That log must outlive a message, a process, a SuperNode
restart and a Flower run, and no message or ``context.state`` may shrink it: it lives in the
node's ``state_dir`` (``state_dir/flower/dp_sgd.jsonl``, one JSON object per DP-SGD round, 0600,
rewritten atomically under an exclusive file lock). :meth:`DPSGDLog.held` holds that lock from
the read before training until the new rounds are appended, so two messages of one node never
both spend the same remaining budget.

Guarantees: rounds are only ever appended (a round that ran is recorded even when the train
function fails afterwards); an unreadable or malformed log is refused (ConfigError naming the
file, line and field), never treated as empty. Limits: whoever can write the node's
``state_dir`` owns the node anyway (its keys are there too).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError
from secure_fl.training.site_dp import DPRound

#: The log's file name inside the node's folder (``state_dir/flower``).
DP_SGD_LOG = "dp_sgd.jsonl"
NOISE_SOURCES = ("csprng", "seeded")


def _round_of(line: str, where: str) -> DPRound:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    fields = ("round", "steps", "noise_multiplier", "sample_rate", "clip", "noise_source")
    if sorted(data) != sorted(fields):
        raise ConfigError(f"{where}: fields must be exactly {list(fields)}, got {sorted(data)}")
    for key in ("round", "steps"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {key} must be an int >= 0, got {value!r}")
    for key, high in (("noise_multiplier", math.inf), ("sample_rate", 1.0), ("clip", math.inf)):
        value = data[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not 0 < value <= high or not math.isfinite(value):
            raise ConfigError(
                f"{where}: {key} must be a finite number in (0, {high}], got {value!r}"
            )
    if data["noise_source"] not in NOISE_SOURCES:
        raise ConfigError(
            f"{where}: noise_source must be one of {NOISE_SOURCES}, got {data['noise_source']!r}"
        )
    return DPRound(
        int(data["round"]),
        int(data["steps"]),
        float(data["noise_multiplier"]),
        float(data["sample_rate"]),
        float(data["clip"]),
        str(data["noise_source"]),
    )


def _line(entry: DPRound) -> str:
    return json.dumps(
        {
            "round": int(entry.round),
            "steps": int(entry.steps),
            "noise_multiplier": float(entry.noise_multiplier),
            "sample_rate": float(entry.sample_rate),
            "clip": float(entry.clip),
            "noise_source": str(entry.noise_source),
        },
        sort_keys=True,
    )


class DPSGDLog:
    """The append-only DP-SGD log at ``path`` (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def of_site(cls, site: Any) -> DPSGDLog:
        """The log of a :class:`~.node.FlowerSite`: ``site.node_dir / DP_SGD_LOG``."""
        return cls(Path(site.node_dir) / DP_SGD_LOG)

    def __repr__(self) -> str:
        return f"DPSGDLog({str(self.path)!r})"

    def read(self) -> list[DPRound]:
        """Every recorded round, oldest first ([] when the file does not exist yet). Errors:
        ConfigError when the file is unreadable, open to other users, or a line is malformed."""
        if not self.path.exists():
            return []
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{self.path} is open to other users (mode {mode:o}); chmod 600")
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path} is unreadable: {exc}") from exc
        if text and not text.endswith("\n"):
            raise ConfigError(f"{self.path}: the last line is incomplete")
        return [
            _round_of(line, f"{self.path} line {number}")
            for number, line in enumerate(text.splitlines(), start=1)
        ]

    def append(self, rounds: Sequence[DPRound]) -> None:
        """Append ``rounds`` (the file is rewritten atomically, 0600; nothing when empty).
        Call it under :meth:`held`. Errors: ConfigError when the existing log is malformed."""
        if not rounds:
            return
        kept = self.read()
        text = "".join(_line(r) + "\n" for r in [*kept, *rounds])
        atomic_write(self.path, text, mode=0o600)

    @contextmanager
    def held(self) -> Iterator[None]:
        """An exclusive lock on the log (``<path>.lock``, 0600) for the block: one DP-SGD round
        of the node at a time, across processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextmanager
def durable_dp_history(trainer: Any, log: DPSGDLog) -> Iterator[None]:
    """Hold ``log`` for the block: ``trainer.own_dp.rounds_log`` is replaced by the log's
    rounds on entry (whatever the trainer held before), and every round the block adds is
    appended on exit, also when the block raises. Errors: ConfigError (:meth:`DPSGDLog.read`)."""
    own = trainer.own_dp
    if own is None:
        raise ConfigError("durable_dp_history needs a trainer with its own DP-SGD (own_dp)")
    with log.held():
        own.rounds_log = log.read()
        known = len(own.rounds_log)
        try:
            yield
        finally:
            log.append(own.rounds_log[known:])


__all__ = ["DP_SGD_LOG", "NOISE_SOURCES", "DPSGDLog", "durable_dp_history"]
