"""How far the run got: budget stops (``stopped.json``) re-derived, and the run's own artefacts
(checkpoints, final models, report) against the ledger.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from secure_fl.privacy.audit.derive import Derived, _select
from secure_fl.privacy.audit.epsilon import _EpsilonCache
from secure_fl.privacy.audit.model import ERROR, INFO, WARNING, Finding, _int_or_none, _str_or_none
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import LedgerRecord


def _check_stop(
    run: Path,
    records: Sequence[LedgerRecord],
    config: Mapping[str, Any],
    pcfg: PrivacyConfig | None,
    epsilon: Mapping[str, Mapping[str, float]],
    findings: list[Finding],
) -> int | None:
    """Explain a budget stop (``stopped.json``), or a ledger that ends before the planned rounds.

    Returns the refused round's index when stopped.json names the round right after the
    ledger's last (or the last itself when that round's intents are all unconfirmed: a crashed
    round refused on resume), else None."""
    planned = _int_or_none(config.get("rounds"))
    last = max((r.entry.round for r in records), default=-1)
    path = run / "stopped.json"
    stop: Any = None
    if path.exists():
        try:
            stop = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stop = None
    if isinstance(stop, dict):
        number = _int_or_none(stop.get("round"))  # numbered from 1, as in metrics.jsonl
        rnd = None if number is None else number - 1
        strategy = _str_or_none(stop.get("strategy"))
        budgets = []
        if pcfg is not None:
            for name in ("site_budget", "federation_budget", "target_epsilon"):
                value = getattr(pcfg, name)
                if value is not None:
                    budgets.append(f"{name}={value:g}")
        acc = pcfg.accountant if pcfg else "rdp"
        spent = max((v.get(acc, v.get("rdp", 0.0)) for v in epsilon.values()), default=0.0)
        findings.append(
            Finding(
                "BUDGET_STOP",
                INFO,
                f"the run was stopped by its privacy budget ({', '.join(budgets) or '?'}) before "
                f"round {'?' if number is None else number} of {planned}, "
                f"after spending ε={spent:.4g}: "
                f"{stop.get('message', '')}",
                round=rnd,
                strategy=strategy,
            )
        )
        crashed = [r for r in records if r.entry.round == last]
        rerun = rnd == last and not any(r.confirmed for r in crashed)
        if rnd is not None and last >= rnd and not rerun:
            findings.append(
                Finding(
                    "STOP_INCONSISTENT",
                    WARNING,
                    f"stopped.json says round {number} was refused, but the ledger records "
                    f"round {last + 1}",
                    round=rnd,
                    strategy=strategy,
                )
            )
        elif rnd is not None and records and last < rnd - 1:
            findings.append(
                Finding(
                    "STOP_INCONSISTENT",
                    WARNING,
                    f"stopped.json says round {number} was refused, but the ledger ends at "
                    f"round {last + 1}: a budget refuses the round right after the last one "
                    f"run, so rounds {last + 2}..{rnd} are missing from the ledger",
                    round=rnd,
                    strategy=strategy,
                )
            )
        else:
            return rnd
    elif stop is not None or path.exists():
        findings.append(Finding("STOP_INCONSISTENT", WARNING, f"{path.name} is unreadable"))
    elif records and planned is not None and last < planned - 1:
        findings.append(
            Finding(
                "RUN_INCOMPLETE",
                WARNING,
                f"the ledger ends at round {last + 1} of the {planned} planned without a budget "
                "stop (stopped.json): the run was interrupted, is still running, or its tail "
                "was removed; epsilon is what the ledger holds so far, not the run's final spend",
                round=last,
            )
        )
    return None


def _check_stop_justified(
    records: Sequence[LedgerRecord],
    refused: int,
    pcfg: PrivacyConfig,
    derived: Mapping[str, Derived],
    caps: Mapping[int, float],
    schedule: Mapping[int, set[str]] | None,
    eps: _EpsilonCache,
    tolerance: float,
    findings: list[Finding],
) -> None:
    """A budget stop must be re-derivable: the runner refuses round ``refused`` (0-based) only
    when its planned records would take a site over ``site_budget`` / ``target_epsilon`` or the
    federation over ``federation_budget``. Each site that trains in that round (config.json and
    the datalist; every site at site level) is projected with one more round like its latest
    record (accounted as the audit accounts it; at least the re-derived sampling rate and steps,
    one step at site level). When no site and not the federation would go over,
    stopped.json does not explain the early end (``STOP_UNJUSTIFIED``, warning: e.g. a forged
    stop covering a truncated tail)."""
    site_budget = pcfg.site_budget
    if pcfg.target_epsilon is not None:
        cap = pcfg.target_epsilon
        site_budget = cap if site_budget is None else min(site_budget, cap)
    sites = sorted({r.entry.site for r in records} | set(derived))
    if pcfg.level == "sample" and schedule is not None and refused in schedule:
        training = sorted(schedule[refused])
    else:
        training = sites
    projected: dict[str, float] = {}
    for site in sites:
        events = _select(records, site, None, None, derived, caps)
        if site in training:
            own = [r for r in records if r.entry.site == site]
            d = derived.get(site)
            if not own:
                return  # nothing to project a fresh site's round from: not verifiable
            latest = max(own, key=lambda rec: rec.id)
            (nxt,) = _select([latest], site, None, None, derived, caps)
            steps = max(nxt.steps, 1, (d.steps or 0) if d is not None else 0)
            events = [*events, replace(nxt, steps=steps)]
        projected[site] = eps(events, pcfg.delta, pcfg.accountant)
    over_site = site_budget is not None and any(
        projected[s] > site_budget - tolerance for s in training if s in projected
    )
    worst = max(projected.values(), default=0.0)
    over_fed = pcfg.federation_budget is not None and worst > pcfg.federation_budget - tolerance
    if over_site or over_fed:
        return
    budgets = ", ".join(
        f"{name}={value:g}"
        for name, value in (
            ("site_budget", pcfg.site_budget),
            ("target_epsilon", pcfg.target_epsilon),
            ("federation_budget", pcfg.federation_budget),
        )
        if value is not None
    )
    findings.append(
        Finding(
            "STOP_UNJUSTIFIED",
            WARNING,
            f"stopped.json says a privacy budget refused round {refused + 1}, but one more round "
            f"brings the worst site only to ε={worst:.6g} ({pcfg.accountant}), within "
            f"{budgets or 'no budget at all'}: the stop does not explain why the ledger ends early",
            round=refused,
        )
    )


def _checkpoint_round(path: Path) -> tuple[int | None, str]:
    """The ``round`` (0-based index of the last finished round) of a runner checkpoint
    (``checkpoints/<strategy>.pt``, :func:`secure_fl.training.runner._save_checkpoint`), loaded
    with ``weights_only=True`` (no pickled code runs). ``(None, why)`` when unreadable."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency of the runner
        return None, f"torch is not importable ({exc})"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a malformed file
        return None, f"{type(exc).__name__}: {exc}"
    value = data.get("round") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None, f"it holds no valid 'round' (got {value!r})"
    return value, ""


