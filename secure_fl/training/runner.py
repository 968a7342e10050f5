"""Run a simulated experiment: every strategy, every round, into a run folder; resumable.

The run folder holds:

* ``config.json`` — the resolved configuration;
* ``metrics.jsonl`` — one JSON line per (strategy, round): Dice per site and pooled, loss, time,
  the aggregation report. ``round`` is numbered from 1, as on the console, in the report, the
  plots and the audit (the strategies, the seeds and the privacy ledger use the 0-based index
  ``round - 1`` internally);
* ``checkpoints/<strategy>.pt`` — the strategy's state after its last finished round;
* ``models/<strategy>.pt`` — the final model(s) as torch state dicts;
* ``report.md`` and ``dice_vs_rounds.png`` — a table of Dice per site and strategy, and a plot;
* ``evaluation.json`` — the final evaluation of each strategy's last model(s), Dice and Hausdorff
  95 on every site's validation cases and on the test set (the datalist's ``test`` section and
  the ``data.holdout_sites``, which never train; :mod:`secure_fl.training.heldout`);
* ``stopped.json`` — only when a privacy budget refused a round: which strategy and round
  (numbered from 1), and the budget check's message (spent, projected, budget, remaining). The
  run ends there gracefully: the models of the last finished round and the report are written,
  nothing raises.

Under differential privacy nothing computed on training patients without noise leaves a site:
metrics.jsonl and the progress line carry no training loss (the per-site trainers are marked
``private``, so their ``ExchangeObject`` statistics drop it too). What is written is the Dice of
the *released* (DP) model(s) on each site's held-out cases: post-processing with respect to the
training patients, but the held-out patients themselves are outside the DP guarantee.

Crash safety: a round's metrics line is appended, then its checkpoint is written atomically (a
temporary file renamed over the old one). On resume the run continues after the last checkpointed
round and drops metrics lines beyond it, so no finished round is lost and none is counted twice.
A resume may change ``rounds`` and nothing else (``simulate --rounds N``): a finished run is then
extended from its checkpoint (not under DP with ``target_epsilon``, whose noise was calibrated
for the old count); any other change of the configuration is refused, listing what differs.
Every round's randomness derives from (seed, strategy, site, round), so a resumed run produces the
same models as an uninterrupted one. Under DP with ``target_epsilon``, a resume first recalibrates
the noise of the remaining rounds from what the ledger already holds (an interrupted round's
intents count in full), so the target holds however often the run is interrupted; the target is
also enforced as a budget before every round.

The run folder's files (checkpoints, models, resume checks) are in
:mod:`secure_fl.training.run_folder`; building and evaluating a strategy in
:mod:`secure_fl.training.run_strategy`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.data import Case, generate_federation, load_datalist, split_by_site
from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.jsonl import read_jsonl
from secure_fl.training.config import ExperimentConfig
from secure_fl.training.finetune import trainable_summary
from secure_fl.training.model import build_unet, derive_seed, get_state
from secure_fl.training.privacy_run import PrivacyRound, privacy_summary_line
from secure_fl.training.run_folder import (
    STOPPED_FILENAME,
    BudgetStop,
    Log,
    _check_numbering,
    _check_resume,
    _json_safe,
    _load_checkpoint,
    _save_checkpoint,
    _save_models,
)
from secure_fl.training.run_strategy import _make_strategy, _summarise, evaluate_strategy
from secure_fl.training.strategies import Federation
from secure_fl.training.trainer import SiteTrainer

__all__ = [
    "STOPPED_FILENAME",
    "BudgetStop",
    "Log",
    "RunSummary",
    "build_federation",
    "check_data",
    "evaluate_strategy",
    "resolve_cases",
    "run_experiment",
]


@dataclass(frozen=True)
class RunSummary:
    """Final Dice per strategy: per site, and pooled over all held-out cases. ``stopped`` is set
    when a privacy budget ended the run early (None when every round ran). ``evaluation``: per
    strategy the final evaluation (validation and test set, Dice and HD95;
    :func:`secure_fl.training.final_eval.final_evaluation`), as written to evaluation.json."""

    run_dir: Path
    dice: dict[str, dict[str, float]]
    pooled: dict[str, float]
    stopped: BudgetStop | None = None
    evaluation: dict[str, Any] | None = None


def resolve_cases(config: ExperimentConfig, log: Log = print) -> list[Case]:
    """The cases of the experiment: the datalist, or the synthetic federation (generated if needed)."""
    if config.data.datalist:
        return load_datalist(config.data.datalist)
    path = generate_federation(
        Path(config.data.synthetic_dir),
        sites=config.data.synthetic_sites,
        shape=config.data.synthetic_shape,
        seed=config.data.synthetic_seed,
        cases_per_site=_synthetic_counts(config),
    )
    log(f"synthetic federation: {path}")
    return load_datalist(path)


def _synthetic_counts(config: ExperimentConfig) -> int | list[int] | None:
    """``data.synthetic_cases`` as generate_federation's ``cases_per_site``."""
    counts = config.data.synthetic_cases
    return None if not counts else counts[0] if len(counts) == 1 else list(counts)


