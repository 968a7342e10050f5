"""Differential privacy in federated runs: DP-SGD, DP-FedAvg (central and distributed), ledger,
budget and audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import tiny_config

from secure_fl.data import PreprocessConfig
from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy import PrivacyConfig, PrivacyLedger, audit_run
from secure_fl.training import AggregationConfig, run_experiment

PRE = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sample_level_dp_sgd_run_is_recorded_and_audits_clean(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_datalist,
        preprocess=PRE,
        privacy=PrivacyConfig(level="sample", noise_multiplier=1.1, clip=1.0, delta=1e-4),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    rows = _rows(tmp_path / "run")
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert set(eps[0]) == {"site-A", "site-B", "site-C"}
    assert all(eps[1][s] > eps[0][s] > 0 for s in eps[0])  # spending composes over rounds
    with PrivacyLedger(tmp_path / "run" / "privacy_ledger.sqlite") as ledger:
        ledger.verify()
        records = ledger.entries()
        assert set(ledger.sites()) == {"site-A", "site-B", "site-C"}
        assert all(r.confirmed for r in records)
    result = audit_run(tmp_path / "run")
    assert result.findings == [], [f.message for f in result.findings]


def test_site_level_central_dp_meets_the_target_epsilon(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_datalist,
        aggregation=AggregationConfig(name="secagg+", options={"seed": 0}),
        privacy=PrivacyConfig(level="site", target_epsilon=8.0, clip=0.5, delta=1e-3),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    final = _rows(tmp_path / "run")[-1]["privacy"]
    assert 7.0 < final["max_epsilon"] <= 8.0 + 1e-6
    assert final["noise_multiplier"] > 0
    assert audit_run(tmp_path / "run").findings == []


def test_site_level_distributed_discrete_gaussian(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=1,
        aggregation=AggregationConfig(name="secagg", options={"dropout_rate": 0.3}),
        privacy=PrivacyConfig(
            level="site",
            trust="distributed",
            mechanism="discrete_gaussian",
            noise_multiplier=1.0,
            clip=0.5,
            delta=1e-3,
        ),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    row = _rows(tmp_path / "run")[0]
    assert row["aggregation"]["aggregator"].endswith("discrete_gaussian")
    assert row["privacy"]["max_epsilon"] > 0
    assert audit_run(tmp_path / "run").findings == []


def test_budget_refuses_the_round_before_it_runs(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        privacy=PrivacyConfig(
            level="site", noise_multiplier=1.0, clip=0.5, delta=1e-3, site_budget=4.5
        ),
    )
    with pytest.raises(BudgetExceededError, match="spent") as err:
        run_experiment(config, tmp_path / "run", log=lambda _: None)
    assert "remaining" in str(err.value)
    rows = _rows(tmp_path / "run")
    assert 0 < len(rows) < 3  # the refused round left no metrics and no model update
    assert all(r["privacy"]["max_epsilon"] <= 4.5 for r in rows)


def test_privacy_config_combinations_are_checked(tiny_datalist: Path) -> None:
    two_patches = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=2)
    with pytest.raises(ConfigError, match="samples_per_volume"):
        tiny_config(
            tiny_datalist,
            preprocess=two_patches,
            privacy=PrivacyConfig(level="sample", noise_multiplier=1.0),
        )
    with pytest.raises(ConfigError, match="exactly one strategy"):
        tiny_config(
            tiny_datalist,
            preprocess=PRE,
            strategies=("fedavg", "local"),
            privacy=PrivacyConfig(level="sample", noise_multiplier=1.0),
        )
    with pytest.raises(ConfigError, match="DP-FedAvg"):
        tiny_config(
            tiny_datalist,
            strategies=("cwt",),
            privacy=PrivacyConfig(level="site", noise_multiplier=1.0),
        )


def test_centralised_dp_sgd_charges_every_sites_patients(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=1,
        strategies=("centralized",),
        preprocess=PRE,
        privacy=PrivacyConfig(level="sample", noise_multiplier=1.0, clip=1.0, delta=1e-4),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    with PrivacyLedger(tmp_path / "run" / "privacy_ledger.sqlite") as ledger:
        assert set(ledger.sites()) == {"site-A", "site-B", "site-C"}
    eps = _rows(tmp_path / "run")[0]["privacy"]["epsilon"]
    assert len(set(round(v, 9) for v in eps.values())) == 1  # one pooled mechanism, same for all
    assert audit_run(tmp_path / "run").findings == []


def test_distributed_skellam_meets_a_target_epsilon(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_datalist,
        aggregation=AggregationConfig(name="secagg", options={"dropout_rate": 0.3}),
        privacy=PrivacyConfig(
            level="site",
            trust="distributed",
            mechanism="skellam",
            target_epsilon=10.0,
            clip=0.5,
            delta=1e-3,
        ),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    final = _rows(tmp_path / "run")[-1]["privacy"]
    assert 9.0 < final["max_epsilon"] <= 10.0 + 1e-6
    # the ledger holds the calibrated Gaussian-equivalent multiplier, not the larger nominal one
    assert audit_run(tmp_path / "run").findings == []
