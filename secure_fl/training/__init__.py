"""Federated training of the MONAI 3D-UNet: site trainer, strategies, evaluation, runner.

Importing this package imports torch and MONAI.
"""

from secure_fl.training.config import (
    AggregationConfig,
    DataConfig,
    ExperimentConfig,
    config_from_mapping,
    load_config,
)
from secure_fl.training.model import ModelConfig, build_unet, get_state, set_state
from secure_fl.training.runner import RunSummary, run_experiment
from secure_fl.training.strategies import STRATEGIES, Federation, Strategy, make_strategy
from secure_fl.training.trainer import SiteTrainer, TrainConfig

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
