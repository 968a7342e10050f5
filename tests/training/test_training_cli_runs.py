"""`secure-fl simulate` on tiny runs: --rounds, --set, resume messages, config diffs, extending a
finished run, one round numbering (from 1) in metrics.jsonl, the console, the report and the
audit, and plots with integer round ticks and a legend that hides no line (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from training_helpers import tiny_config

from secure_fl.cli import main
from secure_fl.privacy import PrivacyConfig, audit_run
from secure_fl.training import run_experiment

TINY_TOML = """
name = "tiny"
seed = 3
rounds = 2
strategies = ["fedavg"]

[data]
datalist = "{datalist}"
val_fraction = 0.34

[preprocess]
grid = [24, 24, 24]
patch = [16, 16, 16]
samples_per_volume = 1

[model]
channels = [4, 8, 16]
num_res_units = 1

[train]
lr = 0.003
local_epochs = 1
batch_size = 2
device = "cpu"

[aggregation]
name = "plain"
{extra}
"""

SITE_DP = """
[privacy]
level = "site"
clip = 0.5
delta = 1e-3
"""


def _config(tmp_path: Path, datalist: Path, extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML.format(datalist=datalist, extra=extra))
    return path


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _simulate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["simulate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_rounds_are_numbered_from_1_everywhere(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = _config(tmp_path, tiny_datalist)
    code, out, _ = _simulate(capsys, str(cfg), "--run-dir", str(run))
    assert code == 0
    assert [r["round"] for r in _rows(run)] == [1, 2]
    assert "[fedavg] round 1/2" in out and "[fedavg] round 2/2" in out
    assert "round 0" not in out
    # the same command again: nothing to run, and it says so (not "resuming after round 0")
    code, out, _ = _simulate(capsys, str(cfg), "--run-dir", str(run))
    assert code == 0
    assert "[fedavg] already complete: 2/2 rounds" in out
    assert "resuming" not in out
    assert [r["round"] for r in _rows(run)] == [1, 2]


def test_resume_names_the_last_finished_round(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_datalist, rounds=3)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, run, log=lambda _: None, stop_after=("fedavg", 2))
    lines: list[str] = []
    run_experiment(config, run, log=lines.append)
    assert "[fedavg] resuming after round 2/3" in lines
    assert any(line.startswith("[fedavg] round 3/3") for line in lines)
    assert [r["round"] for r in _rows(run)] == [1, 2, 3]


def test_rounds_extends_a_finished_run_from_its_checkpoint(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = _config(tmp_path, tiny_datalist)
    assert _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "1")[0] == 0
    first = _rows(run)
    code, out, _ = _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "3")
    assert code == 0, out
    assert "extending the run from 1 to 3 rounds (1 finished)" in out
    assert "resuming after round 1/3" in out
    assert "round 1/3" not in out.replace("after round 1/3", "")  # round 1 is not run again
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0] == first[0]
    assert json.loads((run / "config.json").read_text())["rounds"] == 3
    assert "3 rounds" in (run / "report.md").read_text()
    # fewer rounds than already finished: refused, one line
    code, _, err = _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "2")
    assert code == 2
    line = _one_error_line(err)
    assert "already finished 3 round(s)" in line and "rounds: 3 -> 2" in line
    assert "--no-resume" in line


def test_another_configuration_is_refused_with_its_differences(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = _config(tmp_path, tiny_datalist)
    assert _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "1")[0] == 0
    code, _, err = _simulate(
        capsys, str(cfg), "--run-dir", str(run), "--set", "seed=9", "--set", "train.lr=0.01"
    )
    assert code == 2
    line = _one_error_line(err)
    assert "seed: 3 -> 9" in line and "train.lr: 0.003 -> 0.01" in line
    assert "rounds: 1 -> 2" in line  # the file says 2; this run was made with --rounds 1
    assert "--no-resume" in line and "resume=False" not in line
    # --no-resume starts over with the new configuration
    code, _, _ = _simulate(
        capsys, str(cfg), "--run-dir", str(run), "--set", "seed=9", "--no-resume"
    )
    assert code == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 9


def test_set_is_validated_as_the_config_file(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, tiny_datalist)
    run = str(tmp_path / "run")
    cases = [
        (["--set", "train.lrr=0.1"], "unknown key train.lrr; allowed keys in train:"),
        (["--set", "learning_rate=1"], "unknown key learning_rate"),
        (["--set", "train.lr=fast"], "train.lr must be a finite number, got 'fast'"),
        (["--set", "rounds=2.5"], "rounds must be an integer"),
        (["--set", "aggregation.name=paillier"], "aggregation.name must be one of"),
        (["--set", "preprocess.patch=[18,18,18]"], "preprocess.patch[0]=18 must be a multiple"),
        (["--set", "train.lr"], "--set expects key=value"),
        (["--set", "train.lr.x=1"], "train.lr is a value, not a table"),
        (["--rounds", "0"], "argument --rounds: must be an integer >= 1, got '0'"),
        (["--set", "dropouts.0=['site-A']"], "dropouts: keys are round numbers from 1"),
    ]
    for argv, message in cases:
        code, _, err = _simulate(capsys, str(cfg), "--run-dir", run, *argv)
        assert code == 2, argv
        assert message in _one_error_line(err), (argv, err)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_set_overrides_reach_the_run(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, tiny_datalist)
    run = tmp_path / "run"
    code, _, err = _simulate(
        capsys,
        str(cfg),
        "--run-dir",
        str(run),
        "--rounds",
        "1",
        "--set",
        "train.lr=0.01",
        "--set",
        "aggregation.name=secagg+",
        "--set",
        "aggregation.options.seed=1",
        "--set",
        'name="renamed"',
    )
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["rounds"] == 1 and saved["train"]["lr"] == 0.01 and saved["name"] == "renamed"
    assert saved["aggregation"] == {"name": "secagg+", "options": {"seed": 1}}
    assert _rows(run)[0]["aggregation"]["aggregator"] == "secagg+"


def test_extending_a_dp_run_calibrated_to_a_target_is_refused(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, tiny_datalist, SITE_DP + "target_epsilon = 8.0\n")
    run = tmp_path / "run"
    assert _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "1")[0] == 0
    code, _, err = _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "2")
    assert code == 2
    line = _one_error_line(err)
    assert "target_epsilon=8" in line and "over 1 rounds" in line and "rounds: 1 -> 2" in line
    assert [r["round"] for r in _rows(run)] == [1]  # nothing ran, nothing spent
    assert audit_run(run).status == "PASS"


def test_extending_a_dp_run_with_fixed_noise_keeps_the_audit_clean(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fixed noise (no target): more rounds spend more, checked by the budgets before every
    round; the extended run's ledger, metrics (rounds from 1) and config still audit clean."""
    cfg = _config(tmp_path, tiny_datalist, SITE_DP + "noise_multiplier = 1.0\n")
    run = tmp_path / "run"
    assert _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "1")[0] == 0
    code, out, err = _simulate(capsys, str(cfg), "--run-dir", str(run), "--rounds", "2")
    assert code == 0, err
    assert "privacy budgets are checked before every new round" in out
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["privacy"]["max_epsilon"] > rows[0]["privacy"]["max_epsilon"]
    result = audit_run(run)
    assert result.status == "PASS", result.findings
    assert [p.round for p in result.curve] == [1, 2]


