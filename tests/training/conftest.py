"""Tiny federations for training tests: 3 sites, small volumes, a small UNet."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_fl.data import PreprocessConfig, generate_federation
from secure_fl.training import (
    AggregationConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
)


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    return generate_federation(out, sites=3, cases_per_site=(4, 3, 3), shape=(24, 24, 24), seed=5)


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
