"""Differential privacy in federated runs: DP-SGD, DP-FedAvg (central and distributed), ledger,
budget and audit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from training_helpers import tiny_config

from secure_fl.data import PreprocessConfig
from secure_fl.errors import ConfigError
from secure_fl.privacy import PrivacyConfig, PrivacyLedger, audit_run
from secure_fl.privacy.accounting import calibrate_noise, compute_epsilon
from secure_fl.privacy.distributed import effective_noise_multiplier
from secure_fl.training import AggregationConfig, run_experiment
from secure_fl.training.dp_fedavg import DPFedAvg
from secure_fl.training.privacy_run import PrivacyRound
from secure_fl.training.runner import _make_strategy

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
    # The runner ends the run gracefully at the refused round (stopped.json, no exception).
    summary = run_experiment(config, tmp_path / "run", log=lambda _: None)
    assert summary.stopped is not None
    assert "spent" in summary.stopped.message and "remaining" in summary.stopped.message
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


# -- the mechanism that runs is the one accounted (no training: a stand-in federation) ----------


def _fed(n_sites: int, dim: int = 1000) -> Any:
    names = [f"site-{i}" for i in range(n_sites)]
    return SimpleNamespace(
        names=names, sites={}, pooled=None, initial={"w": np.zeros(dim, dtype=np.float32)}
    )


def _privacy_round(tmp_path: Path, config: Any, fed: Any) -> PrivacyRound:
    strategy = _make_strategy(config, "fedavg")
    pr = PrivacyRound(config, tmp_path, fed, strategy)
    pr.open()
    pr.prepare()
    return pr


def test_site_sampling_claims_no_amplification(tiny_datalist: Path, tmp_path: Path) -> None:
    """The server sees who takes part: each site is charged at rate 1 for the rounds it joined."""
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        privacy=PrivacyConfig(level="site", target_epsilon=8.0, site_sample_rate=0.5, delta=1e-3),
    )
    fed = _fed(12)
    pr = _privacy_round(tmp_path, config, fed)
    assert isinstance(pr.strategy, DPFedAvg)
    # calibrated for 3 unamplified releases, not for 3 releases subsampled at 0.5
    assert pr.site_noise == pytest.approx(calibrate_noise(8.0, 1.0, 3, 1e-3), rel=1e-9)
    assert compute_epsilon(pr.site_noise, 1.0, 3, 1e-3) <= 8.0
    entries = pr.planned(0)
    taking_part = pr.strategy.sampled_sites(fed, 0)
    assert {e.sample_rate for e in entries} == {1.0}
    assert {e.site for e in entries if e.steps == 1} == set(taking_part)
    assert all(e.steps == 0 for e in entries if e.site not in taking_part)
    assert all(e.params["amplification"] is False for e in entries)
    pr.close()


def test_every_record_says_where_the_noise_came_from(tiny_datalist: Path, tmp_path: Path) -> None:
    for reproducible, source in ((False, "csprng"), (True, "seeded")):
        config = tiny_config(
            tiny_datalist,
            privacy=PrivacyConfig(
                level="site", noise_multiplier=1.0, delta=1e-3, reproducible_noise=reproducible
            ),
        )
        (tmp_path / source).mkdir()
        pr = _privacy_round(tmp_path / source, config, _fed(3))
        assert {e.params["noise_source"] for e in pr.planned(0)} == {source}
        assert isinstance(pr.strategy, DPFedAvg) and pr.strategy.dp.reproducible is reproducible
        pr.close()


def test_distributed_noise_is_sized_for_the_honest_survivors(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    """n = 4, t = 3, c = 1: the server with one colluding site sees only t - c = 2 honest noise
    shares; they alone must meet the target (sized for t = 3, they gave epsilon ~10 for 8)."""
    config = tiny_config(
        tiny_datalist,
        rounds=2,
        aggregation=AggregationConfig(
            name="secagg", options={"threshold": 3, "corrupt_fraction": 0.25}
        ),
        privacy=PrivacyConfig(
            level="site",
            trust="distributed",
            mechanism="discrete_gaussian",
            target_epsilon=8.0,
            clip=0.5,
            delta=1e-3,
        ),
    )
    fed = _fed(4)
    pr = _privacy_round(tmp_path, config, fed)
    assert isinstance(pr.strategy, DPFedAvg)
    cfg = pr.strategy.distributed_config(4, 1000)  # what _distributed_sum encodes with
    assert cfg.threshold == 2
    coalition_sees = effective_noise_multiplier(cfg, 2)  # the honest shares only
    assert compute_epsilon(coalition_sees, 1.0, 2, 1e-3) <= 8.0 + 1e-6
    (entry, *_) = pr.planned(0)
    assert entry.params["honest_survivors"] == 2
    assert entry.params["colluders"] == 1
    assert entry.params["threshold"] == 3
    assert entry.noise_multiplier <= coalition_sees * (1 + 1e-12)
    pr.close()


def test_distributed_noise_without_an_honest_survivor_is_refused(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    # Refused when the configuration loads (the aggregation spec allows corrupt_fraction < 0.5)
    # or, at the latest, when the privacy round sizes the noise: either way before any round.
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        config = tiny_config(
            tiny_datalist,
            aggregation=AggregationConfig(
                name="secagg", options={"threshold": 2, "corrupt_fraction": 0.5}
            ),
            privacy=PrivacyConfig(
                level="site", trust="distributed", mechanism="skellam", noise_multiplier=1.0
            ),
        )
        _privacy_round(tmp_path, config, _fed(4))


def _final_model(run: Path) -> dict[str, np.ndarray]:
    import torch

    saved = torch.load(run / "models" / "fedavg.pt", weights_only=True)
    return {f"{k}/{n}": t.numpy() for k, v in saved.items() for n, t in v.items()}


def test_same_seed_same_run_but_fresh_dp_noise(tiny_datalist: Path, tmp_path: Path) -> None:
    """The published seed reproduces everything but the DP noise - unless the seeded mode is named."""
    models = {}
    for reproducible in (False, True):
        for attempt in ("a", "b"):
            config = tiny_config(
                tiny_datalist,
                rounds=1,
                privacy=PrivacyConfig(
                    level="site",
                    noise_multiplier=1.0,
                    clip=0.5,
                    delta=1e-3,
                    reproducible_noise=reproducible,
                ),
            )
            run = tmp_path / f"{reproducible}-{attempt}"
            run_experiment(config, run, log=lambda _: None)
            models[(reproducible, attempt)] = _final_model(run)
    fresh_a, fresh_b = models[(False, "a")], models[(False, "b")]
    assert any(not np.array_equal(fresh_a[k], fresh_b[k]) for k in fresh_a)
    seeded_a, seeded_b = models[(True, "a")], models[(True, "b")]
    assert all(np.array_equal(seeded_a[k], seeded_b[k]) for k in seeded_a)