def check_data(
    config: ExperimentConfig,
    cases: list[Case],
    log: Log = print,
    *,
    label_values: Any = None,
) -> None:
    """Read every scan once before training (:func:`secure_fl.data.checks.require_valid`), so a
    bad file is named with its reason instead of crashing MONAI's caching. Labels may be any
    integer >= 0 unless ``label_values`` (the label scheme's values,
    :attr:`secure_fl.training.heldout.DataPlan.label_values`) lists the allowed ones; brain
    masks are checked when they are used.

    Errors: DataError listing every bad case, one ``error: <file>: <reason>`` line each.
    """
    from secure_fl.data.checks import default_workers, require_valid

    report = require_valid(
        cases,
        label_values=label_values,
        check_brainmask=config.preprocess.use_brainmask,
        workers=default_workers(),
    )
    log(f"data check: {report.summary()} in {report.seconds:.2f} s")


def build_federation(
    config: ExperimentConfig, cases: list[Case], *, pooled: bool, plan: Any = None
) -> Federation:
    """One :class:`SiteTrainer` per site (train/held-out split per site) and the initial model.

    ``plan`` (a :class:`secure_fl.training.heldout.DataPlan`) supplies the effective
    preprocessing (target region, stacked modalities); the network's input channels follow the
    modalities. ``cases`` must not hold the plan's test cases.
    """
    import torch

    from secure_fl.training.heldout import model_factory

    preprocess = plan.preprocess if plan is not None else config.preprocess
    factory = model_factory(config.model, preprocess.in_channels)
    splits = split_by_site(cases, val_fraction=config.data.val_fraction, seed=config.seed)
    common = {
        "model_factory": factory,
        "preprocess": preprocess,
        "model": config.model,
        "train": config.train,
        "seed": config.seed,
        "cache": config.data.cache,
    }
    sites = {
        name: SiteTrainer(name, train, val, **common)  # type: ignore[arg-type]
        for name, (train, val) in sorted(splits.items())
    }
    pool = None
    if pooled:
        everything = [c for name in sorted(splits) for c in splits[name][0]]
        pool = SiteTrainer("pooled", everything, [], **common)  # type: ignore[arg-type]
    torch.manual_seed(derive_seed(config.seed, "initial-model"))
    initial = get_state(factory() if factory is not None else build_unet(config.model))
    return Federation(sites=sites, pooled=pool, initial=initial)


