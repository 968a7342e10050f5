"""The final evaluation of a run: Dice and Hausdorff 95 of each strategy's last model(s) on every
site's validation cases and on the held-out test set (:mod:`secure_fl.training.heldout`), written
as ``evaluation.json`` and summarised in the report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.data import Case, PreprocessConfig, group_by_site
from secure_fl.training.model import State

if TYPE_CHECKING:
    from secure_fl.training.heldout import DataPlan

EVALUATION_FILENAME = "evaluation.json"
"""The final evaluation of a run (validation and test, Dice and HD95), in the run folder."""


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"cases": 0}
    return {
        "cases": len(rows),
        "dice": float(np.mean([r["dice"] for r in rows])),
        "hd95": float(np.mean([r["hd95"] for r in rows])),
        "hd95_empty": int(sum(bool(r["hd95_empty"]) for r in rows)),
    }


def _unique(states: Sequence[State]) -> list[State]:
    seen: set[int] = set()
    out = []
    for s in states:
        if id(s) not in seen:
            seen.add(id(s))
            out.append(s)
    return out


def _score(
    dataset: Any,
    states: Sequence[State],
    *,
    mean_over_models: bool,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    from secure_fl.training.evaluation import case_scores

    if not mean_over_models or len(states) < 2:
        return case_scores(dataset, states, **kwargs)
    per_model = [case_scores(dataset, [s], **kwargs) for s in states]
    rows = []
    for case in zip(*per_model, strict=True):
        rows.append(
            {
                "case_id": case[0]["case_id"],
                "site": case[0]["site"],
                "dice": float(np.mean([r["dice"] for r in case])),
                "hd95": float(np.mean([r["hd95"] for r in case])),
                "hd95_empty": any(r["hd95_empty"] for r in case),
            }
        )
    return rows


def final_evaluation(
    strategy: Any,
    fed: Any,
    state: Mapping[str, State],
    test: Sequence[Case],
    *,
    preprocess: PreprocessConfig,
    cache: bool = True,
    hd95_units: str = "mm",
    test_datasets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dice and Hausdorff 95 of a strategy's final model(s) on every site's validation cases and
    on the ``test`` cases, pooled and per site.

    The models of a site are ``strategy.eval_states(fed, state, site)`` (as in the per-round
    validation). A test case of an institution that did not train (a held-out site, or a site
    only the ``test`` section names) is scored with every model the strategy has (their ensemble,
    or each model alone and averaged when ``strategy.mean_over_models``): for FedAvg the global
    model, for local training the mean local model. A site without validation cases has no
    ``validation`` entry (absent, not a made-up score).

    ``test_datasets`` caches the test datasets per site across strategies (pass the same dict).

    Returns ``{"validation": {"per_site": {...}, "pooled": {...}}, "test": {"per_site": {...},
    "pooled": {...}, "cases": [...]}}``; each summary has ``cases``, ``dice``, ``hd95`` (means)
    and ``hd95_empty`` (how many cases had an empty prediction or label; HD95 then holds the
    stated value of :func:`~secure_fl.training.evaluation.hausdorff95`). ``test`` is None
    without test cases.
    """
    from secure_fl.data import make_dataset

    mean_over = bool(getattr(strategy, "mean_over_models", False))
    validation: dict[str, dict[str, Any]] = {}
    val_rows: list[dict[str, Any]] = []
    some_site = None
    for name in fed.names:
        trainer = fed.sites[name]
        trainer.initialize()
        some_site = trainer
        if trainer.val_ds is None:
            continue
        rows = _score(
            trainer.val_ds,
            strategy.eval_states(fed, state, name),
            mean_over_models=mean_over,
            model_factory=trainer.model_factory,
            roi_size=preprocess.patch,
            device=trainer.device,
            hd95_units=hd95_units,
            progress=trainer.progress,
            progress_desc=f"{name}: Dice, HD95",
        )
        validation[name] = _summary(rows)
        val_rows.extend(rows)
    out: dict[str, Any] = {
        "validation": {"per_site": validation, "pooled": _summary(val_rows)},
        "test": None,
    }
    if not test or some_site is None:
        return out
    everyone = _unique([s for name in fed.names for s in strategy.eval_states(fed, state, name)])
    datasets = test_datasets if test_datasets is not None else {}
    per_site: dict[str, dict[str, Any]] = {}
    test_rows: list[dict[str, Any]] = []
    for site, cases in group_by_site(test).items():
        if site not in datasets:
            datasets[site] = make_dataset(cases, preprocess, train=False, cache=cache)
        states = strategy.eval_states(fed, state, site) if site in fed.sites else everyone
        rows = _score(
            datasets[site],
            states,
            mean_over_models=mean_over,
            model_factory=some_site.model_factory,
            roi_size=preprocess.patch,
            device=some_site.device,
            hd95_units=hd95_units,
            progress=some_site.progress,
            progress_desc=f"test {site}: Dice, HD95",
        )
        for row in rows:
            row["trained"] = site in fed.sites
        per_site[site] = {**_summary(rows), "trained": site in fed.sites}
        test_rows.extend(rows)
    out["test"] = {"per_site": per_site, "pooled": _summary(test_rows), "cases": test_rows}
    return out