def _check_progress(
    run: Path,
    records: Sequence[LedgerRecord],
    rows: Sequence[dict[str, Any]],
    config: Mapping[str, Any],
    strategies_named: bool,
    findings: list[Finding],
) -> None:
    """The run's own artefacts that record how far it got, against the ledger and metrics.jsonl.

    The runner confirms a round in the ledger, appends its metrics line and only then writes
    ``checkpoints/<strategy>.pt`` (holding the round); ``models/<strategy>.pt`` and ``report.md``
    are written once every planned round ran (or a budget stopped the run: ``stopped.json``). A
    checkpoint of a later round than the ledger and metrics.jsonl hold, or final models and a
    report of a run whose ledger ends early without a budget stop, mean records were removed:
    ``ARTEFACTS_AHEAD_OF_LEDGER`` (error; e.g. a tail truncated to under-state epsilon). An
    unreadable checkpoint is ``CHECKPOINT_UNREADABLE`` (warning). The gRPC server's own progress
    files count too (:func:`_check_server_progress`)."""
    _check_server_progress(run, records, rows, findings)
    planned = _int_or_none(config.get("rounds"))
    stopped = (run / "stopped.json").exists()
    raw = config.get("strategies")
    names = [s for s in raw if isinstance(s, str) and s] if isinstance(raw, list) else []
    names = names or sorted({r.entry.strategy for r in records if r.entry.strategy}) or ["fedavg"]
    for name in names:
        ledger_last = max(
            (r.entry.round for r in records if not strategies_named or r.entry.strategy == name),
            default=-1,
        )
        metrics_last = max(
            (
                rnd
                for row in rows
                if (rnd := _int_or_none(row.get("round"))) is not None
                and str(row.get("strategy") or name) == name
            ),
            default=-1,
        )
        held = min(ledger_last, metrics_last)
        where: dict[str, Any] = {"strategy": name if strategies_named else None}
        ckpt = run / "checkpoints" / f"{name}.pt"
        if ckpt.is_file():
            done, why = _checkpoint_round(ckpt)
            if done is None:
                findings.append(
                    Finding(
                        "CHECKPOINT_UNREADABLE",
                        WARNING,
                        f"checkpoints/{ckpt.name} is unreadable ({why}): how far the run got "
                        "cannot be checked against the ledger",
                        **where,
                    )
                )
            elif done > held:
                findings.append(
                    Finding(
                        "ARTEFACTS_AHEAD_OF_LEDGER",
                        ERROR,
                        f"checkpoints/{ckpt.name} says round {done + 1} finished, but the ledger "
                        f"records rounds up to {ledger_last + 1} and metrics.jsonl up to "
                        f"{metrics_last + 1}: the ledger under-records the run (a truncated tail)",
                        round=held + 1,
                        **where,
                    )
                )
        finals = [p for p in (run / "models" / f"{name}.pt", run / "report.md") if p.is_file()]
        if finals and not stopped and planned is not None and held < planned - 1:
            shown = ", ".join(str(p.relative_to(run)) for p in finals)
            findings.append(
                Finding(
                    "ARTEFACTS_AHEAD_OF_LEDGER",
                    ERROR,
                    f"{shown} exist: they are written once all {planned} planned rounds ran (or "
                    f"a budget stopped the run, which stopped.json would say), but the ledger "
                    f"records rounds up to {ledger_last + 1} and metrics.jsonl up to "
                    f"{metrics_last + 1}: the ledger under-records the run (a truncated tail; "
                    "or an extended run interrupted before it finished: resume it)",
                    round=held + 1,
                    **where,
                )
            )


