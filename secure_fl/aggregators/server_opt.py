"""Server-side optimisers: what the server does with the aggregated update (numpy only, no torch).

Every round the aggregation gives the server ``delta``: the weighted mean of the sites' model
updates (new local model minus the global model), as one flat float64 vector. A
:class:`ServerOptimizer` turns it into the ``step`` the server adds to the global model, treating
``-delta`` as a pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2):

* ``fedavg`` (``lr`` = 1.0): ``step = lr * delta``; with ``lr = 1`` this is plain FedAvg
  (McMahan et al. 2017), the step being the mean update itself.
* ``fedavgm`` (``lr`` = 1.0, ``momentum`` = 0.9): server momentum (Hsu et al. 2019):
  ``m = momentum * m + delta``, ``step = lr * m``.
* ``fedadam`` (``lr`` = 0.01, ``beta1`` = 0.9, ``beta2`` = 0.99, ``tau`` = 1e-3):
  ``m = beta1 * m + (1 - beta1) * delta``, ``v = beta2 * v + (1 - beta2) * delta**2``,
  ``step = lr * m / (sqrt(v) + tau)``; ``m`` and ``v`` start at 0 and, as in the paper, there is
  no bias correction. ``tau`` bounds the adaptivity (the paper's best values lie near 1e-3).

The optimiser works on the aggregated (already protected and, under DP, noised) mean only, so it
is post-processing: it changes no privacy or secure-aggregation guarantee. Its state (``m``,
``v``, the step count) is public and belongs in the server's checkpoint
(:meth:`ServerOptimizer.state_dict`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from secure_fl.errors import ConfigError, InvalidUpdateError

#: Names accepted by :func:`make_server_optimizer`.
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")

Vector = NDArray[np.float64]


def _real(
    where: str,
    name: str,
    value: object,
    low: float,
    high: float | None,
    *,
    low_open: bool,
    high_open: bool = True,
) -> float:
    """``value`` as a float in the stated interval. Errors: ConfigError naming ``where.name``."""
    lo_b = "(" if low_open else "["
    hi_b = ")" if high_open else "]"
    allowed = f"a number in {lo_b}{low:g}, {'inf' if high is None else f'{high:g}'}{hi_b}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}.{name} must be {allowed}, got {value!r}")
    x = float(value)
    ok = math.isfinite(x) and (x > low if low_open else x >= low)
    if high is not None:
        ok = ok and (x < high if high_open else x <= high)
    if not ok:
        raise ConfigError(f"{where}.{name} must be {allowed}, got {value!r}")
    return x


class ServerOptimizer(ABC):
    """Turns the round's aggregated update into the step added to the global model.

    Subclasses define ``name``, ``DEFAULTS`` (option -> default) and ``_check`` (option ranges).
    """

    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, float]]

    def __init__(self, *, where: str = "server_optimizer", **options: Any) -> None:
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]} is not an option of server optimizer {self.name!r}; "
                f"allowed: {', '.join(self.DEFAULTS)}"
            )
        values = {**self.DEFAULTS, **options}
        self._options = self._check(values, where)
        self._length: int | None = None
        self._steps = 0

    @staticmethod
    @abstractmethod
    def _check(values: Mapping[str, object], where: str) -> dict[str, float]:
        """The validated options. Errors: ConfigError naming ``where.<option>`` and its range."""

    @abstractmethod
    def _step(self, delta: Vector) -> Vector:
        """The step for ``delta`` (validated, float64); updates the moments."""

    @abstractmethod
    def _arrays(self) -> dict[str, Vector | None]:
        """The optimiser's state vectors by name (None before the first step)."""

    @abstractmethod
    def _set_arrays(self, arrays: Mapping[str, Vector | None]) -> None:
        """Restore the state vectors (already validated)."""

    def options(self) -> dict[str, Any]:
        """Every option, defaults included, as JSON values: ``make_server_optimizer(self.name,
        **self.options())`` builds an optimiser configured the same way."""
        return dict(self._options)

    @property
    def steps(self) -> int:
        """How many steps this optimiser has taken (restored by :meth:`load_state_dict`)."""
        return self._steps

    def step(self, delta: np.ndarray) -> np.ndarray:
        """The step to add to the global model for the aggregated mean update ``delta``.

        ``delta``: a flat (1-D) finite float vector, of the same length every round. Returns a new
        float64 vector of that length; updates the optimiser's state (momentum / moments).
        Errors: InvalidUpdateError for a non-1-D or non-finite ``delta`` or a length other than
        that of the previous steps (the state is then unchanged).
        """
        arr = np.asarray(delta)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating):
            raise InvalidUpdateError(
                f"server optimizer: delta must be a flat float vector, got dtype {arr.dtype} "
                f"and shape {arr.shape}"
            )
        if self._length is not None and arr.size != self._length:
            raise InvalidUpdateError(
                f"server optimizer: delta has {arr.size} values, the model has {self._length}"
            )
        vec = arr.astype(np.float64, copy=False)
        if not np.all(np.isfinite(vec)):
            raise InvalidUpdateError("server optimizer: delta holds NaN or Inf values")
        out = self._step(vec)
        self._length = arr.size
        self._steps += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint: ``name``, ``options``, ``steps`` (int), ``length`` (int or
        None) and the state vectors (float64 arrays, or None before the first step; ``momentum``
        for fedavgm, ``m`` and ``v`` for fedadam). Copies: later steps do not change it."""
        arrays = {k: (None if v is None else v.copy()) for k, v in self._arrays().items()}
        return {
            "name": self.name,
            "options": self.options(),
            "steps": self._steps,
            "length": self._length,
            **arrays,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (e.g. from a checkpoint) so that the next step is the one
        the saved optimiser would have taken. The options are this optimiser's own (a resumed run
        may change them, e.g. the learning rate).

        Errors: ConfigError when ``state`` is of another optimiser, lacks a key, or holds vectors
        of the wrong shape, dtype or length, or non-finite values (nothing is changed then).
        """
        if not isinstance(state, Mapping) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, Mapping) else type(state).__name__
            raise ConfigError(
                f"server optimizer state is of {got!r}, this optimizer is {self.name!r}"
            )
        names = list(self._arrays())
        missing = [k for k in ("steps", "length", *names) if k not in state]
        if missing:
            raise ConfigError(f"server optimizer state lacks {missing[0]!r}")
        steps, length = state["steps"], state["length"]
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
            raise ConfigError(f"server optimizer state: steps must be an int >= 0, got {steps!r}")
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0
        ):
            raise ConfigError(
                f"server optimizer state: length must be an int >= 0 or None, got {length!r}"
            )
        arrays: dict[str, Vector | None] = {}
        for key in names:
            value = state[key]
            if value is None:
                arrays[key] = None
                continue
            arr = np.asarray(value)
            if (
                arr.ndim != 1
                or not np.issubdtype(arr.dtype, np.floating)
                or length is None
                or arr.size != length
                or not np.all(np.isfinite(arr))
            ):
                raise ConfigError(
                    f"server optimizer state: {key} must be a finite float vector of length "
                    f"{length}, got dtype {arr.dtype} and shape {arr.shape}"
                )
            arrays[key] = arr.astype(np.float64, copy=True)
        self._set_arrays(arrays)
        self._steps = int(steps)
        self._length = None if length is None else int(length)


