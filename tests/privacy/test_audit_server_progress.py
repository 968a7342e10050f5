"""The audit reads the gRPC server's own progress files (issue 11, second review, b3):
``checkpoint.json`` (``completed_rounds``) and ``rounds/round-NNNNNN.json`` that show more rounds
than the ledger and metrics.jsonl hold are ARTEFACTS_AHEAD_OF_LEDGER."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from secure_fl.privacy import PrivacyConfig, audit_run
from secure_fl.transport.config import AggregationSettings
from secure_fl.transport.privacy import ServerPrivacy

NAMES = {1: "a", 2: "b", 3: "c", 4: "d"}
DIM = 500


def _server_run(run: Path, ran: int, planned: int = 5) -> None:
    server = ServerPrivacy(
        PrivacyConfig(level="site", target_epsilon=8.0, delta=1e-5, clip=1.0),
        run,
        rounds=planned,
        roster=list(NAMES.values()),
        dimension=DIM,
        aggregation=AggregationSettings(protocol="secagg+"),
        min_sites=4,
        federation="fed",
    )
    for r in range(ran):
        server.before_round(r, NAMES)
        server.apply(r, np.zeros(DIM), NAMES, dict.fromkeys(NAMES, 1.0), {})
    server.finish(ran)


def _progress(run: Path, completed: int, *, records: bool = True) -> None:
    (run / "checkpoint.json").write_text(json.dumps({"completed_rounds": completed}))
    if records:
        (run / "rounds").mkdir(exist_ok=True)
        for r in range(completed):
            (run / "rounds" / f"round-{r:06d}.json").write_text("{}")
        (run / "rounds" / f"round-{completed:06d}-failed-1.json").write_text("{}")


def _ahead(run: Path) -> list[str]:
    return [f.message for f in audit_run(run).findings if f.code == "ARTEFACTS_AHEAD_OF_LEDGER"]


def test_the_server_progress_files_of_an_honest_run_pass(tmp_path: Path) -> None:
    _server_run(tmp_path, 5)
    _progress(tmp_path, 5)
    assert audit_run(tmp_path).status == "PASS"


@pytest.mark.parametrize("records", [True, False])
def test_a_checkpoint_ahead_of_the_ledger_is_flagged(tmp_path: Path, records: bool) -> None:
    _server_run(tmp_path, 4)  # the ledger and metrics lost round 5
    _progress(tmp_path, 5, records=records)
    (message,) = _ahead(tmp_path)
    assert "round 5 finished" in message


def test_a_round_record_ahead_of_the_ledger_is_flagged(tmp_path: Path) -> None:
    _server_run(tmp_path, 3)
    _progress(tmp_path, 3)
    assert _ahead(tmp_path) == []
    (tmp_path / "rounds" / "round-000004.json").write_text("{}")
    (message,) = _ahead(tmp_path)
    assert message.startswith("rounds/round-000004.json says round 5 finished")