def _server_round(run: Path) -> tuple[int | None, str, str | None]:
    """(0-based index of the last round the gRPC server's files say finished or None, the file
    that says so, why ``checkpoint.json`` is unreadable or None)."""
    done: int | None = None
    source = ""
    problem: str | None = None
    path = run / "checkpoint.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("completed_rounds")
        except (OSError, ValueError, AttributeError) as exc:
            value, problem = None, f"{type(exc).__name__}: {exc}"
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if value > 0:
                done, source = value - 1, "checkpoint.json"
        elif problem is None:
            problem = f"it holds no valid 'completed_rounds' (got {value!r})"
    records = run / "rounds"
    if records.is_dir():
        for item in records.glob("round-*.json"):
            digits = item.stem.removeprefix("round-")
            if len(digits) == 6 and digits.isdigit() and (done is None or int(digits) > done):
                done, source = int(digits), f"rounds/{item.name}"
    return done, source, problem


def _check_server_progress(
    run: Path,
    records: Sequence[LedgerRecord],
    rows: Sequence[dict[str, Any]],
    findings: list[Finding],
) -> None:
    """The gRPC server writes ``checkpoint.json`` (``completed_rounds``) and
    ``rounds/round-NNNNNN.json`` (NNNNNN: the 0-based index of a completed round) only after
    the round's ledger confirmation and metrics line: files that show more rounds than the
    ledger or metrics.jsonl hold mean records were removed (``ARTEFACTS_AHEAD_OF_LEDGER``,
    error). An unreadable ``checkpoint.json`` is ``CHECKPOINT_UNREADABLE`` (warning)."""
    done, source, problem = _server_round(run)
    if problem is not None:
        findings.append(
            Finding(
                "CHECKPOINT_UNREADABLE",
                WARNING,
                f"checkpoint.json is unreadable ({problem}): how far the server got cannot be "
                "checked against the ledger",
            )
        )
    if done is None:
        return
    ledger_last = max((r.entry.round for r in records), default=-1)
    metrics_last = max(
        (rnd for row in rows if (rnd := _int_or_none(row.get("round"))) is not None), default=-1
    )
    held = min(ledger_last, metrics_last)
    if done > held:
        findings.append(
            Finding(
                "ARTEFACTS_AHEAD_OF_LEDGER",
                ERROR,
                f"{source} says round {done + 1} finished, but the ledger records rounds up to "
                f"{ledger_last + 1} and metrics.jsonl up to {metrics_last + 1}: the ledger "
                "under-records the run (a truncated tail)",
                round=held + 1,
            )
        )
