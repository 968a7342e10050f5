"""The privacy-utility benchmark: Dice against epsilon, per DP mode, with its baselines.

``secure-fl bench privacy-utility --profile quick --out DIR`` runs, on the synthetic federation
(FedAvg through SecAgg+):

* a pretraining step, once per output folder (:mod:`secure_fl.bench.pretrained`): the
  profile's model trained without DP on a *public* synthetic cohort (institutions and patients
  of its own; no private site is read);
* baselines: FedAvg without DP (``level = "none"``) from scratch, local-only training (every
  site alone), the *pretrained-only* model (not trained on any private site) and non-private
  FedAvg fine-tuning of the pretrained model's ``trainable`` parameters;
* DP at every target epsilon of the profile (delta of the profile): sample-level DP-SGD at every
  site from scratch and as fine-tuning of the pretrained model (``sample-ft``: only the
  ``trainable`` parameters, so DP-SGD's dimension ``d`` shrinks to about a thousand), site-level
  DP-FedAvg with central noise, and (``full``) with distributed discrete Gaussian noise under
  SecAgg+;
* the cohort-size sweep: sample-level DP at epsilon 8 (each mode of ``cohort_modes``) with N
  cases per site for each N of the profile (the federation is generated with that count),
  optionally with a non-private run each; the smallest N is labelled as the limit of the setting.

summary.md states whether the goal is met: the best audited sample-level DP run at epsilon 8
keeps at least ``goal_fraction`` (90 %) of the best non-private Dice of the same cohort.

Every run writes its own run folder under ``DIR/runs/<name>`` (config, metrics, ledger, models);
every DP run is audited (:func:`secure_fl.privacy.audit.audit_run`; ``audit.md`` in its folder)
and every central site-level run also gets the empirical one-run audit of its mechanism
(:mod:`secure_fl.privacy.empirical`: it audits the noise implementation with the run's clip,
noise and rounds, not the whole training pipeline). ``DIR/summary.json`` lists the runs,
``DIR/summary.md`` tabulates them, ``dice_vs_epsilon.png`` and ``dice_vs_cohort.png`` plot them
(:mod:`secure_fl.bench.report`).

Running the same command again resumes: finished runs are read back (their ``seconds`` are then
the time to read them), an interrupted one continues after its last checkpointed round. A run
folder refuses another configuration (ConfigError listing what differs) and a DP run's ledger is
never reset, so a changed profile, option or code version needs a new ``--out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fl.bench.profiles import COHORT_EPSILON, BenchProfile
from secure_fl.errors import ConfigError

#: mode -> (privacy level, trust, strategy, starts from the pretrained checkpoint)
_MODE_SETTINGS: dict[str, tuple[str, str | None, str, bool]] = {
    "none": ("none", None, "fedavg", False),
    "local": ("none", None, "local", False),
    "pretrained": ("none", None, "none", True),
    "finetune": ("none", None, "fedavg", True),
    "sample": ("sample", "central", "fedavg", False),
    "sample-ft": ("sample", "central", "fedavg", True),
    "site": ("site", "central", "fedavg", False),
    "site-distributed": ("site", "distributed", "fedavg", False),
}
_BASELINE_NAMES = {
    "none": "no-dp",
    "local": "local-only",
    "pretrained": "pretrained-only",
    "finetune": "no-dp-finetune",
}

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: ``name`` (its folder), ``mode`` (a key of the profile's modes or
    baselines: none, local, pretrained, finetune, sample, sample-ft, site, site-distributed),
    ``target_epsilon`` (None without DP), ``cases_per_site`` (None: the default federation),
    ``group`` (``baseline``, ``dp``, ``cohort``) and ``batch_size`` (local batch size)."""

    name: str
    mode: str
    target_epsilon: float | None
    cases_per_site: int | None
    group: str
    batch_size: int

    @property
    def level(self) -> str:
        """The privacy level: ``none``, ``sample`` or ``site``."""
        return _MODE_SETTINGS[self.mode][0]

    @property
    def trust(self) -> str | None:
        """``central`` or ``distributed`` noise; None without DP."""
        return _MODE_SETTINGS[self.mode][1]

    @property
    def strategy(self) -> str:
        """``fedavg``, ``local``, or ``none`` (pretrained-only: no training at all)."""
        return _MODE_SETTINGS[self.mode][2]

    @property
    def pretrained(self) -> bool:
        """Whether the run starts from the public pretrained checkpoint (and, when it trains,
        trains only the profile's ``trainable`` parameters)."""
        return _MODE_SETTINGS[self.mode][3]


