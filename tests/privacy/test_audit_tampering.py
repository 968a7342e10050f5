"""The audit against an attacker who doctors a real run folder (issue 10, item 8).

One small real DP-SGD run is made once per module; every test copies it, edits it the way an
attacker who can write the run folder would - keeping the hash chain, the head file and the
metrics anchors consistent wherever the attack allows - and checks that the audit fails with the
finding that names the attack. The untouched copy passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from secure_fl.data import PreprocessConfig, generate_federation
from secure_fl.privacy import (
    LEDGER_FILENAME,
    AuditResult,
    LedgerEntry,
    PrivacyConfig,
    PrivacyLedger,
    audit_run,
)
from secure_fl.privacy.audit import main

TARGET, DELTA = 6.0, 1e-3


def codes(result: AuditResult) -> set[str]:
    return {f.code for f in result.findings}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from secure_fl.training import (
        AggregationConfig,
        DataConfig,
        ExperimentConfig,
        ModelConfig,
        TrainConfig,
        run_experiment,
    )

    base = tmp_path_factory.mktemp("tamper")
    datalist = generate_federation(
        base / "data", sites=3, cases_per_site=(4, 3, 3), shape=(24, 24, 24), seed=5
    )
    config = ExperimentConfig(
        name="tamper",
        seed=3,
        rounds=2,
        data=DataConfig(datalist=str(datalist), val_fraction=0.34),
        preprocess=PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1),
        model=ModelConfig(channels=(4, 8, 16), num_res_units=1),
        train=TrainConfig(lr=3e-3, local_epochs=1, batch_size=2, device="cpu"),
        aggregation=AggregationConfig(name="plain"),
        privacy=PrivacyConfig(level="sample", target_epsilon=TARGET, clip=1.0, delta=DELTA),
    )
    run_experiment(config, base / "run", log=lambda _: None)
    return base / "run"


@pytest.fixture
def run(real_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(real_run, tmp_path / "run"))


def rows_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def write_rows(run: Path, rows: list[dict[str, Any]]) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def rebuild_ledger(run: Path, change: Any) -> None:
    """Rewrite the whole ledger through the ledger API (a valid chain and head file) with
    ``change(entry) -> entry`` applied to every intent, and every metrics row's epsilon and anchor
    made consistent with the new ledger: the attack the hash chain alone cannot see."""
    path = run / LEDGER_FILENAME
    with PrivacyLedger(path, readonly=True) as old:
        records = old.entries()
    path.unlink()
    path.with_name(path.name + ".head").unlink()
    rows = rows_of(run)
    by_round: dict[int, list[Any]] = {}
    for r in records:
        by_round.setdefault(r.entry.round, []).append(r)
    with PrivacyLedger(path) as new:
        for row in rows:
            for r in by_round[row["round"] - 1]:  # metrics from 1, the ledger's index from 0
                intent = new.record_intent(change(r.entry))
                new.confirm(intent, steps=change(r.entry).steps)
            row["privacy"]["epsilon"] = {s: new.spent(s, DELTA, "rdp") for s in new.sites()}
            row["privacy"]["max_epsilon"] = max(row["privacy"]["epsilon"].values())
            row["privacy"]["ledger_head"] = new.head().to_dict()
    write_rows(run, rows)


def with_params(entry: LedgerEntry, **params: Any) -> LedgerEntry:
    return LedgerEntry(**{**entry.__dict__, "params": {**entry.params, **params}})


def test_the_untouched_run_passes(run: Path) -> None:
    result = audit_run(run)
    assert result.status == "PASS", [(f.code, f.message) for f in result.findings]
    assert main([str(run), "--no-report"]) == 0


def test_a_row_with_its_own_inflated_delta_is_found(run: Path) -> None:
    """The last row reports epsilon at delta = 0.1 (a smaller epsilon, honestly computed at that
    delta): the audit used to recompute at the row's delta and accept it."""
    rows = rows_of(run)
    with PrivacyLedger(run / LEDGER_FILENAME, readonly=True) as ledger:
        rows[-1]["privacy"]["epsilon"] = {s: ledger.spent(s, 0.1, "rdp") for s in ledger.sites()}
    rows[-1]["privacy"]["delta"] = 0.1
    write_rows(run, rows)
    result = audit_run(run)
    assert {"REPORT_DELTA_MISMATCH", "EPSILON_UNDER_REPORTED"} <= codes(result)
    assert main([str(run), "--no-report"]) == 1


def test_a_row_claiming_the_prv_accountant_is_found(run: Path) -> None:
    """The configuration says rdp; the rows claim prv and report its (smaller) epsilon."""
    rows = rows_of(run)
    with PrivacyLedger(run / LEDGER_FILENAME, readonly=True) as ledger:
        for row in rows:
            upto = row["privacy"]["ledger_head"]["count"]
            row["privacy"]["accountant"] = "prv"
            row["privacy"]["epsilon"] = {
                s: _spent_upto(ledger, s, upto, "prv") for s in ledger.sites()
            }
    write_rows(run, rows)
    result = audit_run(run)
    assert {"REPORT_ACCOUNTANT_MISMATCH", "EPSILON_UNDER_REPORTED"} <= codes(result)


