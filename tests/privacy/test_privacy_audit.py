"""The audit on synthetic run folders: a clean run has no findings; every planted fault is found."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from privacy_testutils import sample_config, sample_entry, write_run

from secure_fl.privacy import (
    LEDGER_FILENAME,
    AuditResult,
    PrivacyConfig,
    audit_run,
    calibrate_noise,
    compute_epsilon,
)
from secure_fl.privacy.audit import main


def codes(result: AuditResult) -> set[str]:
    return {f.code for f in result.findings}


def site_entry(site: str, rnd: int, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "level": "site",
        "mechanism": "skellam",
        "sample_rate": 1.0,
        "steps": 1,
        "survivors": 3,
        "noise_multiplier": 4.0,  # effective (Gaussian-equivalent) at threshold survivors
        "params": {
            "nominal_noise_multiplier": 4.07,  # the z the noise was sized with
            "threshold": 3,
            "bits": 32,
            "scale": 1024.0,
            "sigma_per_site": 2.31,
            "noise_source": "csprng",
        },
    }
    values.update(overrides)
    return sample_entry(site, rnd, **values)


SITE_CONFIG = PrivacyConfig(
    level="site", trust="distributed", mechanism="skellam", noise_multiplier=4.0, delta=1e-5
)
SITES3 = ("a", "b", "c")


# ---------------------------------------------------------------------------------------------
# clean runs


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_clean_sample_level_run_has_no_findings(tmp_path: Path, accountant: str) -> None:
    config = sample_config(accountant=accountant)
    run = write_run(tmp_path / "run", config)
    result = audit_run(run)
    assert result.findings == []
    assert result.ok
    expected = compute_epsilon(1.0, 0.05, 60, 1e-5)
    for site in ("hospital-a", "hospital-b"):
        assert result.epsilon[site]["rdp"] == pytest.approx(expected)
        assert result.epsilon[site]["prv"] <= result.epsilon[site]["rdp"]
    assert len(result.curve) == 3
    assert main([str(run)]) == 0
    report = json.loads((run / "audit.json").read_text())
    assert report["ok"] is True and report["findings"] == []
    assert "PASS" in (run / "audit.md").read_text()
    assert (run / "epsilon_vs_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clean_distributed_site_level_run_has_no_findings(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", SITE_CONFIG, sites=SITES3, entry=site_entry)
    assert audit_run(run).findings == []


def test_clean_target_epsilon_run_has_no_findings(tmp_path: Path) -> None:
    sigma = calibrate_noise(6.0, 0.05, 60, 1e-5)
    config = PrivacyConfig(level="sample", target_epsilon=6.0, delta=1e-5)

    def entry(site: str, rnd: int) -> Any:
        return sample_entry(
            site,
            rnd,
            noise_multiplier=sigma,
            params={"calibrated_noise_multiplier": sigma, "noise_source": "csprng"},
        )

    assert audit_run(write_run(tmp_path / "run", config, entry=entry)).findings == []


# ---------------------------------------------------------------------------------------------
# planted faults


def test_lowered_noise_is_found(tmp_path: Path) -> None:
    def entry(site: str, rnd: int) -> Any:
        sigma = 0.8 if (site, rnd) == ("hospital-b", 1) else 1.0
        return sample_entry(site, rnd, noise_multiplier=sigma)

    run = write_run(tmp_path / "run", sample_config(), entry=entry)
    result = audit_run(run)
    (finding,) = [f for f in result.findings if f.code == "NOISE_BELOW_CONFIG"]
    # the ledger's round index 1 is round 2 for people (findings number rounds from 1)
    assert (finding.site, finding.round, finding.severity) == ("hospital-b", 2, "error")
    assert "0.8" in finding.message
    assert main([str(run), "--no-report"]) == 1


def test_noise_below_calibrated_is_found(tmp_path: Path) -> None:
    sigma = calibrate_noise(6.0, 0.05, 60, 1e-5)
    config = PrivacyConfig(level="sample", target_epsilon=6.0, delta=1e-5)

    def entry(site: str, rnd: int) -> Any:
        used = sigma * (0.9 if rnd == 2 else 1.0)
        return sample_entry(
            site,
            rnd,
            noise_multiplier=used,
            params={"calibrated_noise_multiplier": sigma, "noise_source": "csprng"},
        )

    result = audit_run(write_run(tmp_path / "run", config, entry=entry))
    assert {"NOISE_BELOW_CONFIG", "EPSILON_ABOVE_TARGET"} <= codes(result)


def test_missing_round_is_found(tmp_path: Path) -> None:
    def entry(site: str, rnd: int) -> Any:
        return None if rnd == 1 else sample_entry(site, rnd)

    run = write_run(tmp_path / "run", sample_config(), entry=entry, rounds=3, metrics_rounds=4)
    result = audit_run(run)
    missing = sorted(f.round for f in result.findings if f.code == "MISSING_ROUND")
    assert missing == [2, 4]  # a gap in the ledger, and a metrics round with no ledger record
    assert main([str(run), "--no-report"]) == 1


def test_site_missing_from_a_site_level_round_is_found(tmp_path: Path) -> None:
    def entry(site: str, rnd: int) -> Any:
        return None if (site, rnd) == ("b", 2) else site_entry(site, rnd)

    result = audit_run(write_run(tmp_path / "run", SITE_CONFIG, sites=SITES3, entry=entry))
    (finding,) = [f for f in result.findings if f.code == "MISSING_ROUND"]
    assert (finding.site, finding.round) == ("b", 3)


def test_under_reported_epsilon_is_found(tmp_path: Path) -> None:
    def report(site: str, rnd: int, eps: float) -> float:
        return eps * 0.9 if (site, rnd) == ("hospital-a", 2) else eps

    run = write_run(tmp_path / "run", sample_config(), report=report)
    result = audit_run(run)
    (finding,) = [f for f in result.findings if f.code == "EPSILON_UNDER_REPORTED"]
    assert (finding.site, finding.round) == ("hospital-a", 3)
    assert main([str(run), "--no-report"]) == 1


def test_distributed_noise_sized_below_config_is_found(tmp_path: Path) -> None:
    def entry(site: str, rnd: int) -> Any:
        if rnd == 0:
            return site_entry(site, rnd, noise_multiplier=3.9)  # sized too small
        return site_entry(site, rnd)

    result = audit_run(write_run(tmp_path / "run", SITE_CONFIG, sites=SITES3, entry=entry))
    found = [f for f in result.findings if f.code == "NOISE_BELOW_CONFIG"]
    assert sorted((f.site, f.round) for f in found) == [(s, 1) for s in SITES3]


def test_survivors_below_threshold_are_found(tmp_path: Path) -> None:
    def confirm(site: str, rnd: int) -> dict[str, Any]:
        return {"survivors": 2} if rnd == 1 else {}

    run = write_run(tmp_path / "run", SITE_CONFIG, sites=SITES3, entry=site_entry, confirm=confirm)
    result = audit_run(run)
    found = [f for f in result.findings if f.code == "SURVIVORS_BELOW_THRESHOLD"]
    assert sorted(f.site or "" for f in found) == list(SITES3)
    assert all(f.round == 2 for f in found)
    # ... and accounted with the smaller effective noise (the run reported the same)
    assert codes(result) == {"SURVIVORS_BELOW_THRESHOLD"}
    assert main([str(run), "--no-report"]) == 1


def test_tampered_ledger_is_found(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", sample_config())
    conn = sqlite3.connect(run / LEDGER_FILENAME)
    with conn:
        conn.execute("UPDATE records SET noise_multiplier=3.0 WHERE seq=5")
    conn.close()
    result = audit_run(run)
    assert "CHAIN_BROKEN" in codes(result)
    assert "record 5" in next(f.message for f in result.findings if f.code == "CHAIN_BROKEN")
    assert main([str(run), "--no-report"]) == 1


def test_truncated_tail_with_rewritten_head_is_found(tmp_path: Path) -> None:
    """The last round's records are deleted and the head file fixed up to match: the ledger alone
    looks intact, but metrics.jsonl's anchors and reported epsilon expose it."""
    run = write_run(tmp_path / "run", sample_config())
    path = run / LEDGER_FILENAME
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM records WHERE round=2")
        count, last = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC").fetchone()
    conn.close()
    head_file = path.with_name(path.name + ".head")
    head = json.loads(head_file.read_text())
    head.update({"count": count, "hash": last, "pending": None})
    head_file.write_text(json.dumps(head))
    result = audit_run(run)
    assert "CHAIN_BROKEN" not in codes(result)
    assert {"ANCHOR_MISMATCH", "EPSILON_OVER_REPORTED", "MISSING_ROUND"} <= codes(result)


