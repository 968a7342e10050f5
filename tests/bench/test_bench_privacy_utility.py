"""``secure-fl bench privacy-utility``: the grid, the summary files, a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_fl.bench import PROFILES, get_profile
from secure_fl.bench.privacy_utility import experiment_config, plan_runs
from secure_fl.bench.profiles import BenchProfile
from secure_fl.bench.report import goal_check, write_summary
from secure_fl.cli import main
from secure_fl.errors import ConfigError

FIELDS = {"level", "target_epsilon", "spent_epsilon", "dice", "audit", "seconds"}
PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_profile_plans_baselines_dp_modes_and_cohort_sweep() -> None:
    runs = plan_runs(PROFILES["quick"])
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    modes = {r.mode for r in runs}
    assert {"none", "local", "pretrained", "finetune", "sample", "sample-ft", "site"} <= modes
    quick = PROFILES["quick"]
    assert quick.needs_pretrained
    dp = [r for r in runs if r.group == "dp"]
    assert {r.target_epsilon for r in dp} == set(quick.epsilons)
    assert {r.name for r in dp if r.target_epsilon == 8.0} >= {"sample-eps8", "sample-ft-eps8"}
    cohort = [r for r in runs if r.group == "cohort" and r.level == "sample"]
    assert {r.cases_per_site for r in cohort} == set(quick.cohorts)
    assert {r.mode for r in cohort} == set(quick.cohort_modes) == {"sample", "sample-ft"}
    assert all(r.target_epsilon == 8.0 for r in cohort)
    reference = [r for r in runs if r.group == "cohort" and r.level == "none"]
    assert [r.cases_per_site for r in reference] == list(quick.cohorts)
    # a Poisson batch stays below a small site's training set: min(batch, N // 4)
    assert {r.cases_per_site: r.batch_size for r in reference} == {8: 2, 32: 8}
    assert len(runs) == 19  # the README's count
    assert all(r.target_epsilon is None for r in runs if r.level == "none")
    # the cohort and model the goal was sized for (4 x 64 patients, 24^3, group-norm UNet)
    assert (quick.sites, quick.cases_per_site, quick.grid) == (4, 64, (24, 24, 24))
    assert quick.norm == "group" and quick.delta == 1e-5 and quick.goal_fraction == 0.9


def test_fine_tuning_runs_load_the_checkpoint_and_train_only_the_trainable_groups(
    tmp_path: Path,
) -> None:
    runs = {r.name: r for r in plan_runs(PROFILES["quick"])}
    ckpt, datalist = tmp_path / "public.pt", tmp_path / "datalist.json"
    ft = experiment_config(PROFILES["quick"], runs["sample-ft-eps8"], datalist, ckpt)
    assert ft.model.pretrained == str(ckpt) and ft.train.trainable == ("head", "norm")
    assert ft.privacy.level == "sample" and ft.privacy.target_epsilon == 8.0
    assert ft.privacy.delta == 1e-5 and ft.privacy.accountant == "prv"
    scratch = experiment_config(PROFILES["quick"], runs["sample-eps8"], datalist, ckpt)
    assert scratch.model.pretrained is None and scratch.train.trainable == ()
    assert (
        experiment_config(PROFILES["quick"], runs["no-dp-finetune"], datalist, ckpt).privacy.level
        == "none"
    )
    with pytest.raises(ConfigError, match="needs the pretrained checkpoint"):
        experiment_config(PROFILES["quick"], runs["sample-ft-eps8"], datalist, None)


def test_profile_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="cohort_modes must be among"):
        BenchProfile(name="x", rounds=1, epsilons=(8.0,), cohort_modes=("site",))
    with pytest.raises(ConfigError, match="norm must be one of"):
        BenchProfile(name="x", rounds=1, epsilons=(8.0,), norm="batch")
    with pytest.raises(ConfigError, match="trainable must list"):
        BenchProfile(name="x", rounds=1, epsilons=(8.0,), trainable=())
    with pytest.raises(ConfigError, match="goal_fraction must be in"):
        BenchProfile(name="x", rounds=1, epsilons=(8.0,), goal_fraction=1.5)
    plain = BenchProfile(name="x", rounds=1, epsilons=(8.0,), baselines=("none",))
    assert not plain.needs_pretrained


def test_overrides_and_bad_values() -> None:
    p = get_profile("quick", rounds=2, epsilons=[4.0], cohorts=[])
    assert (p.rounds, p.epsilons, p.cohorts) == (2, (4.0,), ())
    with pytest.raises(ConfigError, match="--profile must be one of"):
        get_profile("huge")
    with pytest.raises(ConfigError, match="epsilons must be finite numbers > 0"):
        get_profile("quick", epsilons=[0.0])
    with pytest.raises(ConfigError, match="rounds must be an integer >= 1"):
        get_profile("quick", rounds=0)


def _row(
    name: str, mode: str, group: str, eps: float | None, dice: float, **kw: object
) -> dict[str, object]:
    level = {"none": "none", "local": "none", "pretrained": "none", "finetune": "none"}.get(
        mode, "site" if mode == "site" else "sample"
    )
    return {
        "name": name,
        "mode": mode,
        "level": level,
        "trust": None if level == "none" else "central",
        "group": group,
        "target_epsilon": eps,
        "spent_epsilon": eps,
        "noise_multiplier": None if eps is None else 1.0,
        "dice": dice,
        "audit": "NO DP" if eps is None else "PASS",
        "empirical": None,
        "cases_per_site": kw.get("cases"),
        "stopped": None,
        "seconds": 1.0,
    }


def test_summary_files_from_rows(tmp_path: Path) -> None:
    rows = [
        _row("no-dp", "none", "baseline", None, 0.8),
        _row("local-only", "local", "baseline", None, 0.6),
        _row("sample-eps2", "sample", "dp", 2.0, 0.1),
        _row("sample-eps8", "sample", "dp", 8.0, 0.3),
        _row("site-eps8", "site", "dp", 8.0, 0.5),
        {**_row("site-eps2", "site", "dp", 2.0, 0.4), "audit": "EPSILON_ABOVE_TARGET: 2.5 > 2"},
        _row("cohort4", "sample", "cohort", 8.0, 0.05, cases=4),
        _row("cohort32", "sample", "cohort", 8.0, 0.4, cases=32),
    ]
    paths = write_summary(rows, PROFILES["quick"], tmp_path)
    assert json.loads(paths["json"].read_text()) == rows
    md = paths["markdown"].read_text()
    assert "| sample-eps8 |" in md and "pretrained" in md and "limit of the setting" in md
    # the goal line: met / not met with the two numbers (0.3 of 0.8 is far from 90 %)
    assert "**Goal**" in md and "**NOT MET**: sample-eps8 Dice 0.300" in md
    assert "no-dp Dice 0.800" in md
    # the smallest cohort's DP row carries the label, the larger one does not
    limit = [line for line in md.splitlines() if "limit of the setting |" in line]
    assert len(limit) == 1 and limit[0].startswith("| cohort4 |")
    assert "- site-eps2: EPSILON_ABOVE_TARGET: 2.5 > 2" in md  # a failed audit in full
    for key in ("epsilon_plot", "cohort_plot"):
        assert paths[key].read_bytes().startswith(PNG)
    no_sweep = write_summary(rows[:6], PROFILES["quick"], tmp_path / "b")
    assert "cohort_plot" not in no_sweep


def test_goal_compares_the_best_audited_dp_run_at_eps8_with_the_best_non_private() -> None:
    quick = PROFILES["quick"]
    rows = [
        _row("no-dp", "none", "baseline", None, 0.70),
        _row("no-dp-finetune", "finetune", "baseline", None, 0.73),
        _row("pretrained-only", "pretrained", "baseline", None, 0.61),
        _row("sample-eps8", "sample", "dp", 8.0, 0.43),
        _row("sample-ft-eps8", "sample-ft", "dp", 8.0, 0.66),
        _row("sample-ft-eps32", "sample-ft", "dp", 32.0, 0.72),  # not at epsilon 8
        _row("site-eps8", "site", "dp", 8.0, 0.72),  # not sample level
        _row("cohort64-sample-ft-eps8", "sample-ft", "cohort", 8.0, 0.72, cases=64),
    ]
    goal = goal_check(rows, quick)
    assert goal is not None and goal["met"]  # 0.66 / 0.73 = 90.4 %
    assert goal["dp"]["name"] == "sample-ft-eps8" and goal["reference"]["name"] == "no-dp-finetune"
    assert goal["fraction"] == pytest.approx(0.66 / 0.73)
    rows[4] = {**rows[4], "dice": 0.65}  # 89.0 %
    assert not goal_check(rows, quick)["met"]  # type: ignore[index]
    # a run whose audit failed, or that spent more than epsilon 8, does not count
    rows[4] = {**rows[4], "dice": 0.72, "audit": "EPSILON_ABOVE_TARGET: 8.3 > 8"}
    assert goal_check(rows, quick)["dp"]["name"] == "sample-eps8"  # type: ignore[index]
    rows[3] = {**rows[3], "spent_epsilon": 8.5}
    failed = goal_check(rows, quick)
    assert failed is not None and not failed["met"] and failed["dp"]["name"] is None
    # no sample-level run at epsilon 8 at all: not checked
    assert goal_check([rows[0], rows[5]], quick) is None


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    assert main(["bench", "privacy-utility", "--profile", "huge", "--out", out]) == 2
    assert main(["bench", "privacy-utility", "--rounds", "0", "--out", out]) == 2
    assert main(["bench", "privacy-utility", "--epsilons", "-1", "--out", out]) == 2
    assert "error:" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "pu"
    assert main(["bench", "privacy-utility", "--profile", "smoke", "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # the smoke benchmark: pretraining and four runs, ~20 s
def test_smoke_profile_writes_summary_plot_and_audits(smoke: Path) -> None:
    rows = json.loads((smoke / "summary.json").read_text())
    names = ["no-dp", "pretrained-only", "site-eps8", "sample-ft-eps8"]
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert set(r) >= FIELDS
        assert 0.0 <= r["dice"] <= 1.0 and r["seconds"] > 0
    plain, pretrained, dp, ft = rows
    assert plain["target_epsilon"] is None and plain["spent_epsilon"] is None
    assert plain["audit"] == pretrained["audit"] == "NO DP"
    assert pretrained["pretrained"] and not plain["pretrained"]
    assert (smoke / "runs" / "pretrained-only" / "evaluation.json").is_file()
    # DP fine-tuning of the public checkpoint: only head and norm train, audited, within budget
    assert ft["pretrained"] and ft["trainable"] == ["head", "norm"] and ft["audit"] == "PASS"
    assert 0 < ft["spent_epsilon"] <= 8.0 + 1e-6
    config = json.loads((smoke / "runs" / "sample-ft-eps8" / "config.json").read_text())
    assert config["model"]["pretrained"] == str(smoke / "pretrained" / "public.pt")
    assert config["train"]["trainable"] == ["head", "norm"]
    public = json.loads((smoke / "pretrained" / "public-cohort" / "datalist.json").read_text())
    assert str(smoke / "data") not in json.dumps(public)  # no private site in pretraining
    assert dp["audit"] == "PASS"
    assert 0 < dp["spent_epsilon"] <= dp["target_epsilon"] + 1e-6
    assert dp["empirical"]["accounted_epsilon"] == pytest.approx(dp["spent_epsilon"])
    assert not dp["empirical"]["flagged"]
    md = (smoke / "summary.md").read_text()
    assert md.count("| site-eps8 |") == 1 and "**Goal**" in md and "sample-ft-eps8 Dice" in md
    assert (smoke / "dice_vs_epsilon.png").read_bytes().startswith(PNG)
    assert (smoke / "runs" / "site-eps8" / "audit.md").is_file()


@pytest.mark.slow  # the smoke benchmark: pretraining and four runs, ~20 s
def test_audit_empirical_on_a_bench_run(smoke: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = smoke / "runs" / "site-eps8"
    args = ["audit", str(run), "--empirical", "--canaries", "60", "--guesses", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "empirical epsilon >=" in out and "consistent" in out
    report = json.loads((run / "audit_empirical.json").read_text())
    assert report["canaries"] == 60 and report["flagged"] is False


@pytest.mark.slow  # the smoke benchmark: pretraining and four runs, ~20 s
def test_pretrained_checkpoint_is_made_once_and_refuses_other_settings(smoke: Path) -> None:
    import dataclasses

    from secure_fl.bench.pretrained import pretrained_checkpoint
    from secure_fl.bench.privacy_utility import RunSpec

    smoke_profile = PROFILES["smoke"]
    spec = RunSpec("pretrain", "none", None, 4, "baseline", 2)
    config = experiment_config(smoke_profile, spec, smoke / "data" / "x.json")
    ckpt = smoke / "pretrained" / "public.pt"
    mtime = ckpt.stat().st_mtime_ns
    path, seconds = pretrained_checkpoint(config, smoke, cases=4, epochs=1, log=lambda _: None)
    assert path == ckpt and seconds > 0 and ckpt.stat().st_mtime_ns == mtime  # reused
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, channels=(4, 8)))
    with pytest.raises(ConfigError, match=r"pretrained with other settings.*model"):
        pretrained_checkpoint(other, smoke, cases=4, epochs=1)
    with pytest.raises(ConfigError, match=r"\(epochs differ\)"):
        pretrained_checkpoint(config, smoke, cases=4, epochs=2)


@pytest.mark.slow  # the smoke benchmark: pretraining and four runs, ~20 s
def test_rerun_reads_finished_runs_back_and_keeps_their_times(smoke: Path) -> None:
    before = json.loads((smoke / "summary.json").read_text())
    assert main(["bench", "privacy-utility", "--profile", "smoke", "--out", str(smoke)]) == 0
    after = json.loads((smoke / "summary.json").read_text())
    for old, new in zip(before, after, strict=True):
        assert new["seconds"] == old["seconds"]  # the training time, not the read-back time
        assert new["dice"] == old["dice"] and new["spent_epsilon"] == old["spent_epsilon"]
        assert new["audit"] == old["audit"]  # the ledger was not spent again
