"""Experiment configuration: frozen dataclasses, loaded from TOML or YAML with strict validation.

Unknown keys, wrong types and missing data paths fail with a ConfigError that names the dotted key
(for example ``train.lr``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.aggregators import NAMES as AGGREGATORS
from secure_fl.data import PreprocessConfig
from secure_fl.errors import ConfigError
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.training.model import ModelConfig
from secure_fl.training.strategies import STRATEGIES
from secure_fl.training.trainer import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the cases come from: a datalist JSON, or (when ``datalist`` is empty) the built-in
    synthetic federation, generated under ``synthetic_dir`` if not already there."""

    datalist: str = ""
    synthetic_dir: str = "data/synthetic"
    synthetic_sites: int = 4
    synthetic_shape: tuple[int, int, int] = (48, 48, 48)
    synthetic_seed: int = 0
    val_fraction: float = 0.25
    cache: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.synthetic_sites < 2:
            raise ConfigError(f"data.synthetic_sites must be >= 2, got {self.synthetic_sites}")


@dataclass(frozen=True)
class AggregationConfig:
    """The aggregator FedAvg / FedProx use, by name, with its options (see secure_fl.aggregators)."""

    name: str = "plain"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ConfigError(f"aggregation.name must be one of {AGGREGATORS}, got {self.name!r}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole simulated experiment: every strategy listed runs ``rounds`` rounds on the same data."""

    name: str = "experiment"
    seed: int = 0
    rounds: int = 5
    strategies: tuple[str, ...] = ("fedavg",)
    fedprox_mu: float = 0.01
    dropouts: dict[str, list[str]] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not self.strategies:
            raise ConfigError("strategies must list at least one strategy")
        for name in self.strategies:
            if name not in STRATEGIES:
                raise ConfigError(f"strategies: {name!r} is not one of {STRATEGIES}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError("strategies must not repeat")
        for key in self.dropouts:
            if not key.isdigit() or int(key) >= self.rounds:
                raise ConfigError(
                    f"dropouts: keys are round numbers in [0, {self.rounds - 1}], got {key!r}"
                )
        for i, (p, d) in enumerate(zip(self.preprocess.patch, self.preprocess.grid, strict=True)):
            if p % self.model.downsampling or p > d:
                raise ConfigError(
                    f"preprocess.patch[{i}]={p} must be a multiple of {self.model.downsampling} "
                    f"(model.channels has {len(self.model.channels)} levels) and <= grid[{i}]={d}"
                )

        from secure_fl.training.privacy_run import check_privacy_config

        check_privacy_config(self)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-serialisable data."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table/mapping, got {type(value).__name__}")
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table/mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed keys{' in ' + where if where else ''}: "
            f"{', '.join(names)}"
        )
    kwargs = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in values.items()
    }
    return cls(**kwargs)


def config_from_mapping(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from parsed TOML/YAML/JSON data."""
    if not isinstance(values, Mapping):
        raise ConfigError("the configuration must be a table/mapping at the top level")
    return _build(ExperimentConfig, values, "")  # type: ignore[no-any-return]


def load_config(path: str | Path) -> ExperimentConfig:
    """Load a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON configuration file.

    Relative ``data.datalist`` and ``data.synthetic_dir`` paths are taken relative to the file.
    Errors: ConfigError for a missing or unparsable file, unknown keys, wrong types, a datalist that
    does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            values: Any = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        elif p.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"config file must end in .toml, .yaml, .yml or .json, got {p.name}")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot parse {p}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError(f"cannot parse {p}: {exc}") from exc
    config = config_from_mapping(values or {})
    data = config.data
    changes: dict[str, Any] = {}
    if data.datalist and not Path(data.datalist).is_absolute():
        changes["datalist"] = str((p.parent / data.datalist).resolve())
    if not Path(data.synthetic_dir).is_absolute():
        changes["synthetic_dir"] = str((p.parent / data.synthetic_dir).resolve())
    if changes:
        config = dataclasses.replace(config, data=dataclasses.replace(data, **changes))
    if config.data.datalist and not Path(config.data.datalist).is_file():
        raise ConfigError(f"data.datalist: file not found: {config.data.datalist}")
    return config