def run_experiment(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    log: Log = print,
    stop_after: tuple[str, int] | None = None,
) -> RunSummary:
    """Run every strategy of ``config`` for ``config.rounds`` rounds, writing ``run_dir``.

    ``resume`` continues a run folder written with the same configuration, or with one that
    differs only in ``rounds``: more rounds extend a finished run from its checkpoint (refused
    under DP with ``target_epsilon``, whose noise was calibrated for the old count). Any other
    difference is a ConfigError listing each ``key: old -> new``. ``stop_after=(strategy,
    round)`` stops right after that round (numbered from 1) is checkpointed, as a crash would
    (for tests of resumption).

    A round refused by a privacy budget (or by ``target_epsilon``, which is a budget too) ends the
    run gracefully: ``stopped.json``, the last models and the report are written and the summary's
    ``stopped`` says which round and why (no exception). A privacy ledger is never reset, not even
    with ``resume=False``: the patients' spend stays counted.
    """
    run = Path(run_dir)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "models").mkdir(exist_ok=True)
    resolved = config.to_dict()
    cfg_path = run / "config.json"
    metrics_path = run / "metrics.jsonl"
    if cfg_path.exists() and resume:
        try:
            previous = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{cfg_path} is unreadable ({exc}); use --no-resume to start over"
            ) from exc
        _check_resume(run, config, previous, log)
        _check_numbering(metrics_path, read_jsonl(metrics_path))
    elif cfg_path.exists():
        for old in [*(run / "checkpoints").glob("*.pt"), metrics_path]:
            old.unlink(missing_ok=True)
    (run / STOPPED_FILENAME).unlink(missing_ok=True)
    atomic_write(cfg_path, json.dumps(resolved, indent=2).encode())

    from secure_fl.training.final_eval import final_evaluation, write_evaluation
    from secure_fl.training.heldout import resolve_data

    plan = resolve_data(config, resolve_cases(config, log))  # test cases never reach a trainer
    # DataError listing every bad scan, before any caching:
    check_data(config, [*plan.train_pool, *plan.test], log, label_values=plan.label_values)
    fed = build_federation(
        config, list(plan.train_pool), pooled="centralized" in config.strategies, plan=plan
    )
    for trainer in [*fed.sites.values(), *([fed.pooled] if fed.pooled else [])]:
        trainer.rounds = config.rounds
        trainer.private = config.privacy.enabled  # no un-noised training statistics leave it
    sizes = ", ".join(f"{n}: {len(s.train_cases)}+{len(s.val_cases)}" for n, s in fed.sites.items())
    log(f"{len(fed.sites)} sites (train+held-out cases) {sizes}")
    if plan.test:
        held = f"; held-out sites {list(plan.holdout_sites)}" if plan.holdout_sites else ""
        log(f"test set: {len(plan.test)} case(s), evaluated once at the end{held}")
    evaluations: dict[str, Any] = {}
    test_datasets: dict[str, Any] = {}
    log(trainable_summary(config.model, config.train.trainable))

    rows = read_jsonl(metrics_path)
    final_dice: dict[str, dict[str, float]] = {}
    final_pooled: dict[str, float] = {}
    stopped: BudgetStop | None = None
    private = config.privacy.enabled
    total = config.rounds
    for strategy_name in config.strategies:
        strategy = _make_strategy(config, strategy_name)
        privacy = None
        if config.privacy.enabled:
            privacy = PrivacyRound(config, run, fed, strategy)
            privacy.open()
            privacy.prepare()
        ckpt = run / "checkpoints" / f"{strategy_name}.pt"
        # ``done``: rounds finished; round_id below is the 0-based index the strategies, the
        # seeds and the ledger use; people read round_id + 1.
        done, state = 0, strategy.init_state(fed)
        if ckpt.exists():
            last, state = _load_checkpoint(ckpt)
            done = last + 1
            if done >= total:
                log(f"[{strategy_name}] already complete: {done}/{total} rounds; nothing to run")
            else:
                log(f"[{strategy_name}] resuming after round {done}/{total}")
        if privacy is not None:
            note = privacy.recalibrate_for_resume(done)
            if note:
                log(f"[{strategy_name}] {note}")
        rows = [r for r in rows if r["strategy"] != strategy_name or r["round"] <= done]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for round_id in range(done, total):
            number = round_id + 1
            t0 = time.perf_counter()
            if privacy is not None:
                try:
                    privacy.before_round(round_id)  # refuses the round when over budget
                except BudgetExceededError as exc:
                    stopped = BudgetStop(strategy_name, number, str(exc))
                    atomic_write(
                        run / STOPPED_FILENAME, json.dumps(stopped.to_dict(), indent=2).encode()
                    )
                    log(
                        f"[{strategy_name}] stopped by the privacy budget before round "
                        f"{number}/{total}: {exc}"
                    )
                    break
            state, info = strategy.run_round(fed, state, round_id)
            privacy_row = privacy.after_round(round_id) if privacy is not None else None
            dice, pooled = evaluate_strategy(strategy, fed, state)
            row = {
                "strategy": strategy_name,
                "round": number,
                "dice": dice,
                "pooled_dice": pooled,
                "steps": info.steps,
                "seconds": time.perf_counter() - t0,
                "aggregation": _summarise(info.aggregation),
            }
            if not private:  # un-noised: computed on the training patients, never under DP
                row["train_loss"] = info.train_loss
            if privacy_row is not None:
                row["privacy"] = privacy_row
            with open(metrics_path, "a") as f:
                f.write(json.dumps(_json_safe(row)) + "\n")
            rows.append(_json_safe(row))
            _save_checkpoint(ckpt, strategy_name, round_id, state)
            # A site without held-out cases (one case: it trains) has no Dice: shown as "-".
            per_site = " ".join(f"{n}={d:.3f}" if d == d else f"{n}=-" for n, d in dice.items())
            eps = privacy_summary_line(privacy_row) if privacy_row is not None else ""
            loss = "" if private else f"  loss {info.train_loss:.3f}"
            log(
                f"[{strategy_name}] round {number}/{total}{loss}  "
                f"Dice pooled {pooled:.3f}  ({per_site}){eps}  {row['seconds']:.1f}s"
            )
            if stop_after == (strategy_name, number):
                raise KeyboardInterrupt(f"stopped after {strategy_name} round {number}")
        if privacy is not None:
            privacy.close()
        _save_models(run / "models" / f"{strategy_name}.pt", strategy.final_models(state))
        evaluations[strategy_name] = final_evaluation(
            strategy,
            fed,
            state,
            plan.test,
            preprocess=plan.preprocess,
            cache=config.data.cache,
            hd95_units=config.data.hd95_units,
            test_datasets=test_datasets,
        )
        last_row = next((r for r in reversed(rows) if r["strategy"] == strategy_name), None)
        final_dice[strategy_name] = last_row["dice"] if last_row else {}
        final_pooled[strategy_name] = last_row["pooled_dice"] if last_row else float("nan")

    write_evaluation(run, evaluations, plan=plan, hd95_units=config.data.hd95_units)
    from secure_fl.training.report import write_report

    write_report(run, config, rows, stopped=stopped.to_dict() if stopped else None)
    log(f"report: {run / 'report.md'}")
    return RunSummary(run, final_dice, final_pooled, stopped, evaluations)
