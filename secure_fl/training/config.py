"""Experiment configuration: frozen dataclasses, loaded from TOML or YAML with strict validation.

Unknown keys, wrong types and missing data paths fail with a ConfigError that names the dotted key
(for example ``train.lr``) and what is allowed.
The type-driven parsing is in :mod:`secure_fl.training.config_coerce`, the comparison of two
configurations (``config_diff``, ``describe_diff``) in :mod:`secure_fl.training.config_compare`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.data.preprocess_config import PreprocessConfig
from secure_fl.errors import ConfigError
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.rounds.spec import PROTOCOLS as AGGREGATORS
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.training.config_coerce import _build
from secure_fl.training.config_compare import config_diff, describe_diff
from secure_fl.training.model import ModelConfig
from secure_fl.training.strategy_names import STRATEGIES
from secure_fl.training.train_config import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the cases come from: a datalist JSON, or (when ``datalist`` is empty) the built-in
    synthetic federation, generated under ``synthetic_dir`` if not already there.

    ``synthetic_cases``: cases per synthetic site: empty for the default counts (10, 8, 6, 12,
    cycled), one number for every site, or one per site (each in [1, 10000]; e.g. 64 at a
    ``synthetic_shape`` of 24^3 for DP runs of realistic cohort size)."""

    datalist: str = ""
    synthetic_dir: str = "data/synthetic"
    synthetic_sites: int = 4
    synthetic_shape: tuple[int, int, int] = (48, 48, 48)
    synthetic_seed: int = 0
    synthetic_cases: tuple[int, ...] = ()
    val_fraction: float = 0.25
    cache: bool = True
    # Real-data evaluation (secure_fl.training.heldout): held-out institutions (never train,
    # tested at the end), the tumour sub-region, the label scheme, the stacked MRI sequences,
    # and the units of Hausdorff 95.
    holdout_sites: tuple[str, ...] = ()
    target: str = "whole_tumour"
    label_scheme: str = "auto"
    modalities: tuple[str, ...] = ("flair",)
    hd95_units: str = "mm"

    def __post_init__(self) -> None:
        from secure_fl.training.heldout import check_data_options

        check_data_options(self)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.synthetic_sites < 2:
            raise ConfigError(f"data.synthetic_sites must be >= 2, got {self.synthetic_sites}")
        if len(self.synthetic_cases) not in (0, 1, self.synthetic_sites):
            raise ConfigError(
                f"data.synthetic_cases must list 0, 1 or data.synthetic_sites="
                f"{self.synthetic_sites} case counts, got {len(self.synthetic_cases)}"
            )
        for i, count in enumerate(self.synthetic_cases):
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
                raise ConfigError(
                    f"data.synthetic_cases[{i}] must be an int in [1, 10000], got {count!r}"
                )


@dataclass(frozen=True)
class StrategyConfig:
    """Options of the aggregating strategies (fedavg, fedprox): ``server_optimizer`` is the table
    ``{name = "fedavg" | "fedavgm" | "fedadam", <options>}`` of the server-side optimiser
    (:mod:`secure_fl.aggregators.server_opt`: fedavg ``lr``; fedavgm ``lr``, ``momentum``; fedadam
    ``lr``, ``beta1``, ``beta2``, ``tau``). Resolved on load to the name and every option, so
    config.json records the defaults that ran. Default: plain FedAvg (``lr = 1``).

    Errors: ConfigError naming ``strategy.server_optimizer.<option>`` and its allowed range.
    """

    server_optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})

    def __post_init__(self) -> None:
        from secure_fl.aggregators.server_opt import server_optimizer_from_mapping

        opt = server_optimizer_from_mapping(
            self.server_optimizer, where="strategy.server_optimizer"
        )
        object.__setattr__(self, "server_optimizer", {"name": opt.name, **opt.options()})


@dataclass(frozen=True)
class AggregationConfig:
    """The aggregator FedAvg / FedProx use, by name, with its options (see secure_fl.aggregators).

    The options are checked when the config loads, against the one aggregation spec
    (:meth:`secure_fl.rounds.spec.AggregationSpec.split_options`: the spec's options of that
    protocol, plus the driver's ``seed``): a wrong option fails here, listing the allowed ones,
    not rounds later.

    Errors: ConfigError naming ``aggregation.options.<option>`` and the allowed range.
    """

    name: str = "plain"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ConfigError(f"aggregation.name must be one of {AGGREGATORS}, got {self.name!r}")
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"aggregation.options must be a table, got {self.options!r}")
        AggregationSpec.split_options(self.name, self.options, where="aggregation.options")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole simulated experiment: every strategy listed runs ``rounds`` rounds on the same data.

    Rounds are numbered from 1 wherever a person reads or writes them: ``dropouts`` keys (the
    round in which the listed sites drop out), metrics.jsonl, the console, the report and the
    audit. Code inside the strategies and the privacy ledger uses the 0-based index ``round - 1``.
    """

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
    strategy: StrategyConfig = field(default_factory=StrategyConfig)

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
            if not key.isdigit() or not 1 <= int(key) <= self.rounds:
                raise ConfigError(
                    f"dropouts: keys are round numbers from 1 to rounds={self.rounds}, got {key!r}"
                )
        for i, (p, d) in enumerate(zip(self.preprocess.patch, self.preprocess.grid, strict=True)):
            if p % self.model.downsampling or p > d:
                raise ConfigError(
                    f"preprocess.patch[{i}]={p} must be a multiple of {self.model.downsampling} "
                    f"(model.channels has {len(self.model.channels)} levels) and <= grid[{i}]={d}"
                )
        from secure_fl.training.heldout import check_experiment_data

        check_experiment_data(self)  # target vs labels, preprocess set through data.*

        from secure_fl.training.privacy_checks import check_privacy_config

        check_privacy_config(self)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-serialisable data."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]


def config_from_mapping(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from parsed TOML/YAML/JSON data."""
    if not isinstance(values, Mapping):
        raise ConfigError("the configuration must be a table/mapping at the top level")
    return _build(ExperimentConfig, values, "")  # type: ignore[no-any-return]