def write_evaluation(
    run: Path, results: Mapping[str, Any], *, plan: DataPlan, hd95_units: str
) -> Path:
    """Write ``evaluation.json`` (atomically): per strategy the :func:`final_evaluation`, plus
    what was held out, the target and how HD95 was measured. Returns its path."""
    document = {
        "strategies": dict(results),
        "holdout_sites": list(plan.holdout_sites),
        "test_cases": [c.case_id for c in plan.test],
        "label_scheme": plan.label_scheme,
        "foreground_labels": list(plan.preprocess.foreground) or "label > 0",
        "modalities": list(plan.preprocess.modalities),
        "hd95": {
            "units": hd95_units,
            "percentile": 95,
            "empty": "both empty: 0; prediction or label empty: the grid diagonal",
        },
    }
    path = Path(run) / EVALUATION_FILENAME
    atomic_write(path, (json.dumps(_safe(document), indent=2) + "\n").encode())
    return path


def _safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _cell(summary: Mapping[str, Any] | None, key: str, fmt: str) -> str:
    if not summary or summary.get(key) is None:
        return "-"
    return format(summary[key], fmt)


def evaluation_markdown(run: Path) -> list[str]:
    """The report's section on the final evaluation (from ``evaluation.json``; empty when the
    run has none): per strategy the pooled validation and test Dice and HD95, and the test set
    per site (held-out institutions marked)."""
    path = Path(run) / EVALUATION_FILENAME
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    hd = doc.get("hd95", {})
    units = hd.get("units", "mm")
    target = doc.get("foreground_labels")
    lines = [
        "",
        "## Final evaluation",
        "",
        f"Target labels {target}, modalities {doc.get('modalities')}. Dice and Hausdorff 95 "
        f"(HD95, {units}; {hd.get('empty', '')}; `empty` counts those cases) of the final "
        "model(s): validation = each site's held-out cases, test = cases no site trained or "
        "validated on, evaluated once.",
        "",
        "| strategy | val Dice | val HD95 | test Dice | test HD95 | test cases | empty |",
        "|---|---|---|---|---|---|---|",
    ]
    strategies = doc.get("strategies", {})
    for name, result in strategies.items():
        val = (result.get("validation") or {}).get("pooled")
        test = (result.get("test") or {}).get("pooled")
        lines.append(
            f"| {name} | {_cell(val, 'dice', '.3f')} | {_cell(val, 'hd95', '.2f')} | "
            f"{_cell(test, 'dice', '.3f')} | {_cell(test, 'hd95', '.2f')} | "
            f"{_cell(test, 'cases', 'd')} | {_cell(test, 'hd95_empty', 'd')} |"
        )
    held = doc.get("holdout_sites") or []
    sites = sorted(
        {s for r in strategies.values() for s in ((r.get("test") or {}).get("per_site") or {})}
    )
    if sites:
        lines += [
            "",
            "Test set per site (Dice / HD95"
            + (f"; held out, never trained: {', '.join(held)}" if held else "")
            + "):",
            "",
            "| strategy | "
            + " | ".join(f"{s}{' (held out)' if s in held else ''}" for s in sites)
            + " |",
            "|---|" + "---|" * len(sites),
        ]
        for name, result in strategies.items():
            per_site = (result.get("test") or {}).get("per_site") or {}
            cells = [
                f"{_cell(per_site.get(s), 'dice', '.3f')} / {_cell(per_site.get(s), 'hd95', '.2f')}"
                for s in sites
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