def test_a_budget_stop_names_the_refused_round_from_1(
    tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        privacy=PrivacyConfig(
            level="site", noise_multiplier=1.0, clip=0.5, delta=1e-3, site_budget=4.5
        ),
    )
    run = tmp_path / "run"
    summary = run_experiment(config, run, log=lambda _: None)
    assert summary.stopped is not None
    refused = summary.stopped.round
    finished = [r["round"] for r in _rows(run)]
    assert finished == list(range(1, refused))  # rounds 1 .. refused-1 ran
    assert json.loads((run / "stopped.json").read_text())["round"] == refused
    report = (run / "report.md").read_text()
    assert f"before fedavg round {refused}/3:" in report and "round index" not in report
    (stop,) = audit_run(run).findings
    assert stop.round == refused and f"before round {refused} of 3" in stop.message


def test_a_metrics_file_numbered_from_0_is_named(tiny_datalist: Path, tmp_path: Path) -> None:
    """A run folder from before rounds were numbered from 1: resuming it is refused with a
    clear message, and the audit names the numbering instead of failing obscurely."""
    from secure_fl.errors import ConfigError

    run = tmp_path / "run"
    config = tiny_config(
        tiny_datalist,
        rounds=1,
        privacy=PrivacyConfig(level="site", noise_multiplier=1.0, clip=0.5, delta=1e-3),
    )
    run_experiment(config, run, log=lambda _: None)
    rows = _rows(run)
    for row in rows:
        row["round"] -= 1
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"numbers rounds from 0.*--no-resume"):
        run_experiment(config, run, log=lambda _: None)
    assert "ROUND_NUMBERING" in {f.code for f in audit_run(run).findings}


def test_dice_plot_has_integer_round_ticks_and_a_legend_beside_the_lines(
    tiny_datalist: Path,
) -> None:
    from secure_fl.training.report import dice_figure

    config = tiny_config(tiny_datalist, rounds=3, strategies=("fedavg", "local"))
    rows = [
        {"strategy": s, "round": r, "pooled_dice": d, "dice": {}}
        for s, base in (("fedavg", 0.6), ("local", 0.3))
        for r, d in ((1, base), (2, base + 0.1), (3, base + 0.2))
    ]
    fig = dice_figure(config, rows)
    try:
        _check_figure(fig, rounds=[1, 2, 3])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_audit_plot_has_integer_round_ticks_and_a_legend_beside_the_lines(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        privacy=PrivacyConfig(level="site", noise_multiplier=2.0, clip=0.5, delta=1e-3),
    )
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    result = audit_run(tmp_path / "run")
    assert result.status == "PASS"
    assert [p.label for p in result.curve] == ["fedavg:1", "fedavg:2", "fedavg:3"]
    fig = result.figure()
    try:
        _check_figure(fig, rounds=[1, 2, 3])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _check_figure(fig: Any, rounds: list[int]) -> None:
    """Every x tick inside the data range is an integer round, the lines sit at the round
    numbers, and the legend does not overlap the axes (so it hides no line)."""
    fig.canvas.draw()
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert set(rounds) <= {int(t) for t in ticks}
    for line in ax.get_lines():
        xs = list(line.get_xdata())
        if len(xs) > 1:  # budget lines are horizontal axhlines (x in axes fraction)
            assert [float(x) for x in xs] == [float(r) for r in rounds[: len(xs)]]
    legend = ax.get_legend()
    assert legend is not None
    renderer = fig.canvas.get_renderer()
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not box.overlaps(axes_box), (box, axes_box)


def test_simulate_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    """As a process: exit status 2, one ``error:`` line on stderr, no traceback (a config error
    raised deep in the loader, and a usage error from argparse)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 2\n[train]\nlr_rate = 0.1\n")
    for argv, message in (
        (["simulate", str(bad)], "unknown key train.lr_rate"),
        (["simulate", str(bad), "--rounds", "x"], "argument --rounds: must be an integer"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "secure_fl.cli", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in _one_error_line(proc.stderr), (argv, proc.stderr)
