"""Shared helpers of the training tests (imported by module name: keep the basename unique)."""

from __future__ import annotations

from pathlib import Path

from secure_fl.data import PreprocessConfig
from secure_fl.training import (
    AggregationConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
)


def tiny_config(datalist: Path, **overrides: object) -> ExperimentConfig:
    values: dict[str, object] = {
        "name": "tiny",
        "seed": 3,
        "rounds": 2,
        "strategies": ("fedavg",),
        "data": DataConfig(datalist=str(datalist), val_fraction=0.34),
        "preprocess": PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1),
        "model": ModelConfig(channels=(4, 8, 16), num_res_units=1),
        "train": TrainConfig(lr=3e-3, local_epochs=1, batch_size=2, device="cpu"),
        "aggregation": AggregationConfig(name="plain"),
    }
    values.update(overrides)
    return ExperimentConfig(**values)  # type: ignore[arg-type]
