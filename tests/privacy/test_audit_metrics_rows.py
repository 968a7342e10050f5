"""The audit cross-checks metrics.jsonl against the ledger (secure_fl.privacy.audit.rows): one
row per released round, in order, with the survivors the ledger and the row's DP event count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_fl.privacy import PrivacyConfig, audit_run
from secure_fl.transport.config import AggregationSettings
from secure_fl.transport.privacy import ServerPrivacy

NAMES = {1: "a", 2: "b", 3: "c", 4: "d"}
WEIGHTS = dict.fromkeys(NAMES, 1.0)
DIM = 500
CENTRAL = PrivacyConfig(level="site", target_epsilon=8.0, delta=1e-5, clip=1.0)
DISTRIBUTED = PrivacyConfig(
    level="site", trust="distributed", mechanism="discrete_gaussian", target_epsilon=8.0
)


def _server(run: Path, privacy: PrivacyConfig, planned: int = 3) -> ServerPrivacy:
    return ServerPrivacy(
        privacy,
        run,
        rounds=planned,
        roster=list(NAMES.values()),
        dimension=DIM,
        aggregation=AggregationSettings(protocol="secagg+"),
        min_sites=4,
        federation="fed",
    )


def _run(run: Path, privacy: PrivacyConfig = CENTRAL, rounds: range = range(3)) -> Path:
    server = _server(run, privacy)
    for r in rounds:
        server.before_round(r, NAMES)
        server.apply(r, np.zeros(DIM), NAMES, WEIGHTS, {})
    server.finish(len(rounds))
    return run


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _write(run: Path, rows: list[dict[str, Any]]) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _codes(run: Path) -> tuple[str, set[str]]:
    result = audit_run(run)
    return result.status, {f.code for f in result.findings}


@pytest.mark.parametrize("privacy", [CENTRAL, DISTRIBUTED], ids=["central", "distributed"])
def test_an_honest_run_passes(tmp_path: Path, privacy: PrivacyConfig) -> None:
    assert _codes(_run(tmp_path, privacy)) == ("PASS", set())


def test_a_dropped_last_row_fails(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _write(run, _rows(run)[:-1])
    result = audit_run(run)
    assert result.status == "FAIL"
    (missing,) = [f for f in result.findings if f.code == "METRICS_ROW_MISSING"]
    assert missing.round == 3 and "round 3" in missing.message


def test_a_dropped_middle_row_fails(tmp_path: Path) -> None:
    run = _run(tmp_path)
    rows = _rows(run)
    _write(run, [rows[0], rows[2]])
    status, codes = _codes(run)
    assert status == "FAIL" and "METRICS_ROW_MISSING" in codes


def test_a_shrunk_survivors_list_fails(tmp_path: Path) -> None:
    run = _run(tmp_path)
    rows = _rows(run)
    rows[0]["survivors"] = ["a"]
    _write(run, rows)
    assert _codes(run) == ("FAIL", {"METRICS_SURVIVORS_MISMATCH"})


def test_a_survivors_list_shrunk_with_its_dp_event_fails_against_the_ledger(
    tmp_path: Path,
) -> None:
    # distributed trust: the ledger's confirmations record how many sites were in the sum
    run = _run(tmp_path, DISTRIBUTED)
    rows = _rows(run)
    rows[1]["survivors"] = ["a", "b"]
    rows[1]["dp_event"]["survivors"] = 2
    _write(run, rows)
    result = audit_run(run)
    assert result.status == "FAIL"
    (found,) = [f for f in result.findings if f.code == "METRICS_SURVIVORS_MISMATCH"]
    assert found.round == 2 and "ledger" in found.message


def test_renumbered_rows_fail(tmp_path: Path) -> None:
    run = _run(tmp_path)
    rows = _rows(run)
    _write(run, [rows[1], rows[0], rows[2]])
    status, codes = _codes(run)
    assert status == "FAIL" and "METRICS_ROW_ORDER" in codes


def test_an_identical_duplicate_row_is_tolerated_and_said(tmp_path: Path) -> None:
    run = _run(tmp_path)
    rows = _rows(run)
    _write(run, [rows[0], rows[1], rows[1], rows[2]])
    result = audit_run(run)
    assert result.status == "PASS", [f.message for f in result.findings]
    (dup,) = [f for f in result.findings if f.code == "METRICS_ROW_DUPLICATE"]
    assert dup.severity == "info" and dup.round == 2


def test_a_server_that_re_ran_a_released_round_after_a_crash_is_not_failed_by_the_rows(
    tmp_path: Path,
) -> None:
    # round 2's row was written, the server crashed before its checkpoint, and a restarted
    # server ran round 2 again (a second row, a later anchor, charged twice) and round 3
    _run(tmp_path, rounds=range(2))
    _run(tmp_path, rounds=range(1, 3))
    assert [r["round"] for r in _rows(tmp_path)] == [1, 2, 2, 3]
    result = audit_run(tmp_path)
    assert not {f.code for f in result.findings} & {
        "METRICS_ROW_MISSING",
        "METRICS_ROW_ORDER",
        "METRICS_SURVIVORS_MISMATCH",
        "METRICS_ROW_DUPLICATE",
    }
