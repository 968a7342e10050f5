"""The secure-fl command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# messages that speak the CLI: one `error:` line, exit 2, defaults in --help (issue 14)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    synth = _help(capsys, "data", "synth")
    assert "number of sites (institutions) (default: 4)" in synth
    assert "(default: 48 48 48)" in synth and "seed of the generator (>= 0) (default: 0)" in synth
    assert "--overwrite regenerate a folder that holds another synthetic federation" in synth
    assert "out output folder" in synth  # every argument of data synth says what it is
    simulate = _help(capsys, "simulate")
    for option in ("--rounds N", "--set KEY=VALUE", "--no-resume", "--run-dir"):
        assert option in simulate
    assert "(default: runs/<the config's name>)" in simulate
    check = _help(capsys, "data", "check")
    assert "(default: training)" in check and "(default: 0,1,2,3,4)" in check
    demo = _help(capsys, "demo")
    assert "(default: runs/demo)" in demo and "(default: 12)" in demo
    assert "(default: None)" not in demo + simulate + synth + check
    assert "(default: False)" not in demo + simulate + synth + check


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["simulate"], "the following arguments are required: config"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["data", "synth", "out", "--shape", "48", "48"], "argument --shape: expected 3"),
        (["data", "check", "x.json", "--workers", "0"], "argument --workers: must be an integer"),
        (["simulate", "c.toml", "--rounds", "-1"], "argument --rounds: must be an integer >= 1"),
        (["simulate", "missing.toml"], "config file not found: missing.toml"),
        (["audit", "no-such-run"], "run_dir no-such-run is not a folder"),
        (["secagg-demo", "--sites", "2"], "--sites must be >= 3"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    assert message in _error_line(capsys)


def test_data_synth_speaks_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    small = ["--sites", "2", "--shape", "16", "16", "16"]
    assert main(["data", "synth", str(out), *small, "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["data", "synth", str(out), *small, "--seed", "2"]) == 2
    line = _error_line(capsys)
    assert "seed: 1 -> 2" in line and f"secure-fl data synth {out} --overwrite" in line
    assert "out_dir" not in line and "pass overwrite=True" not in line
    assert main(["data", "synth", str(out), *small, "--seed", "2", "--overwrite"]) == 0
    assert '"seed": 2' in (out / "manifest.json").read_text()