class FedAvgOptimizer(ServerOptimizer):
    """``step = lr * delta`` (FedAvg with a server learning rate; the identity with lr = 1)."""

    name = "fedavg"
    DEFAULTS: ClassVar[dict[str, float]] = {"lr": 1.0}

    @staticmethod
    def _check(values: Mapping[str, object], where: str) -> dict[str, float]:
        return {"lr": _real(where, "lr", values["lr"], 0.0, None, low_open=True)}

    def _step(self, delta: Vector) -> Vector:
        lr = self._options["lr"]
        return delta.copy() if lr == 1.0 else lr * delta

    def _arrays(self) -> dict[str, Vector | None]:
        return {}

    def _set_arrays(self, arrays: Mapping[str, Vector | None]) -> None:
        return None


class FedAvgMOptimizer(ServerOptimizer):
    """Server momentum: ``m = momentum * m + delta``, ``step = lr * m``."""

    name = "fedavgm"
    DEFAULTS: ClassVar[dict[str, float]] = {"lr": 1.0, "momentum": 0.9}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._m: Vector | None = None

    @staticmethod
    def _check(values: Mapping[str, object], where: str) -> dict[str, float]:
        return {
            "lr": _real(where, "lr", values["lr"], 0.0, None, low_open=True),
            "momentum": _real(where, "momentum", values["momentum"], 0.0, 1.0, low_open=False),
        }

    def _step(self, delta: Vector) -> Vector:
        m = delta.copy() if self._m is None else self._options["momentum"] * self._m + delta
        self._m = m
        return self._options["lr"] * m

    def _arrays(self) -> dict[str, Vector | None]:
        return {"momentum": self._m}

    def _set_arrays(self, arrays: Mapping[str, Vector | None]) -> None:
        self._m = arrays["momentum"]


