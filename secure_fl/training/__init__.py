"""Federated training of the MONAI 3D-UNet: site trainer, strategies, evaluation, runner.

Importing this package imports nothing heavy: every name below loads its module on first use
(PEP 562), so reading a configuration (:mod:`secure_fl.training.config`) imports no torch, while
the trainer, strategies and runner import torch and MONAI when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secure_fl.training.config import (
        AggregationConfig,
        DataConfig,
        ExperimentConfig,
        config_from_mapping,
        load_config,
    )
    from secure_fl.training.model import ModelConfig, build_unet, get_state, set_state
    from secure_fl.training.runner import RunSummary, run_experiment
    from secure_fl.training.strategies import Federation, Strategy, make_strategy
    from secure_fl.training.strategy_names import STRATEGIES
    from secure_fl.training.train_config import TrainConfig
    from secure_fl.training.trainer import SiteTrainer

_LAZY = {
    "AggregationConfig": "secure_fl.training.config",
    "DataConfig": "secure_fl.training.config",
    "ExperimentConfig": "secure_fl.training.config",
    "config_from_mapping": "secure_fl.training.config",
    "load_config": "secure_fl.training.config",
    "ModelConfig": "secure_fl.training.model",
    "build_unet": "secure_fl.training.model",
    "get_state": "secure_fl.training.model",
    "set_state": "secure_fl.training.model",
    "RunSummary": "secure_fl.training.runner",
    "run_experiment": "secure_fl.training.runner",
    "Federation": "secure_fl.training.strategies",
    "Strategy": "secure_fl.training.strategies",
    "make_strategy": "secure_fl.training.strategies",
    "STRATEGIES": "secure_fl.training.strategy_names",
    "TrainConfig": "secure_fl.training.train_config",
    "SiteTrainer": "secure_fl.training.trainer",
}

__all__ = [
    "STRATEGIES",
    "AggregationConfig",
    "DataConfig",
    "ExperimentConfig",
    "Federation",
    "ModelConfig",
    "RunSummary",
    "SiteTrainer",
    "Strategy",
    "TrainConfig",
    "build_unet",
    "config_from_mapping",
    "get_state",
    "load_config",
    "make_strategy",
    "run_experiment",
    "set_state",
]


def __getattr__(name: str) -> Any:
    """Load ``name`` from its module on first access (PEP 562) and cache it here.

    Errors: AttributeError for a name this package does not export.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_fl.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
