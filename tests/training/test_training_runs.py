"""Federated runs on tiny volumes: every strategy, resumption, secure vs plain FedAvg."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import tiny_config

from secure_fl.training import STRATEGIES, AggregationConfig, run_experiment
from secure_fl.training.model import state_digest


def _final_state(run: Path, strategy: str) -> dict[str, np.ndarray]:
    models = torch.load(run / "models" / f"{strategy}.pt", weights_only=True)
    return {f"{k}/{n}": t.numpy() for k, v in models.items() for n, t in v.items()}


def test_two_rounds_of_every_strategy(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_datalist, strategies=STRATEGIES)
    lines: list[str] = []
    summary = run_experiment(config, tmp_path / "run", log=lines.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # rounds are numbered from 1 in metrics.jsonl
    assert {(r["strategy"], r["round"]) for r in rows} == {
        (s, r) for s in STRATEGIES for r in (1, 2)
    }
    for row in rows:
        assert 0.0 <= row["pooled_dice"] <= 1.0
        assert set(row["dice"]) == {"site-A", "site-B", "site-C"}
        assert row["steps"] > 0
    assert set(summary.pooled) == set(STRATEGIES)
    report = (tmp_path / "run" / "report.md").read_text()
    for strategy in STRATEGIES:
        assert f"| {strategy} |" in report
    assert (tmp_path / "run" / "dice_vs_rounds.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rounds"] == 2
    assert any("round 2/2" in line for line in lines)
    # ensemble and local keep one model per site, the others one global model
    assert set(torch.load(tmp_path / "run" / "models" / "ensemble.pt", weights_only=True)) == {
        "site-A",
        "site-B",
        "site-C",
    }
    assert set(torch.load(tmp_path / "run" / "models" / "fedavg.pt", weights_only=True)) == {
        "global"
    }


def test_resume_after_interruption_gives_the_same_model(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_datalist, rounds=3)
    run_experiment(config, tmp_path / "straight", log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "crashed", log=lambda _: None, stop_after=("fedavg", 1))
    # a torn metrics line, as a crash in the middle of a write leaves it
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"strategy": "fedavg", "rou')
    run_experiment(config, tmp_path / "crashed", log=lambda _: None)
    straight = _final_state(tmp_path / "straight", "fedavg")
    resumed = _final_state(tmp_path / "crashed", "fedavg")
    assert state_digest(straight) == state_digest(resumed)
    rows = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1, 2, 3]


def test_resume_refuses_another_configuration(tiny_datalist: Path, tmp_path: Path) -> None:
    from secure_fl.errors import ConfigError

    run_experiment(tiny_config(tiny_datalist, rounds=1), tmp_path / "run", log=lambda _: None)
    with pytest.raises(ConfigError, match="another configuration"):
        run_experiment(tiny_config(tiny_datalist, rounds=2, seed=9), tmp_path / "run")


def test_fedavg_through_secagg_plus_matches_plain_fedavg(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    # One round: the models differ only by the quantisation error of the aggregate. (Over more
    # rounds Adam amplifies any difference, so later rounds are compared by Dice in the benchmark.)
    plain = run_experiment(
        tiny_config(tiny_datalist, rounds=1), tmp_path / "plain", log=lambda _: None
    )
    secure = run_experiment(
        tiny_config(
            tiny_datalist,
            rounds=1,
            aggregation=AggregationConfig(name="secagg+", options={"seed": 1}),
        ),
        tmp_path / "secure",
        log=lambda _: None,
    )
    a = _final_state(tmp_path / "plain", "fedavg")
    b = _final_state(tmp_path / "secure", "fedavg")
    rows = [json.loads(x) for x in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    bound = rows[0]["aggregation"]["max_error"]
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert 0 < worst <= bound + 1e-6  # + float32 rounding of weights of magnitude up to ~8
    assert abs(plain.pooled["fedavg"] - secure.pooled["fedavg"]) < 1e-3
    assert rows[0]["aggregation"]["aggregator"] == "secagg+"
    assert rows[0]["aggregation"]["clipped_total"] == 0


def test_dropout_of_a_site_in_a_round(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=1,
        dropouts={"1": ["site-B"]},  # site-B drops out of round 1
        aggregation=AggregationConfig(name="secagg", options={"seed": 2}),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["aggregation"]["dropped"] == ["site-B"]
    assert row["aggregation"]["included"] == ["site-A", "site-C"]


def test_a_private_site_releases_no_unnoised_statistic(tiny_datalist: Path) -> None:
    """Under DP (``private``) the trainer's ExchangeObject carries no training loss, and at site
    level (no DP-SGD) it refuses to score its own, unreleased local model (issue 10, item 6)."""
    from monai.fl.utils.exchange_object import ExchangeObject

    from secure_fl.data import load_datalist, split_by_site
    from secure_fl.errors import ConfigError
    from secure_fl.training import SiteTrainer

    config = tiny_config(tiny_datalist)
    train, val = split_by_site(load_datalist(tiny_datalist), val_fraction=0.34, seed=3)["site-A"]
    site = SiteTrainer(
        "site-A", train, val, preprocess=config.preprocess, model=config.model, train=config.train
    )
    site.train(ExchangeObject(weights=None), {"round": 0})
    assert "train_loss" in (site.get_weights().statistics or {})  # not private: nothing to hide
    site.private = True
    assert "train_loss" not in (site.get_weights().statistics or {})
    with pytest.raises(ConfigError, match="not released"):
        site.evaluate(ExchangeObject(weights=None))
    released = site.get_weights().weights
    assert released is not None
    assert "val_dice" in (site.evaluate(ExchangeObject(weights=released)).metrics or {})