def _spent_upto(ledger: PrivacyLedger, site: str, upto: int, accountant: str) -> float:
    from secure_fl.privacy.accounting import epsilon_of_events
    from secure_fl.privacy.ledger import select_events

    return epsilon_of_events(select_events(ledger.entries(), site, upto=upto), DELTA, accountant)


def test_a_row_reusing_an_earlier_rounds_anchor_is_found(run: Path) -> None:
    """The last row carries round 0's anchor and epsilon: checked against that anchor alone, its
    report looked exact."""
    rows = rows_of(run)
    rows[-1]["privacy"]["ledger_head"] = rows[0]["privacy"]["ledger_head"]
    rows[-1]["privacy"]["epsilon"] = rows[0]["privacy"]["epsilon"]
    write_rows(run, rows)
    result = audit_run(run)
    assert {"ANCHOR_STALE", "ANCHOR_NOT_MONOTONE", "EPSILON_UNDER_REPORTED"} <= codes(result)
    stale = next(f for f in result.findings if f.code == "ANCHOR_STALE")
    assert stale.round == rows[-1]["round"]


def test_a_ledger_rewritten_with_half_the_sampling_rate_and_steps_is_found(run: Path) -> None:
    """A consistent forgery: a fresh ledger (valid chain and head) whose records claim q/2 and
    steps/2, with metrics epsilons and anchors recomputed to match. Only re-deriving q and steps
    from config.json and the datalist split exposes it."""

    def halve(e: LedgerEntry) -> LedgerEntry:
        return LedgerEntry(
            **{**e.__dict__, "sample_rate": e.sample_rate / 2, "steps": max(1, e.steps // 2)}
        )

    rebuild_ledger(run, halve)
    result = audit_run(run)
    assert "CHAIN_BROKEN" not in codes(result) and "ANCHOR_MISMATCH" not in codes(result)
    assert {"SAMPLING_BELOW_DERIVED", "STEPS_BELOW_DERIVED"} <= codes(result)
    # ... and epsilon is recomputed with the derived q and steps: the forged reports are too low
    assert "EPSILON_UNDER_REPORTED" in codes(result)
    assert result.status == "FAIL"


def test_a_ledger_rewritten_with_less_noise_than_the_target_needs_is_found(run: Path) -> None:
    """A consistent forgery that lowers the noise and the recorded calibrated multiplier: the
    audit recalibrates the least noise from target_epsilon itself."""

    def lower(e: LedgerEntry) -> LedgerEntry:
        sigma = e.noise_multiplier * 0.8
        changed = with_params(e, calibrated_noise_multiplier=sigma)
        return LedgerEntry(**{**changed.__dict__, "noise_multiplier": sigma})

    rebuild_ledger(run, lower)
    result = audit_run(run)
    assert {"NOISE_BELOW_CONFIG", "EPSILON_ABOVE_TARGET"} <= codes(result)


def test_seeded_noise_is_reported_as_predictable(run: Path) -> None:
    rebuild_ledger(run, lambda e: with_params(e, noise_source="seeded"))
    result = audit_run(run)
    assert "NOISE_PREDICTABLE" in codes(result) and result.status == "FAIL"


def test_records_without_a_noise_source_are_reported(run: Path) -> None:
    def strip(e: LedgerEntry) -> LedgerEntry:
        params = {k: v for k, v in e.params.items() if k != "noise_source"}
        return LedgerEntry(**{**e.__dict__, "params": params})

    rebuild_ledger(run, strip)
    result = audit_run(run)
    assert codes(result) == {"NOISE_SOURCE_UNKNOWN"}
    assert result.status == "FAIL"


def test_a_missing_datalist_is_not_silently_trusted(run: Path, tmp_path: Path) -> None:
    result = audit_run(run, datalist=tmp_path / "nowhere.json")
    assert "DATALIST_UNAVAILABLE" in codes(result) and not result.ok


# ---------------------------------------------------------------------------------------------
# a truncated tail (the attack: a real run cut back to its first round, ledger rebuilt through
# the ledger API with its head, metrics.jsonl rewritten; the checkpoint, models and report of
# the whole run left in place) and inflated noise


def truncate(run: Path, keep: int) -> None:
    """Cut the run back to its first ``keep`` rounds: a fresh ledger (valid chain and head) with
    only those rounds' records, and metrics.jsonl with only their rows, epsilons and anchors."""
    path = run / LEDGER_FILENAME
    with PrivacyLedger(path, readonly=True) as old:
        records = old.entries()
    path.unlink()
    path.with_name(path.name + ".head").unlink()
    rows = [row for row in rows_of(run) if row["round"] <= keep]
    with PrivacyLedger(path) as new:
        for row in rows:
            for r in records:
                if r.entry.round == row["round"] - 1:
                    new.confirm(new.record_intent(r.entry), steps=r.entry.steps)
            row["privacy"]["epsilon"] = {s: new.spent(s, DELTA, "rdp") for s in new.sites()}
            row["privacy"]["max_epsilon"] = max(row["privacy"]["epsilon"].values())
            row["privacy"]["ledger_head"] = new.head().to_dict()
    write_rows(run, rows)


def test_a_truncated_tail_is_found_by_the_runs_own_artefacts(run: Path) -> None:
    """checkpoints/fedavg.pt says round 2 finished and models/report exist, but the ledger and
    metrics stop at round 1: the ledger under-records (it used to PASS with RUN_INCOMPLETE at
    info severity and the truncated epsilon)."""
    truncate(run, keep=1)
    result = audit_run(run)
    assert "CHAIN_BROKEN" not in codes(result) and "ANCHOR_MISMATCH" not in codes(result)
    ahead = [f for f in result.findings if f.code == "ARTEFACTS_AHEAD_OF_LEDGER"]
    assert {f.severity for f in ahead} == {"error"}
    assert any("checkpoints/fedavg.pt says round 2" in f.message for f in ahead)
    assert any("models/fedavg.pt" in f.message for f in ahead)
    assert ("RUN_INCOMPLETE", "warning") in {(f.code, f.severity) for f in result.findings}
    assert result.status == "FAIL"
    assert main([str(run), "--no-report"]) == 1


def test_a_truncated_tail_without_its_artefacts_still_fails(run: Path) -> None:
    """Checkpoint, models and report deleted too: an unfinished run's spend is not final, so a
    ledger ending before config.json's rounds without a budget stop is not PASS."""
    truncate(run, keep=1)
    for path in [*run.glob("checkpoints/*.pt"), *run.glob("models/*.pt"), run / "report.md"]:
        path.unlink()
    result = audit_run(run)
    assert [(f.code, f.severity) for f in result.findings] == [("RUN_INCOMPLETE", "warning")]
    assert result.status == "FAIL"


def test_a_truncated_tail_with_a_forged_budget_stop_is_found(run: Path) -> None:
    """stopped.json forged to say a budget refused round 2 (checkpoint deleted): one more round
    stays within target_epsilon, so the stop explains nothing."""
    truncate(run, keep=1)
    (run / "checkpoints" / "fedavg.pt").unlink()
    (run / "stopped.json").write_text(json.dumps({"strategy": "fedavg", "round": 2}))
    result = audit_run(run)
    assert "STOP_UNJUSTIFIED" in codes(result) and result.status == "FAIL"


def test_a_ledger_rewritten_with_more_noise_than_the_target_needs_is_found(run: Path) -> None:
    """A consistent forgery claiming 3x the noise (and 3x the calibrated multiplier): a smaller
    epsilon. config.json's target fixes the noise; the audit credits no more than it re-derives
    and recomputes the untouched run's epsilon."""
    honest = audit_run(run).federation_epsilon

    def triple(e: LedgerEntry) -> LedgerEntry:
        sigma = e.noise_multiplier * 3
        changed = with_params(e, calibrated_noise_multiplier=sigma)
        return LedgerEntry(**{**changed.__dict__, "noise_multiplier": sigma})

    rebuild_ledger(run, triple)
    result = audit_run(run)
    assert "CHAIN_BROKEN" not in codes(result) and "ANCHOR_MISMATCH" not in codes(result)
    above = [f for f in result.findings if f.code == "NOISE_ABOVE_DERIVED"]
    assert above and {f.severity for f in above} == {"error"}
    assert "EPSILON_UNDER_REPORTED" in codes(result) and result.status == "FAIL"
    for acc, value in honest.items():
        assert result.federation_epsilon[acc] == pytest.approx(value, rel=1e-9)


def test_a_forged_resume_recalibration_is_not_credited(run: Path) -> None:
    """The inflated noise comes with params claiming a resume recalibration (x3 from round 2):
    the audit re-derives the factor from the ledger's earlier records (nothing was re-run, so
    1.0) and still accounts the records at the calibrated noise."""

    def forged(e: LedgerEntry) -> LedgerEntry:
        if e.round == 0:
            return e
        sigma = e.noise_multiplier * 3
        changed = with_params(
            e, calibrated_noise_multiplier=sigma, resume_scale=3.0, resume_from_round=1
        )
        return LedgerEntry(**{**changed.__dict__, "noise_multiplier": sigma})

    rebuild_ledger(run, forged)
    result = audit_run(run)
    above = [f for f in result.findings if f.code == "NOISE_ABOVE_DERIVED"]
    assert above and all(f.round == 2 for f in above)
    assert "x1 re-derived for the resume at round 2" in above[0].message
    assert "EPSILON_UNDER_REPORTED" in codes(result) and result.status == "FAIL"
