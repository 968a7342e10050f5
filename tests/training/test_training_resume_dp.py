"""Resuming an interrupted DP run never spends more than the target epsilon (issue 10, item 7)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from training_helpers import tiny_config

from secure_fl.data import PreprocessConfig
from secure_fl.privacy import LEDGER_FILENAME, PrivacyConfig, PrivacyLedger, audit_run
from secure_fl.training import AggregationConfig, run_experiment
from secure_fl.training.trainer import SiteTrainer

TARGET = 8.0


def _interrupt_in_round(monkeypatch: pytest.MonkeyPatch, round_id: int) -> None:
    """Ctrl-C in the middle of ``round_id``'s local training: the intents of that round are in the
    ledger (unconfirmed, counted as spent), its checkpoint is not."""
    honest = SiteTrainer.train

    def train(self: SiteTrainer, data: Any, extra: dict[str, Any] | None = None) -> None:
        if (extra or {}).get("round") == round_id:
            raise KeyboardInterrupt("Ctrl-C")
        honest(self, data, extra)

    monkeypatch.setattr(SiteTrainer, "train", train)


def test_resume_after_a_mid_round_interrupt_keeps_the_target(
    tiny_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        aggregation=AggregationConfig(name="plain"),
        privacy=PrivacyConfig(level="site", target_epsilon=TARGET, clip=0.5, delta=1e-3),
    )
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_in_round(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, run, log=lambda _: None)
    lines: list[str] = []
    run_experiment(config, run, log=lines.append)  # "run the same command again to resume"
    with PrivacyLedger(run / LEDGER_FILENAME, readonly=True) as ledger:
        spent = {s: ledger.spent(s, 1e-3, "rdp") for s in ledger.sites()}
    assert spent and max(spent.values()) <= TARGET + 1e-9, spent
    assert any("recalibrat" in line for line in lines), lines
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]  # numbered from 1
    assert rows[-1]["privacy"]["max_epsilon"] <= TARGET + 1e-9
    # the crashed round's intents are the only finding (a warning), the rest audits clean
    result = audit_run(run)
    assert {f.code for f in result.findings} == {"UNCONFIRMED_INTENT"}, result.findings


def test_sample_level_resume_recalibrates_each_sites_noise(
    tiny_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DP-SGD: each site's own noise multiplier is raised just enough for its remaining rounds."""
    config = tiny_config(
        tiny_datalist,
        rounds=2,
        preprocess=PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1),
        privacy=PrivacyConfig(level="sample", target_epsilon=TARGET, clip=1.0, delta=1e-3),
    )
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_in_round(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, run, log=lambda _: None)
    lines: list[str] = []
    run_experiment(config, run, log=lines.append)
    note = next(line for line in lines if "recalibrat" in line)
    assert all(site in note for site in ("site-A", "site-B", "site-C"))
    with PrivacyLedger(run / LEDGER_FILENAME, readonly=True) as ledger:
        spent = [ledger.spent(s, 1e-3, "rdp") for s in ledger.sites()]
    assert len(spent) == 3 and max(spent) <= TARGET + 1e-9
    result = audit_run(run)
    assert {f.code for f in result.problems} == {"UNCONFIRMED_INTENT"}, result.findings
    # the raised noise is recorded verifiably: the audit re-derives the factor and credits it ...
    with PrivacyLedger(run / LEDGER_FILENAME, readonly=True) as ledger:
        records = ledger.entries()
    resumed = [r.entry for r in records if "resume_scale" in r.entry.params]
    assert len(resumed) == 3 and all(e.round == 1 for e in resumed)
    assert all(e.params["resume_from_round"] == 1 and e.params["resume_scale"] > 1 for e in resumed)
    # ... and no more: a ledger rebuilt claiming a larger factor is accounted at the re-derived one
    (run / LEDGER_FILENAME).unlink()
    (run / (LEDGER_FILENAME + ".head")).unlink()
    with PrivacyLedger(run / LEDGER_FILENAME) as forged:
        for r in records:
            e = r.entry
            if "resume_scale" in e.params:
                params = {**e.params, "resume_scale": e.params["resume_scale"] * 2}
                e = dataclasses.replace(e, noise_multiplier=e.noise_multiplier * 2, params=params)
            intent = forged.record_intent(e)
            if r.confirmed:
                forged.confirm(intent, steps=r.confirmed_steps or e.steps)
    codes = {f.code for f in audit_run(run).findings}
    assert "NOISE_ABOVE_DERIVED" in codes, codes