def test_crash_leaves_a_warning_and_counts_the_intent(tmp_path: Path) -> None:
    def confirm(site: str, rnd: int) -> dict[str, Any] | None:
        return None if (site, rnd) == ("hospital-a", 2) else {}

    run = write_run(tmp_path / "run", sample_config(), confirm=confirm)
    result = audit_run(run)
    (finding,) = result.findings
    assert (finding.code, finding.severity, finding.site) == (
        "UNCONFIRMED_INTENT",
        "warning",
        "hospital-a",
    )
    assert result.epsilon["hospital-a"]["rdp"] == pytest.approx(
        compute_epsilon(1.0, 0.05, 60, 1e-5)
    )
    assert main([str(run), "--no-report"]) == 1


def test_budget_overrun_is_found(tmp_path: Path) -> None:
    config = sample_config(site_budget=compute_epsilon(1.0, 0.05, 40, 1e-5))
    result = audit_run(write_run(tmp_path / "run", config))  # 3 rounds, budget for 2
    assert "BUDGET_EXCEEDED" in codes(result)


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert main([str(tmp_path)]) == 2  # a folder without config.json
    assert "config.json" in capsys.readouterr().err
    assert main([]) == 2


def test_accountant_disagreement_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A (planted) broken RDP accountant that reports half the epsilon falls below the PRV value
    by more than the known gap: the two-accountant cross-check catches it."""
    import secure_fl.privacy.audit as audit_module

    run = write_run(tmp_path / "run", sample_config())
    honest = audit_module.epsilon_of_events

    def broken(events: Any, delta: float, accountant: str = "rdp", **kw: Any) -> float:
        value = honest(events, delta, accountant, **kw)
        return value / 2 if accountant == "rdp" else value

    monkeypatch.setattr(audit_module, "epsilon_of_events", broken)
    result = audit_run(run)
    assert "ACCOUNTANT_DISAGREEMENT" in codes(result)


# ---------------------------------------------------------------------------------------------
# status: no DP is not PASS; a budget stop is explained


def test_a_run_without_dp_is_not_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "t", "rounds": 2, "privacy": {}}))
    (run / "metrics.jsonl").write_text(json.dumps({"strategy": "fedavg", "round": 1}) + "\n")
    result = audit_run(run)
    assert result.status == "NO DP" and not result.ok
    assert "NO_DP" in codes(result)
    assert result.federation_epsilon["rdp"] == float("inf")
    assert main([str(run)]) == 3
    out = capsys.readouterr().out
    assert "NO DP" in out and "epsilon = infinity" in out
    assert "NO DP" in (run / "audit.md").read_text()
    assert json.loads((run / "audit.json").read_text())["status"] == "NO DP"


def test_a_budget_stop_is_explained_and_still_passes(tmp_path: Path) -> None:
    # a budget between two rounds' spend (40 steps) and three rounds' (60): round 3 is refused
    budget = round(compute_epsilon(1.0, 0.05, 50, 1e-5), 3)
    run = write_run(tmp_path / "run", sample_config(site_budget=budget), rounds=2)
    config = json.loads((run / "config.json").read_text())
    config["rounds"] = 5
    (run / "config.json").write_text(json.dumps(config))
    message = "round refused before it runs: site 'hospital-a': spent ε=1.2, remaining 0.1"
    (run / "stopped.json").write_text(
        json.dumps(
            {"reason": "privacy_budget", "strategy": "fedavg", "round": 3, "message": message}
        )
    )
    result = audit_run(run)
    (stop,) = result.findings
    assert (stop.code, stop.severity, stop.round) == ("BUDGET_STOP", "info", 3)  # from 1
    assert "before round 3 of 5" in stop.message
    assert f"site_budget={budget:g}" in stop.message and "remaining 0.1" in stop.message
    assert result.status == "PASS"
    assert main([str(run), "--no-report"]) == 0


def test_a_crashed_round_refused_on_resume_is_a_consistent_stop(tmp_path: Path) -> None:
    """Round 3 crashed (its intents unconfirmed, no metrics row); the resume refused to re-run it
    (the budget counts those intents in full): stopped.json names the ledger's last round itself."""
    budget = round(compute_epsilon(1.0, 0.05, 70, 1e-5), 3)  # 3 rounds fit, a 4th does not
    run = write_run(
        tmp_path / "run",
        sample_config(site_budget=budget),
        rounds=3,
        confirm=lambda s, r: None if r == 2 else {},
    )
    config = json.loads((run / "config.json").read_text())
    config["rounds"] = 5
    (run / "config.json").write_text(json.dumps(config))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (run / "stopped.json").write_text(json.dumps({"strategy": "fedavg", "round": 3}))
    result = audit_run(run)
    assert codes(result) == {"BUDGET_STOP", "UNCONFIRMED_INTENT"}, result.findings


