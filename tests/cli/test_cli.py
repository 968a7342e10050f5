"""The secure-fl command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from secure_fl.cli import main


def test_demo_runs_and_checks_the_exact_sum(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["secagg-demo", "--sites", "5", "--protocol", "secagg"]) == 0
    out = capsys.readouterr().out
    assert "exactly: True" in out
    assert "all checks passed" in out


def test_demo_refuses_too_few_sites(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["secagg-demo", "--sites", "2"]) == 2
    assert "--sites must be >= 3" in capsys.readouterr().err


def test_console_entry_point_reports_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "secure_fl.cli", "--version"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.startswith("secure-fl ")