def cohort_batch_size(profile: BenchProfile, cases: int) -> int:
    """The local batch of a cohort-sweep run with ``cases`` per site: ``min(batch_size,
    cases // 4)``, at least 1 (a Poisson batch must stay well below a site's training set)."""
    return max(1, min(profile.batch_size, cases // 4))


def plan_runs(profile: BenchProfile) -> list[RunSpec]:
    """The runs of ``profile``, baselines first, then DP by mode and epsilon, then the sweep."""
    runs: list[RunSpec] = []
    n0, b = profile.cases_per_site, profile.batch_size
    for base in profile.baselines:
        runs.append(RunSpec(_BASELINE_NAMES[base], base, None, n0, "baseline", b))
    for mode in profile.modes:
        for eps in profile.epsilons:
            runs.append(RunSpec(f"{mode}-eps{eps:g}", mode, eps, n0, "dp", b))
    for n in profile.cohorts:
        batch = cohort_batch_size(profile, n)
        if profile.cohort_baseline:
            runs.append(RunSpec(f"cohort{n}-no-dp", "none", None, n, "cohort", batch))
        for mode in profile.cohort_modes:
            name = f"cohort{n}-{mode}-eps{COHORT_EPSILON:g}"
            runs.append(RunSpec(name, mode, COHORT_EPSILON, n, "cohort", batch))
    return runs


def experiment_config(
    profile: BenchProfile, spec: RunSpec, datalist: Path, checkpoint: Path | None = None
) -> Any:
    """The :class:`~secure_fl.training.ExperimentConfig` of one run (FedAvg through SecAgg+);
    ``checkpoint``: the public pretrained model, loaded (with ``train.trainable``) by the runs
    that start from it.

    Errors: ConfigError when ``spec`` starts from the pretrained model and ``checkpoint`` is
    None."""
    from secure_fl.data import PreprocessConfig
    from secure_fl.privacy import PrivacyConfig
    from secure_fl.training import (
        AggregationConfig,
        DataConfig,
        ExperimentConfig,
        ModelConfig,
        TrainConfig,
    )

    if spec.pretrained and checkpoint is None:
        raise ConfigError(f"run {spec.name} needs the pretrained checkpoint")
    if spec.level == "none":
        privacy = PrivacyConfig()
    else:
        distributed = spec.trust == "distributed"
        privacy = PrivacyConfig(
            level=spec.level,
            trust="distributed" if distributed else "central",
            mechanism="discrete_gaussian" if distributed else "gaussian",
            target_epsilon=spec.target_epsilon,
            delta=profile.delta,
            clip=profile.sample_clip if spec.level == "sample" else profile.site_clip,
            accountant=profile.accountant,
        )
    return ExperimentConfig(
        name=spec.name,
        rounds=profile.rounds,
        strategies=("fedavg",) if spec.strategy == "none" else (spec.strategy,),
        data=DataConfig(datalist=str(datalist), synthetic_shape=profile.shape),
        preprocess=PreprocessConfig(grid=profile.grid, patch=profile.patch, samples_per_volume=1),
        model=ModelConfig(
            channels=profile.channels,
            num_res_units=profile.res_units,
            norm=profile.norm,
            pretrained=str(checkpoint) if spec.pretrained and checkpoint is not None else None,
        ),
        train=TrainConfig(
            lr=profile.lr,
            local_epochs=profile.local_epochs,
            batch_size=spec.batch_size,
            lr_schedule=profile.lr_schedule,
            trainable=profile.trainable if spec.pretrained else (),
        ),
        aggregation=AggregationConfig(name="secagg+", options={"dropout_rate": 0.1}),
        privacy=privacy,
    )


def federation(profile: BenchProfile, out: Path, cases_per_site: int | None) -> Path:
    """The synthetic federation of ``cases_per_site`` (None: the generator's default counts),
    generated under ``out/data`` once; returns its datalist."""
    from secure_fl.data import generate_federation

    label = "default" if cases_per_site is None else f"cases{cases_per_site}"
    return generate_federation(
        out / "data" / f"{label}-{profile.shape[0]}",
        sites=profile.sites,
        cases_per_site=cases_per_site,
        shape=profile.shape,
        seed=0,
    )


def ledger_spend(run_dir: Path, delta: float, accountant: str) -> tuple[float | None, float | None]:
    """(largest epsilon any site has spent, least noise multiplier recorded) from the run's
    privacy ledger at ``delta``; (None, None) when the run has no ledger (no DP)."""
    from secure_fl.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

    path = run_dir / LEDGER_FILENAME
    if not path.is_file():
        return None, None
    with PrivacyLedger(path, readonly=True) as ledger:
        sites = ledger.sites()
        spent = max((ledger.spent(s, delta, accountant) for s in sites), default=0.0)
        noise = min((r.effective_noise_multiplier for r in ledger.entries()), default=None)
    return spent, noise


def audit_verdict(run_dir: Path) -> str:
    """``"PASS"``, ``"NO DP"``, or the audit's findings (``CODE: message; ...``); the audit's
    report (audit.md/.json/.png) is written into the run folder."""
    from secure_fl.privacy.audit import NO_DP, audit_run

    result = audit_run(run_dir)
    result.write_report()
    if result.status == NO_DP or result.ok:
        return result.status
    return "; ".join(f"{f.code}: {f.message}" for f in result.problems)


def run_one(
    profile: BenchProfile,
    spec: RunSpec,
    out: Path,
    *,
    log: Log = print,
    previous_seconds: float | None = None,
    checkpoint: Path | None = None,
    pretrain_seconds: float = 0.0,
) -> dict[str, Any]:
    """Run (or resume) one run of the grid and return its summary row: ``name``, ``mode``,
    ``level``, ``trust``, ``group``, ``pretrained`` (started from the public checkpoint),
    ``trainable`` (the parameter groups trained; None: all), ``target_epsilon``,
    ``spent_epsilon`` (ledger), ``noise_multiplier``, ``dice`` (pooled held-out Dice),
    ``audit``, ``empirical`` (the empirical audit's dict, central site level only, else None),
    ``cases_per_site``, ``batch_size``, ``stopped`` (a budget stop's message, else None) and
    ``seconds`` (the training time; for a run that was already finished, ``previous_seconds``
    when given - the earlier summary's - else the time to read it back; for the
    pretrained-only line, ``pretrain_seconds`` plus the evaluation).

    Errors: those of :func:`secure_fl.training.run_experiment` (ConfigError, DataError, ...);
    ConfigError when the run needs ``checkpoint`` and it is None.
    """
    from secure_fl.training import run_experiment

    datalist = federation(profile, out, spec.cases_per_site)
    config = experiment_config(profile, spec, datalist, checkpoint)
    run_dir = out / "runs" / spec.name
    if spec.strategy == "none":  # pretrained-only: evaluated, never trained
        from secure_fl.bench.pretrained import pretrained_only

        finished = (run_dir / "evaluation.json").is_file()
        start = time.perf_counter()
        _, dice = pretrained_only(config, run_dir)
        seconds = pretrain_seconds + time.perf_counter() - start
        stopped = None
    else:
        finished = (run_dir / "report.md").is_file() and (run_dir / "models").is_dir()
        start = time.perf_counter()
        summary = run_experiment(config, run_dir, log=lambda _: None)
        seconds = time.perf_counter() - start
        dice = float(summary.pooled[spec.strategy])
        stopped = summary.stopped.message if summary.stopped is not None else None
    if finished and previous_seconds is not None:
        seconds = previous_seconds
    spent, noise = ledger_spend(run_dir, profile.delta, config.privacy.accountant)
    empirical = None
    if spec.mode == "site" and profile.canaries:
        from secure_fl.privacy.empirical import empirical_audit_run

        empirical = empirical_audit_run(
            run_dir, canaries=profile.canaries, guesses=profile.guesses
        ).to_dict()
    verdict = audit_verdict(run_dir) if spec.strategy != "none" else "NO DP"
    row: dict[str, Any] = {
        "name": spec.name,
        "mode": spec.mode,
        "level": spec.level,
        "trust": spec.trust,
        "group": spec.group,
        "pretrained": spec.pretrained,
        "trainable": list(config.train.trainable) or None,
        "target_epsilon": spec.target_epsilon,
        "spent_epsilon": spent,
        "noise_multiplier": noise,
        "dice": dice,
        "audit": verdict,
        "empirical": empirical,
        "cases_per_site": spec.cases_per_site,
        "batch_size": spec.batch_size,
        "stopped": stopped,
        "seconds": seconds,
    }
    log(
        f"{spec.name}: Dice {row['dice']:.3f}"
        + (f", epsilon {spent:.2f}" if spent is not None else "")
        + (f", empirical epsilon >= {empirical['lower_bound']:.2f}" if empirical else "")
        + f", audit {verdict if len(verdict) < 40 else 'FAIL (see summary.md)'}, {seconds:.0f} s"
    )
    return row


def run_benchmark(
    profile: BenchProfile, out: str | Path, *, log: Log = print
) -> list[dict[str, Any]]:
    """Run every run of ``profile`` into ``out`` and write summary.json, summary.md and the plots
    (:func:`secure_fl.bench.report.write_summary`); returns the summary rows (see
    :func:`run_one`). summary.json is rewritten after every run, so an interrupted benchmark
    keeps what it finished.

    Errors: ConfigError when ``out`` exists and is not a folder; a run's errors.
    """
    from secure_fl.bench.report import write_summary

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    plan = plan_runs(profile)
    log(f"privacy-utility benchmark, profile {profile.name}: {len(plan)} runs into {root}")
    before = _previous_seconds(root / "summary.json")
    checkpoint, pretrain_seconds, b = None, 0.0, profile.batch_size
    if profile.needs_pretrained:
        from secure_fl.bench.pretrained import pretrained_checkpoint

        spec = RunSpec("pretrain", "none", None, profile.cases_per_site, "baseline", b)
        datalist = federation(profile, root, profile.cases_per_site)
        checkpoint, pretrain_seconds = pretrained_checkpoint(
            experiment_config(profile, spec, datalist),
            root,
            cases=profile.pretrain_cases,
            epochs=profile.pretrain_epochs,
            log=log,
        )
    for spec in plan:
        row = run_one(
            profile,
            spec,
            root,
            log=log,
            previous_seconds=before.get(spec.name),
            checkpoint=checkpoint,
            pretrain_seconds=pretrain_seconds,
        )
        rows.append(row)
        (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_summary(rows, profile, root)
    return rows


def _previous_seconds(path: Path) -> dict[str, float]:
    """``name -> seconds`` of an earlier summary.json in the output folder ({} when none or
    unreadable: the runs are then timed as they are read back)."""
    try:
        rows = json.loads(path.read_text())
        return {str(r["name"]): float(r["seconds"]) for r in rows}
    except (OSError, ValueError, TypeError, KeyError):
        return {}