def test_a_budget_stop_that_no_budget_explains_is_found(tmp_path: Path) -> None:
    """A forged stopped.json covering a cut ledger: one more round stays far within the site
    budget (20), so no budget refused it and the early end is not explained."""
    run = write_run(tmp_path / "run", sample_config(), rounds=2)
    config = json.loads((run / "config.json").read_text())
    config["rounds"] = 5
    (run / "config.json").write_text(json.dumps(config))
    (run / "stopped.json").write_text(json.dumps({"strategy": "fedavg", "round": 3}))
    result = audit_run(run)
    assert "STOP_UNJUSTIFIED" in codes(result) and result.status == "FAIL"


def test_a_ledger_ending_early_without_a_stop_is_reported(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", sample_config(), rounds=2)
    config = json.loads((run / "config.json").read_text())
    config["rounds"] = 5
    (run / "config.json").write_text(json.dumps(config))
    result = audit_run(run)
    # an unfinished run's spend is not final: it does not PASS (issue: truncated tails passed)
    assert [(f.code, f.severity) for f in result.findings] == [("RUN_INCOMPLETE", "warning")]
    assert result.status == "FAIL"


def test_a_stop_file_naming_a_round_after_a_gap_is_found(tmp_path: Path) -> None:
    """stopped.json explains an early end only when it names the round right after the ledger's
    last: a stop "before round 5" of a ledger ending at round 2 hides rounds 3 and 4."""
    run = write_run(tmp_path / "run", sample_config(), rounds=2)
    config = json.loads((run / "config.json").read_text())
    config["rounds"] = 5
    (run / "config.json").write_text(json.dumps(config))
    (run / "stopped.json").write_text(json.dumps({"strategy": "fedavg", "round": 5}))
    result = audit_run(run)
    assert "STOP_INCONSISTENT" in codes(result) and result.status == "FAIL"


def test_a_stop_file_contradicted_by_the_ledger_is_found(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", sample_config(), rounds=3)
    (run / "stopped.json").write_text(json.dumps({"strategy": "fedavg", "round": 1}))
    assert "STOP_INCONSISTENT" in codes(audit_run(run))


def test_site_level_records_claiming_amplification_are_found(tmp_path: Path) -> None:
    """Site-level records with q < 1: the server sees who takes part, so no amplification by
    site sampling may be claimed; the audit accounts them at q = 1."""

    def entry(site: str, rnd: int) -> Any:
        return site_entry(site, rnd, sample_rate=0.5)

    result = audit_run(write_run(tmp_path / "run", SITE_CONFIG, sites=SITES3, entry=entry))
    assert {"SAMPLING_BELOW_DERIVED", "EPSILON_UNDER_REPORTED"} <= codes(result)
