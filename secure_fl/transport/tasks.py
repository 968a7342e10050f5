"""What a site computes each round: the :class:`SiteTask` interface and a synthetic task.

A task receives the global model (tensor name -> float array, in a fixed order) and the round
number and returns its update (same names, shapes and dtypes) and its weight (e.g. its number of
training samples; public to the server, as in FedAvg). The site process then protects the update
(SecAgg / SecAgg+ masking) and sends it. Federated training (``secure_fl.training``) plugs in as a
``"python"`` task whose factory returns a :class:`SiteTask`.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.transport.config import TaskSpec
from secure_fl.transport.tensors import Tensors, same_structure


@dataclass(frozen=True)
class TaskResult:
    """A site's contribution to one round: ``update`` (same structure as the model) and its
    ``weight`` (> 0). ``metrics`` are logged by the site, never sent."""

    update: Tensors = field(repr=False)
    weight: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class SiteTask(Protocol):
    """The per-round computation of a site (training, evaluation, or a synthetic stand-in)."""

    def compute_update(self, global_model: Mapping[str, np.ndarray], round_id: int) -> TaskResult:
        """Return this site's update of ``global_model`` for federation round ``round_id``: the
        round's index counted from 0, the same for every attempt of the round (the protocol's
        round ids are fresh per attempt and are not passed to tasks)."""
        ...


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

    def compute_update(self, global_model: Mapping[str, np.ndarray], round_id: int) -> TaskResult:
        if self.delay_s:
            time.sleep(self.delay_s)
        rng = _stream("noise", self.seed, self.site_name, round_id)
        update: Tensors = {}
        for name, value in global_model.items():
            delta = self.rate * (self._target(name, value.shape) - value.astype(np.float64))
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
