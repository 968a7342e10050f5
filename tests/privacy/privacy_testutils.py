"""A synthetic run folder (config.json + metrics.jsonl + privacy ledger) written as a runner would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secure_fl.privacy import LEDGER_FILENAME, LedgerEntry, PrivacyConfig, PrivacyLedger

EntryFn = Callable[[str, int], LedgerEntry | None]
ConfirmFn = Callable[[str, int], dict[str, Any] | None]


def sample_entry(site: str, rnd: int, **overrides: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "site": site,
        "round": rnd,
        "level": "sample",
        "mechanism": "gaussian",
        "noise_multiplier": 1.0,
        "clip": 1.0,
        "sample_rate": 0.05,
        "steps": 20,
        "survivors": None,
        "delta": 1e-5,
        "params": {"batch_size": 4, "dataset_size": 80, "noise_source": "csprng"},
        "strategy": "fedavg",
    }
    values.update(overrides)
    return LedgerEntry(**values)


def write_run(
    run: Path,
    config: PrivacyConfig,
    *,
    sites: tuple[str, ...] = ("hospital-a", "hospital-b"),
    rounds: int = 3,
    entry: EntryFn | None = None,
    confirm: ConfirmFn | None = None,
    report: Callable[[str, int, float], float] | None = None,
    metrics_rounds: int | None = None,
    strategy: str = "fedavg",
    train_cases: int = 80,
) -> Path:
    """Run the ledger protocol for ``rounds`` rounds and write config.json and metrics.jsonl.

    ``entry(site, round)`` gives the planned entry (None: not recorded), ``confirm(site, round)``
    the confirm keyword arguments (None: never confirmed, as after a crash), ``report(site,
    round, eps)`` the epsilon written to metrics (default: the ledger's own value).
    config.json names a datalist of ``train_cases`` training cases per site (no held-out cases),
    batch size 4 and one local epoch: the q = 0.05 and 20 steps per round of :func:`sample_entry`.
    """
    run.mkdir(parents=True, exist_ok=True)
    make_entry: EntryFn = entry or (lambda s, r: sample_entry(s, r, strategy=strategy))
    make_confirm: ConfirmFn = confirm or (lambda s, r: {})
    rows = []
    with PrivacyLedger(run / LEDGER_FILENAME) as ledger:
        for rnd in range(rounds):
            ids = {}
            for site in sites:
                e = make_entry(site, rnd)
                if e is not None:
                    ids[site] = ledger.record_intent(e)
            for site, intent in ids.items():
                kwargs = make_confirm(site, rnd)
                if kwargs is not None:
                    ledger.confirm(intent, **kwargs)
            eps = {s: ledger.spent(s, config.delta, config.accountant) for s in ledger.sites()}
            if report is not None:
                eps = {s: report(s, rnd, v) for s, v in eps.items()}
            rows.append(
                {
                    "strategy": strategy,
                    "round": rnd + 1,  # metrics.jsonl numbers rounds from 1, the ledger from 0
                    "dice": {s: 0.5 for s in sites},
                    "privacy": {
                        "epsilon": eps,
                        "delta": config.delta,
                        "accountant": config.accountant,
                        "ledger_head": ledger.head().to_dict(),
                    },
                }
            )
    n = rounds if metrics_rounds is None else metrics_rounds
    for rnd in range(rounds, n):  # metrics rows the ledger knows nothing about
        rows.append({**rows[-1], "round": rnd + 1})
        rows[-1]["privacy"] = {k: v for k, v in rows[-1]["privacy"].items() if k != "ledger_head"}
    datalist = write_datalist(run / "data", sites, train_cases)
    config_json = {
        "name": "t",
        "seed": 0,
        "rounds": n,
        "strategies": [strategy],
        "train": {"batch_size": 4, "local_epochs": 1},
        "data": {"datalist": str(datalist), "val_fraction": 0.0},
        "privacy": config.to_dict(),
    }
    (run / "config.json").write_text(json.dumps(config_json, indent=2))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return run


def write_datalist(folder: Path, sites: tuple[str, ...], cases: int) -> Path:
    """A datalist of ``cases`` cases per site (empty image/label files: the audit needs only the
    sites and case ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.nii.gz").write_bytes(b"")
    entries = [
        {"case_id": f"{site}-{i:03d}", "site": site, "image": "x.nii.gz", "label": "x.nii.gz"}
        for site in sites
        for i in range(cases)
    ]
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def sample_config(**overrides: Any) -> PrivacyConfig:
    values: dict[str, Any] = {
        "level": "sample",
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "site_budget": 20.0,
    }
    values.update(overrides)
    return PrivacyConfig(**values)