def parse_value(text: str) -> Any:
    """A command-line value as a TOML scalar or array (``3``, ``0.01``, ``true``, ``"x"``,
    ``[16, 16, 16]``); anything TOML cannot read is taken as a bare string (``secagg+``).
    ``yes``/``no``/``on``/``off`` (YAML's booleans) are read as true/false too."""
    if text.strip().lower() in ("yes", "on"):
        return True
    if text.strip().lower() in ("no", "off"):
        return False
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


_KEY = re.compile(r"[A-Za-z0-9_+-]+(\.[A-Za-z0-9_+-]+)*")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (``--set``) as (dotted key, parsed value), see :func:`parse_value`.

    Errors: ConfigError when there is no ``=`` or the key is not a dotted name.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key):
        raise ConfigError(
            f"--set expects key=value with a dotted key of the configuration "
            f"(e.g. train.lr=0.01), got {text!r}"
        )
    return key, parse_value(value.strip())


def _check_key(key: str) -> None:
    """The dotted ``key`` must name a field of :class:`ExperimentConfig` (or lie inside a
    mapping-valued field such as ``aggregation.options``)."""
    cls: Any = ExperimentConfig
    where = ""
    for part in key.split("."):
        if cls is None:
            raise ConfigError(f"unknown key {key}: {where} is a value, not a table")
        if not dataclasses.is_dataclass(cls):
            return  # inside a mapping (options, dropouts): any key
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(
                f"unknown key {key}; allowed keys{' in ' + where if where else ''}: "
                f"{', '.join(names)}"
            )
        hint = typing.get_type_hints(cls)[part]
        where = f"{where}.{part}" if where else part
        table = dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict
        cls = hint if table else None


def apply_overrides(
    values: Mapping[str, Any], overrides: Sequence[tuple[str, Any]]
) -> dict[str, Any]:
    """A copy of the parsed configuration ``values`` with each (dotted key, value) set.

    Errors: ConfigError naming the key when it is not a key of the configuration; the values are
    validated afterwards, exactly as the file's (:func:`config_from_mapping`).
    """
    out: dict[str, Any] = copy.deepcopy(dict(values))
    for key, value in overrides:
        _check_key(key)
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a table/mapping")
            node = child
        node[parts[-1]] = value
    return out


_PATH_KEYS = ("data.datalist", "data.synthetic_dir", "model.pretrained")


def load_config(path: str | Path, overrides: Sequence[tuple[str, Any]] = ()) -> ExperimentConfig:
    """Load a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON configuration file, with
    ``overrides`` ((dotted key, value) pairs, e.g. from ``simulate --set``) applied before the
    whole is validated, exactly as if the file said so.

    Relative ``data.datalist``, ``data.synthetic_dir`` and ``model.pretrained`` paths in the file
    are taken relative to the file; in ``overrides``, relative to the current directory.
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
    values = values or {}
    if overrides:
        if not isinstance(values, Mapping):
            raise ConfigError("the configuration must be a table/mapping at the top level")
        resolved = [
            (k, str(Path(v).resolve()) if k in _PATH_KEYS and isinstance(v, str) and v else v)
            for k, v in overrides
        ]
        values = apply_overrides(values, resolved)
    config = config_from_mapping(values)
    data = config.data
    changes: dict[str, Any] = {}
    if data.datalist and not Path(data.datalist).is_absolute():
        changes["datalist"] = str((p.parent / data.datalist).resolve())
    if not Path(data.synthetic_dir).is_absolute():
        changes["synthetic_dir"] = str((p.parent / data.synthetic_dir).resolve())
    if changes:
        config = dataclasses.replace(config, data=dataclasses.replace(data, **changes))
    pretrained = config.model.pretrained
    if pretrained and not Path(pretrained).is_absolute():
        resolved_model = dataclasses.replace(
            config.model, pretrained=str((p.parent / pretrained).resolve())
        )
        config = dataclasses.replace(config, model=resolved_model)
    if config.data.datalist and not Path(config.data.datalist).is_file():
        raise ConfigError(f"data.datalist: file not found: {config.data.datalist}")
    return config


__all__ = [
    "AGGREGATORS",
    "STRATEGIES",
    "AggregationConfig",
    "DataConfig",
    "ExperimentConfig",
    "StrategyConfig",
    "apply_overrides",
    "config_diff",
    "config_from_mapping",
    "describe_diff",
    "load_config",
    "parse_override",
    "parse_value",
]
