"""The durable DP-SGD history of a Flower node: what its own DP-SGD spent, in its own folder.

The MONAI app (:mod:`.monai_app`) trains with DP-SGD through
:class:`~secure_fl.training.site_dp.TrainerDP`, whose ``rounds_log`` is what its target epsilon
is judged on (BudgetExceededError). That log must outlive a message, a process, a SuperNode
restart and a Flower run, and no message or ``context.state`` may shrink it: it lives in the
node's ``state_dir`` (``state_dir/flower/dp_sgd.jsonl``, one JSON object per DP-SGD round, 0600,
rewritten atomically under an exclusive file lock). :meth:`DPSGDLog.held` holds that lock from
the read before training until the new rounds are appended, so two messages of one node never
both spend the same remaining budget.

Every line also records the ``delta`` and the ``target_epsilon`` (null: none) the round was
judged at. The spend of past rounds depends on delta, so a later round asking for another delta
or target would re-judge (and could reopen) the budget: :func:`durable_dp_history` refuses it
(ConfigError naming the file, line and field) before any training.

Guarantees: rounds are only ever appended (a round that ran is recorded even when the train
function fails afterwards); an unreadable or malformed log is refused (ConfigError naming the
file, line and field), never treated as empty; a log written before delta and target were
recorded is refused too (no field to judge it by: move it aside only if its rounds were run at
the delta the site now pins). Limits: whoever can write the node's
``state_dir`` owns the node anyway (its keys are there too).
"""

from __future__ import annotations

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
#: The fields of one line (one DP-SGD round and the delta / target epsilon it was judged at).
FIELDS = (
    "round",
    "steps",
    "noise_multiplier",
    "sample_rate",
    "clip",
    "noise_source",
    "delta",
    "target_epsilon",
)


def _round_of(line: str, where: str) -> tuple[DPRound, float, float | None]:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    if sorted(data) != sorted(FIELDS):
        raise ConfigError(f"{where}: fields must be exactly {list(FIELDS)}, got {sorted(data)}")
    for key in ("round", "steps"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {key} must be an int >= 0, got {value!r}")
    bounded = (("noise_multiplier", math.inf), ("sample_rate", 1.0), ("clip", math.inf))
    for key, high in (*bounded, ("delta", 1.0), ("target_epsilon", math.inf)):
        value = data[key]
        if key == "target_epsilon" and value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not 0 < value <= high or not math.isfinite(value):
            raise ConfigError(
                f"{where}: {key} must be a finite number in (0, {high}], got {value!r}"
            )
    if data["delta"] == 1.0:
        raise ConfigError(f"{where}: delta must be in (0, 1), got 1.0")
    if data["noise_source"] not in NOISE_SOURCES:
        raise ConfigError(
            f"{where}: noise_source must be one of {NOISE_SOURCES}, got {data['noise_source']!r}"
        )
    entry = DPRound(
        int(data["round"]),
        int(data["steps"]),
        float(data["noise_multiplier"]),
        float(data["sample_rate"]),
        float(data["clip"]),
        str(data["noise_source"]),
    )
    target = None if data["target_epsilon"] is None else float(data["target_epsilon"])
    return entry, float(data["delta"]), target


def _line(entry: DPRound, delta: float, target_epsilon: float | None) -> str:
    return json.dumps(
        {
            "round": int(entry.round),
            "steps": int(entry.steps),
            "noise_multiplier": float(entry.noise_multiplier),
            "sample_rate": float(entry.sample_rate),
            "clip": float(entry.clip),
            "noise_source": str(entry.noise_source),
            "delta": float(delta),
            "target_epsilon": None if target_epsilon is None else float(target_epsilon),
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

    def read(
        self, *, delta: float | None = None, target_epsilon: float | None = None
    ) -> list[DPRound]:
        """Every recorded round, oldest first ([] when the file does not exist yet). With
        ``delta`` given, every line must have been judged at that ``delta`` and at
        ``target_epsilon``. Errors: ConfigError when the file is unreadable, open to other
        users, a line is malformed, or (naming the file, line and field) a line records another
        delta or target epsilon than asked."""
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
        rounds: list[DPRound] = []
        for number, line in enumerate(text.splitlines(), start=1):
            where = f"{self.path} line {number}"
            entry, was_delta, was_target = _round_of(line, where)
            if delta is not None:
                for field, was, now in (
                    ("delta", was_delta, delta),
                    ("target_epsilon", was_target, target_epsilon),
                ):
                    if was != now:
                        raise ConfigError(
                            f"{where}: {field} was {was!r} for the rounds already spent, this "
                            f"round asks for {now!r}; a site's DP-SGD {field} cannot change "
                            "(it would re-judge the recorded spend)"
                        )
            rounds.append(entry)
        return rounds

    def append(
        self, rounds: Sequence[DPRound], *, delta: float, target_epsilon: float | None
    ) -> None:
        """Append ``rounds``, judged at ``delta`` / ``target_epsilon`` (the file is rewritten
        atomically, 0600; nothing when empty). Call it under :meth:`held`. Errors: ConfigError
        when the existing log is malformed or records another delta / target epsilon."""
        if not rounds:
            return
        self.read(delta=delta, target_epsilon=target_epsilon)
        kept = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        text = kept + "".join(_line(r, delta, target_epsilon) + "\n" for r in rounds)
        atomic_write(self.path, text, mode=0o600)

    @contextmanager
    def held(self) -> Iterator[None]:
        """An exclusive lock on the log (``<path>.lock``, 0600) for the block: one DP-SGD round
        of the node at a time, across processes."""
        from secure_fl.integrations.flower.node import locked

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path):
            yield


@contextmanager
def durable_dp_history(trainer: Any, log: DPSGDLog) -> Iterator[None]:
    """Hold ``log`` for the block: ``trainer.own_dp.rounds_log`` is replaced by the log's
    rounds on entry (whatever the trainer held before), and every round the block adds is
    appended on exit (with ``own_dp.privacy``'s delta and target epsilon), also when the block
    raises. Errors: ConfigError (:meth:`DPSGDLog.read`; in particular a log that recorded
    another delta or target epsilon than ``own_dp.privacy`` now asks for)."""
    own = trainer.own_dp
    if own is None:
        raise ConfigError("durable_dp_history needs a trainer with its own DP-SGD (own_dp)")
    delta, target = float(own.privacy.delta), own.privacy.target_epsilon
    target = None if target is None else float(target)
    with log.held():
        own.rounds_log = log.read(delta=delta, target_epsilon=target)
        known = len(own.rounds_log)
        try:
            yield
        finally:
            log.append(own.rounds_log[known:], delta=delta, target_epsilon=target)


__all__ = ["DP_SGD_LOG", "FIELDS", "NOISE_SOURCES", "DPSGDLog", "durable_dp_history"]
