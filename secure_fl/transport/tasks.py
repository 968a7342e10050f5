"""What a site computes each round: the :class:`SiteTask` interface and a synthetic task.

A task receives the global model (tensor name -> float array, in a fixed order), the round
number and the server's per-round configuration (``round_config``: ``learning_rate``,
``local_epochs``, ``fedprox_mu``; :func:`check_round_config`) and returns its update (same names,
shapes and dtypes), its weight (e.g. its number of training samples; public to the server, as in
FedAvg) and its evaluation metrics (public too: sent to the server). The site process then
protects the update (SecAgg / SecAgg+ masking) and sends it. Federated training
(``secure_fl.training``) plugs in as a ``"python"`` task whose factory returns a :class:`SiteTask`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.transport.config import TaskSpec
from secure_fl.transport.tensors import Tensors, same_structure


@dataclass(frozen=True)
class TaskResult:
    """A site's contribution to one round: ``update`` (same structure as the model) and its
    ``weight`` (> 0).

    ``metrics`` (name -> finite number, e.g. ``{"dice": 0.81}``) ARE sent to the server (the
    ``ReportMetrics`` call) and logged by both sides: they are public, like the weight. The server
    averages each metric over the sites weighted by ``metric_samples`` (the number of cases it was
    computed on, e.g. the site's validation cases; 0 when there are no metrics). A task must
    therefore put nothing in ``metrics`` that it would not publish: under differential privacy
    only metrics of the released (global) model on held-out validation cases, never the training
    loss or any other statistic of the training patients.
    """

    update: Tensors = field(repr=False)
    weight: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    metric_samples: int = 0


#: The per-round configuration keys a server may send, with their allowed ranges.
ROUND_CONFIG_KEYS: Mapping[str, str] = {
    "learning_rate": "a finite number > 0",
    "local_epochs": "an integer in [1, 1000]",
    "fedprox_mu": "a finite number >= 0",
}


def check_round_config(
    round_config: Mapping[str, Any] | None, *, allowed: Sequence[str] | None = None
) -> dict[str, Any]:
    """The server's per-round configuration, validated: a new dict holding only known keys, with
    ``learning_rate`` (float, finite, > 0), ``local_epochs`` (int in [1, 1000]) and ``fedprox_mu``
    (float, finite, >= 0). ``allowed`` restricts the keys further (a task that supports fewer).
    None or empty: ``{}`` (the task's own settings).

    Errors: ConfigError naming ``round_config.<key>`` and the allowed keys (unknown key) or the
    allowed range (bad value); nothing is clipped or dropped.
    """
    if round_config is None:
        return {}
    if not isinstance(round_config, Mapping):
        raise ConfigError(
            f"round_config must be a mapping of {', '.join(ROUND_CONFIG_KEYS)}, got "
            f"{type(round_config).__name__}"
        )
    names = list(ROUND_CONFIG_KEYS) if allowed is None else list(allowed)
    out: dict[str, Any] = {}
    for key, value in round_config.items():
        if key not in names or key not in ROUND_CONFIG_KEYS:
            raise ConfigError(
                f"round_config.{key} is not a per-round setting this task accepts; allowed: "
                f"{', '.join(names) or '(none)'}"
            )
        bad = ConfigError(f"round_config.{key} must be {ROUND_CONFIG_KEYS[key]}, got {value!r}")
        if key == "local_epochs":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise bad
            out[key] = int(value)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        x = float(value)
        if not math.isfinite(x) or (x <= 0 if key == "learning_rate" else x < 0):
            raise bad
        out[key] = x
    return out


@runtime_checkable
class SiteTask(Protocol):
    """The per-round computation of a site (training, evaluation, or a synthetic stand-in)."""

    def compute_update(
        self,
        global_model: Mapping[str, np.ndarray],
        round_id: int,
        round_config: Mapping[str, Any] | None = None,
    ) -> TaskResult:
        """Return this site's update of ``global_model`` for federation round ``round_id``: the
        round's index counted from 0, the same for every attempt of the round (the protocol's
        round ids are fresh per attempt and are not passed to tasks). ``round_config``: the
        server's settings for this round (:func:`check_round_config`; None or empty: the task's
        own); a task refuses a key it does not support with ConfigError naming it."""
        ...


def run_task(
    task: SiteTask,
    global_model: Mapping[str, np.ndarray],
    round_id: int,
    round_config: Mapping[str, Any] | None = None,
) -> TaskResult:
    """``task.compute_update(...)``, also for a task written before ``round_config`` existed (two
    parameters): such a task is called without it when ``round_config`` is empty, and refused
    when the server sent settings it cannot apply. The result is validated
    (:func:`check_result`).

    Errors: ConfigError (settings for a task that takes none, or a task's own refusal);
    InvalidUpdateError (the result does not fit the model).
    """
    try:
        params = inspect.signature(task.compute_update).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}  # type: ignore[assignment]
    takes_config = "round_config" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    if takes_config:
        result = task.compute_update(global_model, round_id, round_config=round_config)
    elif round_config:
        raise ConfigError(
            f"round_config.{next(iter(round_config))}: this site's task ({type(task).__name__}) "
            "accepts no per-round settings; allowed: (none)"
        )
    else:
        result = task.compute_update(global_model, round_id)
    return check_result(result, global_model)


def check_result(result: object, model: Mapping[str, np.ndarray]) -> TaskResult:
    """Validate a task's output against the model. Errors: InvalidUpdateError."""
    if not isinstance(result, TaskResult):
        raise InvalidUpdateError(f"a task must return a TaskResult, got {type(result).__name__}")
    if not same_structure(result.update, model):
        raise InvalidUpdateError(
            "the task's update must have the model's tensor names, order, shapes and dtypes"
        )
    weight = result.weight
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not weight > 0:
        raise InvalidUpdateError(f"the task's weight must be a number > 0, got {weight!r}")
    if not np.isfinite(float(weight)):
        raise InvalidUpdateError("the task's weight must be finite")
    for name, value in result.metrics.items():
        if (
            not isinstance(name, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(float(value))
        ):
            raise InvalidUpdateError(
                f"the task's metrics must map names to finite numbers, got {name!r}: {value!r}"
            )
    samples = result.metric_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise InvalidUpdateError(
            f"the task's metric_samples must be an integer >= 0, got {samples!r}"
        )
    if result.metrics and samples < 1:
        raise InvalidUpdateError(
            "the task's metric_samples must be >= 1 when it returns metrics (the server weights "
            "each site's metrics by it)"
        )
    return result


def _stream(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


class SyntheticTask:
    """A deterministic stand-in for local training.

    Each site has a target model drawn from ``(seed, site)``; its update in round ``r`` is
    ``rate * (target - global) + noise * N(0, 1)``, with the noise drawn from ``(seed, site, r)``,
    and its weight ``weight`` (default: an integer in [10, 99] drawn from ``(seed, site)``). Over
    rounds the global model approaches the weighted mean of the targets. Identical inputs give
    bit-identical outputs in any process, so tests can recompute every update. ``delay_s`` stands
    in for training time (the task sleeps that long).

    ``round_config`` (:func:`check_round_config`) acts as on a quadratic loss: ``learning_rate``
    replaces ``rate`` for the round, ``local_epochs`` repeats the local step from the moved model
    (``d += lr * ((target - global - d) - fedprox_mu * d)`` per epoch, ``d`` starting at 0), and
    ``fedprox_mu`` adds FedProx's pull back to the global model. Without it (or with one epoch
    and no mu) the update is exactly the formula above.
    """

    def __init__(
        self,
        site_name: str,
        *,
        seed: int = 0,
        rate: float = 0.5,
        noise: float = 0.01,
        scale: float = 0.1,
        weight: float | None = None,
        delay_s: float = 0.0,
    ) -> None:
        if not rate > 0 or not noise >= 0 or not scale >= 0 or not delay_s >= 0:
            raise ConfigError("synthetic task: rate must be > 0, noise, scale and delay_s >= 0")
        self.delay_s = delay_s
        self.site_name = site_name
        self.seed = seed
        self.rate = rate
        self.noise = noise
        self.scale = scale
        if weight is None:
            weight = float(10 + _stream("weight", seed, site_name).integers(0, 90))
        if not weight > 0:
            raise ConfigError(f"synthetic task: weight must be > 0, got {weight!r}")
        self.weight = float(weight)
        self._targets: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def __repr__(self) -> str:
        return f"SyntheticTask(site={self.site_name!r}, seed={self.seed})"

    def _target(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = (name, shape)
        if key not in self._targets:
            rng = _stream("target", self.seed, self.site_name, name)
            self._targets[key] = self.scale * rng.standard_normal(shape)
        return self._targets[key]

    def compute_update(
        self,
        global_model: Mapping[str, np.ndarray],
        round_id: int,
        round_config: Mapping[str, Any] | None = None,
    ) -> TaskResult:
        """The synthetic update (class docstring). Errors: ConfigError for a bad
        ``round_config`` (naming the key and the allowed keys or range)."""
        settings = check_round_config(round_config)
        rate = float(settings.get("learning_rate", self.rate))
        epochs = int(settings.get("local_epochs", 1))
        mu = float(settings.get("fedprox_mu", 0.0))
        if self.delay_s:
            time.sleep(self.delay_s)
        rng = _stream("noise", self.seed, self.site_name, round_id)
        update: Tensors = {}
        for name, value in global_model.items():
            gap = self._target(name, value.shape) - value.astype(np.float64)
            delta = rate * gap
            for _ in range(epochs - 1):
                delta = delta + rate * ((gap - delta) - mu * delta)
            if self.noise:
                delta += self.noise * rng.standard_normal(value.shape)
            update[name] = delta.astype(value.dtype)
        return TaskResult(update=update, weight=self.weight)


def load_task(spec: TaskSpec, site_name: str) -> SiteTask:
    """Build the task a site config names. Errors: ConfigError (bad factory or options)."""
    options: dict[str, Any] = dict(spec.options)
    if spec.kind == "synthetic":
        try:
            return SyntheticTask(site_name, **options)
        except TypeError as exc:
            raise ConfigError(f"task.options for the synthetic task: {exc}") from exc
    assert spec.factory is not None  # guaranteed by TaskSpec
    module_name, _, attr = spec.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.factory {spec.factory!r} cannot be imported: {exc}") from exc
    task = factory(site_name=site_name, **options)
    if not isinstance(task, SiteTask):
        raise ConfigError(f"task.factory {spec.factory!r} did not return a SiteTask")
    return task