class FedAdamOptimizer(ServerOptimizer):
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient ``-delta``, adaptivity ``tau``."""

    name = "fedadam"
    DEFAULTS: ClassVar[dict[str, float]] = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._m: Vector | None = None
        self._v: Vector | None = None

    @staticmethod
    def _check(values: Mapping[str, object], where: str) -> dict[str, float]:
        return {
            "lr": _real(where, "lr", values["lr"], 0.0, None, low_open=True),
            "beta1": _real(where, "beta1", values["beta1"], 0.0, 1.0, low_open=False),
            "beta2": _real(where, "beta2", values["beta2"], 0.0, 1.0, low_open=False),
            "tau": _real(where, "tau", values["tau"], 0.0, None, low_open=True),
        }

    def _step(self, delta: Vector) -> Vector:
        o = self._options
        if self._m is None or self._v is None:
            self._m, self._v = np.zeros_like(delta), np.zeros_like(delta)
        m, v = self._m, self._v  # updated in place (state_dict hands out copies)
        m *= o["beta1"]
        m += (1.0 - o["beta1"]) * delta
        v *= o["beta2"]
        v += (1.0 - o["beta2"]) * np.square(delta)
        out = np.sqrt(v)
        out += o["tau"]
        np.divide(m, out, out=out)
        out *= o["lr"]
        return out

    def _arrays(self) -> dict[str, Vector | None]:
        return {"m": self._m, "v": self._v}

    def _set_arrays(self, arrays: Mapping[str, Vector | None]) -> None:
        if (arrays["m"] is None) != (arrays["v"] is None):
            raise ConfigError("server optimizer state: m and v must both be set or both None")
        self._m, self._v = arrays["m"], arrays["v"]


_CLASSES: dict[str, type[ServerOptimizer]] = {
    "fedavg": FedAvgOptimizer,
    "fedavgm": FedAvgMOptimizer,
    "fedadam": FedAdamOptimizer,
}


def make_server_optimizer(
    name: str = "fedavg", *, where: str = "server_optimizer", **options: Any
) -> ServerOptimizer:
    """A fresh server optimiser ``name`` (one of :data:`SERVER_OPTIMIZERS`) with ``options``.

    Options and ranges: fedavg ``lr`` > 0; fedavgm ``lr`` > 0, ``momentum`` in [0, 1); fedadam
    ``lr`` > 0, ``beta1`` and ``beta2`` in [0, 1), ``tau`` > 0 (defaults in the module docstring).
    ``where`` prefixes the field names in error messages (e.g. ``strategy.server_optimizer``).
    Errors: ConfigError naming ``where.name`` for an unknown name, or ``where.<option>`` for an
    unknown option (listing the allowed ones) or a value out of its range.
    """
    if not isinstance(name, str) or name not in _CLASSES:
        raise ConfigError(f"{where}.name must be one of {SERVER_OPTIMIZERS}, got {name!r}")
    return _CLASSES[name](where=where, **options)


def server_optimizer_from_mapping(
    values: Mapping[str, Any] | None, *, where: str = "server_optimizer"
) -> ServerOptimizer:
    """:func:`make_server_optimizer` from a config table ``{name = "...", <option> = ...}``
    (``name`` defaults to ``"fedavg"``; an empty or absent table gives plain FedAvg).
    Errors: ConfigError as :func:`make_server_optimizer`, or when ``values`` is not a mapping."""
    if values is None:
        return make_server_optimizer(where=where)
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a table/mapping, got {type(values).__name__}")
    options = dict(values)
    name = options.pop("name", "fedavg")
    if "where" in options:
        raise ConfigError(
            f"{where}.where is not an option; allowed: name and the options of {name!r}"
        )
    return make_server_optimizer(name, where=where, **options)


__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdamOptimizer",
    "FedAvgMOptimizer",
    "FedAvgOptimizer",
    "ServerOptimizer",
    "make_server_optimizer",
    "server_optimizer_from_mapping",
]