def test_a_budget_stop_ends_gracefully_and_the_audit_explains_it(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    """A round refused by the site budget ends the run: models, report and stopped.json are
    written, nothing raises; the audit names the budget and the round, and passes."""
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        privacy=PrivacyConfig(
            level="site", noise_multiplier=1.0, clip=0.5, delta=1e-3, site_budget=4.5
        ),
    )
    run = tmp_path / "run"
    lines: list[str] = []
    summary = run_experiment(config, run, log=lines.append)
    assert summary.stopped is not None and 1 < summary.stopped.round <= 3  # numbered from 1
    refused = summary.stopped.round
    assert "remaining" in summary.stopped.message
    assert any("stopped by the privacy budget" in line for line in lines)
    assert (run / "models" / "fedavg.pt").is_file()
    assert "Stopped by the privacy budget" in (run / "report.md").read_text()
    assert json.loads((run / "stopped.json").read_text())["round"] == refused
    result = audit_run(run)
    (stop,) = result.findings
    assert (stop.code, stop.severity, stop.round) == ("BUDGET_STOP", "info", refused)
    assert "site_budget=4.5" in stop.message
    assert result.status == "PASS"


def test_a_clean_resume_keeps_the_noise(tiny_datalist: Path, tmp_path: Path) -> None:
    """Stopped between rounds (nothing unconfirmed): the planned noise still fits, nothing is
    recalibrated and the result equals an uninterrupted run's spend."""
    config = tiny_config(
        tiny_datalist,
        rounds=2,
        privacy=PrivacyConfig(level="site", target_epsilon=TARGET, clip=0.5, delta=1e-3),
    )
    run_experiment(config, tmp_path / "straight", log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "resumed", log=lambda _: None, stop_after=("fedavg", 1))
    lines: list[str] = []
    run_experiment(config, tmp_path / "resumed", log=lines.append)
    assert not any("recalibrat" in line for line in lines)
    a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert a[-1]["privacy"]["epsilon"] == b[-1]["privacy"]["epsilon"]
    assert a[-1]["privacy"]["max_epsilon"] <= TARGET


def test_dp_runs_release_no_training_loss(
    tiny_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DP the un-noised training loss leaves no site: not in metrics.jsonl, not in the
    progress line, not in the trainer's ExchangeObject statistics (issue 10, item 6)."""
    released: list[set[str]] = []
    honest = SiteTrainer.get_weights

    def spy(self: SiteTrainer, extra: dict[str, Any] | None = None) -> Any:
        out = honest(self, extra)
        released.append(set(out.statistics or {}))
        return out

    monkeypatch.setattr(SiteTrainer, "get_weights", spy)
    config = tiny_config(
        tiny_datalist,
        rounds=1,
        privacy=PrivacyConfig(level="site", noise_multiplier=1.0, clip=0.5, delta=1e-3),
    )
    lines: list[str] = []
    run_experiment(config, tmp_path / "dp", log=lines.append)
    (row,) = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert "train_loss" not in row and "loss" not in json.dumps(row)
    assert not any(" loss " in line for line in lines)
    assert released and all("train_loss" not in keys for keys in released)
    # without DP the loss is still reported (nothing to protect)
    released.clear()
    run_experiment(tiny_config(tiny_datalist, rounds=1), tmp_path / "plain", log=lambda _: None)
    (row,) = [
        json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert "train_loss" in row and all("train_loss" in keys for keys in released)
