"""The audit's orchestration: :func:`audit_run` reads the run folder and runs every check."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.jsonl import read_jsonl
from secure_fl.privacy.accounting import ACCOUNTANTS
from secure_fl.privacy.audit.chain import (
    _check_anchors,
    _check_numbering,
    _read_ledger,
    _round_ends,
)
from secure_fl.privacy.audit.checks import (
    _check_accountants,
    _check_config,
    _check_noise_source,
    _check_records,
    _check_rounds,
)
from secure_fl.privacy.audit.derive import Derived, _check_derived, _derive, _justify_noise, _select
from secure_fl.privacy.audit.epsilon import EpsilonFn, _check_reported, _curve, _EpsilonCache
from secure_fl.privacy.audit.model import (
    AUDIT_ACCOUNTANTS,
    ERROR,
    INFO,
    WARNING,
    Finding,
    _num,
    _to_index,
)
from secure_fl.privacy.audit.report import AuditResult
from secure_fl.privacy.audit.rows import _check_metrics_rows, _drop_identical_duplicates
from secure_fl.privacy.audit.stop import _check_progress, _check_stop, _check_stop_justified
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import LEDGER_FILENAME


def audit_run(
    run_dir: str | Path,
    *,
    tolerance: float = 1e-6,
    accountants: Sequence[str] = AUDIT_ACCOUNTANTS,
    datalist: str | Path | None = None,
) -> AuditResult:
    """Audit the privacy of the run in ``run_dir`` (every check: :mod:`secure_fl.privacy.audit`).

    Guarantee: against anyone who can edit some files of the run folder (metrics.jsonl, the
    ledger, its head) but not all of them consistently with config.json and the datalist, a run
    that under-states its spend does not PASS. ``tolerance`` is the absolute epsilon tolerance
    for comparisons with reported and configured values; ``datalist`` overrides the datalist named
    in config.json (the auditor's own copy). Returns an :class:`AuditResult` (``status`` PASS,
    FAIL or NO DP); raises ConfigError when ``run_dir`` is not a run folder (no readable
    config.json) or an argument is invalid.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run_dir {run} is not a folder")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
        raise ConfigError(f"tolerance must be a number >= 0, got {tolerance!r}")
    for acc in accountants:
        if acc not in ACCOUNTANTS:
            raise ConfigError(f"accountants must be drawn from {ACCOUNTANTS}, got {acc!r}")
    cfg_path = run / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{run} holds no config.json: not a run folder") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg_path} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path} must hold a JSON object")

    findings: list[Finding] = []
    raw_privacy = config.get("privacy")
    pcfg: PrivacyConfig | None
    try:
        pcfg = PrivacyConfig.from_dict(raw_privacy) if raw_privacy is not None else PrivacyConfig()
    except ConfigError as exc:
        pcfg = None
        findings.append(Finding("CONFIG_INVALID", ERROR, f"config.json privacy section: {exc}"))
    delta = pcfg.delta if pcfg else (_num((raw_privacy or {}).get("delta")) or 1e-5)
    config_accountant = pcfg.accountant if pcfg else "rdp"
    dp_enabled = pcfg.enabled if pcfg else True
    # metrics.jsonl numbers rounds from 1, the ledger from 0: every check below works on the
    # ledger's index (row round - 1); findings are numbered from 1 again at the end.
    raw_metrics = _drop_identical_duplicates(read_jsonl(run / "metrics.jsonl"), findings)
    rows = [_to_index(row) for row in raw_metrics]
    privacy_dict = (
        pcfg.to_dict() if pcfg else (raw_privacy if isinstance(raw_privacy, dict) else None)
    )
    if not dp_enabled:
        findings.append(
            Finding(
                "NO_DP",
                ERROR,
                "no differential privacy: epsilon = infinity (config.json privacy.level='none'); "
                "the released models carry no DP guarantee for any patient or site",
            )
        )

    def result(**kw: Any) -> AuditResult:
        if not dp_enabled:
            kw["federation_epsilon"] = {acc: math.inf for acc in accountants}
        return AuditResult(
            run_dir=run,
            findings=findings,
            delta=delta,
            privacy=privacy_dict,
            dp=dp_enabled,
            **kw,
        )

    ledger_path = run / LEDGER_FILENAME
    if not ledger_path.exists():
        if dp_enabled:
            findings.append(
                Finding(
                    "LEDGER_MISSING",
                    ERROR,
                    f"privacy level {pcfg.level if pcfg else '?'!r} is configured but "
                    f"{LEDGER_FILENAME} is missing: nothing of what was spent can be verified",
                )
            )
        return result(epsilon={}, federation_epsilon={}, records=0)

    read = _read_ledger(ledger_path, rows, findings)
    if read is None:
        return result(epsilon={}, federation_epsilon={}, records=0)
    records, raw_rows, anchors = read

    _check_numbering(raw_metrics, findings)
    eps = _EpsilonCache(_accountant())
    sites = sorted({r.entry.site for r in records})
    strategies_named = any(r.entry.strategy for r in records)
    last_seq, order = _round_ends(raw_rows)

    derived: dict[str, Derived] = {}
    schedule: dict[int, set[str]] | None = None
    caps: dict[int, float] = {}
    if dp_enabled and pcfg is not None and records:
        derived, schedule = _derive(config, pcfg, sites, datalist, findings)
        _check_derived(records, derived, findings)
        caps = _justify_noise(records, derived, schedule, pcfg, config, findings)
    _check_anchors(anchors, last_seq, strategies_named, findings)

    # recomputed totals
    epsilon: dict[str, dict[str, float]] = {}
    for site in sites:
        events = _select(records, site, None, None, derived, caps)
        epsilon[site] = {acc: eps(events, delta, acc) for acc in accountants}
    federation = {acc: max((epsilon[s][acc] for s in sites), default=0.0) for acc in accountants}
    _check_accountants(epsilon, tolerance, findings)
    if pcfg is not None:
        _check_config(pcfg, records, epsilon, eps, delta, tolerance, derived, caps, findings)
        if not dp_enabled and records:
            findings.append(
                Finding(
                    "CONFIG_MISMATCH",
                    WARNING,
                    f"config.json says privacy.level='none' but the ledger holds {len(records)} "
                    "DP records",
                )
            )
    _check_records(records, findings)
    _check_noise_source(records, findings)
    _check_rounds(records, rows, config, pcfg, dp_enabled, strategies_named, schedule, findings)
    _check_metrics_rows(records, rows, strategies_named, dp_enabled, findings)
    refused = _check_stop(run, records, config, pcfg, epsilon, findings)
    if refused is not None and pcfg is not None and records:
        _check_stop_justified(
            records, refused, pcfg, derived, caps, schedule, eps, tolerance, findings
        )
    if dp_enabled:
        _check_progress(run, records, rows, config, strategies_named, findings)

    reported = _check_reported(
        rows,
        records=records,
        sites=sites,
        last_seq=last_seq,
        strategies_named=strategies_named,
        derived=derived,
        caps=caps,
        eps=eps,
        delta=delta,
        config_accountant=config_accountant,
        tolerance=tolerance,
        dp_enabled=dp_enabled,
        findings=findings,
    )
    curve = _curve(order, last_seq, records, sites, derived, caps, eps, delta)
    rank = {ERROR: 0, WARNING: 1, INFO: 2}
    findings[:] = [f if f.round is None else replace(f, round=f.round + 1) for f in findings]
    findings.sort(key=lambda f: (rank.get(f.severity, 3), f.strategy or "", f.round or -1, f.code))
    return result(
        epsilon=epsilon,
        federation_epsilon=federation,
        records=len(raw_rows),
        curve=curve,
        reported=reported,
    )


def _accountant() -> EpsilonFn:
    """``secure_fl.privacy.audit.epsilon_of_events``, looked up when the audit runs: the one name
    to replace to plant another accountant (as
    ``tests/privacy/test_privacy_audit.py::test_accountant_disagreement_is_found`` does)."""
    from secure_fl.privacy import audit

    compute: EpsilonFn = audit.epsilon_of_events
    return compute
