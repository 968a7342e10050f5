"""FedAvg against the centralised Dice (issue 13): the FedAvgM preset, the benchmark's named
variants and the comparison that shares one centralised run per local setting."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from secure_fl.errors import ConfigError
from secure_fl.training import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    name = "federated_dice_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "federated_dice.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_preset_is_the_benchmark_variant() -> None:
    """configs/fedavg_momentum.toml and ``--variants fedavgm`` run the same training: the quick
    profile with server momentum 0.5 and nothing else changed."""
    bench = _bench()
    quick = bench.PROFILES["quick"]
    preset = load_config(ROOT / "configs" / "fedavg_momentum.toml")
    variant: ExperimentConfig = bench.variant_config(quick, "fedavgm")
    for field in ("rounds", "seed", "preprocess", "model", "train", "strategy"):
        assert getattr(preset, field) == getattr(variant, field), field
    assert preset.data.synthetic_sites == variant.data.synthetic_sites
    assert preset.train == quick.train
    assert preset.strategy.server_optimizer == {"name": "fedavgm", "lr": 1.0, "momentum": 0.5}
    assert set(preset.strategies) == {"centralized", "fedavg"}


def test_variants_resolve_and_unknown_ones_are_refused() -> None:
    bench = _bench()
    quick = bench.PROFILES["quick"]
    assert bench.variant_config(quick, "fedavg") == quick
    adam = bench.variant_config(quick, "fedadam")
    assert adam.strategy.server_optimizer["name"] == "fedadam"
    assert adam.train == quick.train
    with pytest.raises(ConfigError, match=r"--variants: 'nope' is not one of"):
        bench.variant_config(quick, "nope")


def test_server_side_variants_share_the_centralised_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A variant that changes only the server's step reuses the centralised Dice of the same
    local settings; one that changes local training gets its own centralised run."""
    bench = _bench()
    calls: list[tuple[tuple[str, ...], int, str]] = []

    class Summary:
        def __init__(self, pooled: dict[str, float]) -> None:
            self.pooled = pooled

    def fake_run(config: ExperimentConfig, out: Path) -> Any:
        calls.append((config.strategies, config.train.local_epochs, config.aggregation.name))
        epochs = config.train.local_epochs
        pooled = {"fedavg": 0.80 + 0.01 * epochs}
        if "centralized" in config.strategies:
            pooled["centralized"] = 0.90 + 0.001 * epochs
        return Summary(pooled)

    monkeypatch.setattr(bench, "run_experiment", fake_run)
    rows = bench.compare_variants(
        bench.PROFILES["quick"], ["fedavg", "fedavgm", "epochs-4"], tmp_path, "cmd"
    )
    assert calls == [
        (("centralized", "fedavg"), 2, "plain"),
        (("fedavg",), 2, "plain"),
        (("centralized", "fedavg"), 4, "plain"),
    ]
    assert [r.setting for r in rows] == ["fedavg", "fedavgm", "epochs-4"]
    assert rows[1].centralised == pytest.approx(0.902) == rows[0].centralised
    assert rows[2].centralised == pytest.approx(0.904)
    assert rows[2].ratio == pytest.approx(0.84 / 0.904)
    assert rows[2].command == "cmd --variants epochs-4"
    table = bench.variants_table(rows)
    assert table[0].startswith("| setting | federated Dice | centralised Dice | ratio | rounds")
    assert "| epochs-4 | 0.8400 | 0.9040 | 0.9292 | 30 |" in table[-1]
