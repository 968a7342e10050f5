"""Epsilon recomputation of the audit: a cache of accountant results, the reported epsilons checked
against the recomputed ones, and the epsilon-against-rounds curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from secure_fl.privacy.accounting import PrivacyEvent, canonical_events
from secure_fl.privacy.audit.derive import Derived, _select
from secure_fl.privacy.audit.model import (
    ERROR,
    WARNING,
    CurvePoint,
    Finding,
    _anchor_of,
    _int_or_none,
    _label,
    _num,
)
from secure_fl.privacy.ledger import LedgerRecord

EpsilonFn = Callable[[Iterable[PrivacyEvent], float, str], float]
"""An accountant as the audit calls it: ``(events, delta, accountant) -> epsilon``."""


class _EpsilonCache:
    """Memoised ``compute(events, delta, accountant)`` keyed on the canonical events (composition
    is commutative, so equal histories are computed once)."""

    def __init__(self, compute: EpsilonFn) -> None:
        self._compute = compute
        self._values: dict[tuple[tuple[PrivacyEvent, ...], float, str], float] = {}

    def __call__(self, events: Iterable[PrivacyEvent], delta: float, accountant: str) -> float:
        key = (canonical_events(events), delta, accountant)
        if key not in self._values:
            self._values[key] = self._compute(key[0], delta, accountant)
        return self._values[key]


def _check_reported(
    rows: Sequence[dict[str, Any]],
    *,
    records: Sequence[LedgerRecord],
    sites: Sequence[str],
    last_seq: Mapping[tuple[str, int], int],
    strategies_named: bool,
    derived: Mapping[str, Derived],
    caps: Mapping[int, float],
    eps: _EpsilonCache,
    delta: float,
    config_accountant: str,
    tolerance: float,
    dp_enabled: bool,
    findings: list[Finding],
) -> list[tuple[str, str, float]]:
    """Every epsilon metrics.jsonl reports, against the one recomputed at the configuration's
    ``delta`` with its accountant on the ledger as it stood after that row's round (or its anchor,
    when later): ``EPSILON_UNDER_REPORTED`` / ``EPSILON_OVER_REPORTED`` (errors), another delta or
    accountant claimed (``REPORT_DELTA_MISMATCH``, ``REPORT_ACCOUNTANT_MISMATCH``), a missing
    report or anchor (``EPSILON_NOT_REPORTED``, ``ANCHOR_MISSING``, warnings). Returns the
    reported values as ``(plot label, site, epsilon)``; appends findings, raises nothing."""
    reported: list[tuple[str, str, float]] = []
    for row in rows:
        strategy = str(row.get("strategy") or "")
        rnd = _int_or_none(row.get("round"))
        label = _label(strategy, rnd + 1 if rnd is not None else 0)
        where_row: dict[str, Any] = {"round": rnd, "strategy": strategy or None}
        priv = row.get("privacy")
        if not isinstance(priv, dict):
            if dp_enabled:
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        "metrics row carries no privacy block although DP is configured",
                        **where_row,
                    )
                )
            continue
        claimed_acc = priv.get("accountant", config_accountant)
        if claimed_acc != config_accountant:
            findings.append(
                Finding(
                    "REPORT_ACCOUNTANT_MISMATCH",
                    ERROR,
                    f"the row reports epsilon with accountant {claimed_acc!r}, the configuration "
                    f"says {config_accountant!r}: compared with {config_accountant!r}",
                    **where_row,
                )
            )
        claimed_delta = _num(priv.get("delta"))
        if claimed_delta is None or not math.isclose(claimed_delta, delta, rel_tol=1e-9):
            findings.append(
                Finding(
                    "REPORT_DELTA_MISMATCH",
                    ERROR,
                    f"the row reports epsilon at delta={priv.get('delta')!r}, the configuration "
                    f"says {delta:g}: compared at {delta:g}",
                    **where_row,
                )
            )
        scope = priv.get("scope", "ledger")
        row_anchor = _anchor_of(priv)
        if row_anchor is None and dp_enabled:
            findings.append(
                Finding(
                    "ANCHOR_MISSING",
                    WARNING,
                    "the row carries no ledger anchor (privacy.ledger_head): a truncated ledger "
                    "cannot be told from this row; compared with the ledger after its round",
                    **where_row,
                )
            )
        round_seq = last_seq.get(
            (strategy if strategies_named else "", rnd if rnd is not None else -1)
        )
        upto: int | None = round_seq
        if isinstance(row_anchor, dict) and isinstance(row_anchor.get("count"), int):
            upto = max(int(row_anchor["count"]), round_seq or 0)
        if upto is None:
            continue  # reported as MISSING_ROUND
        values = priv.get("epsilon")
        if not isinstance(values, dict):
            findings.append(
                Finding(
                    "EPSILON_NOT_REPORTED",
                    WARNING,
                    "privacy block has no 'epsilon' mapping",
                    **where_row,
                )
            )
            continue
        scope_strategy = strategy if scope == "strategy" and strategies_named else None
        for site in sites:
            events = _select(records, site, scope_strategy, upto, derived, caps)
            if site not in values and canonical_events(events):
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        f"site {site!r} has spent privacy but the row reports no epsilon",
                        site=site,
                        **where_row,
                    )
                )
        for site, value in values.items():
            v = _num(value)
            if v is None:
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        f"reported epsilon {value!r} is not a number",
                        site=str(site),
                        **where_row,
                    )
                )
                continue
            reported.append((label, str(site), v))
            events = _select(records, str(site), scope_strategy, upto, derived, caps)
            recomputed = eps(events, delta, config_accountant)
            where = f"(accountant {config_accountant}, δ={delta:g}, ledger up to record {upto})"
            if v < recomputed - tolerance:
                findings.append(
                    Finding(
                        "EPSILON_UNDER_REPORTED",
                        ERROR,
                        f"reported ε={v:.6g} is below the ε={recomputed:.6g} recomputed from the "
                        f"ledger {where}",
                        site=str(site),
                        **where_row,
                    )
                )
            elif v > recomputed + tolerance:
                findings.append(
                    Finding(
                        "EPSILON_OVER_REPORTED",
                        ERROR,
                        f"reported ε={v:.6g} exceeds the ε={recomputed:.6g} recomputed from the "
                        f"ledger {where}: the ledger is missing spend the run accounted for",
                        site=str(site),
                        **where_row,
                    )
                )
    return reported


def _curve(
    order: Sequence[tuple[str, int]],
    last_seq: Mapping[tuple[str, int], int],
    records: Sequence[LedgerRecord],
    sites: Sequence[str],
    derived: Mapping[str, Derived],
    caps: Mapping[int, float],
    eps: _EpsilonCache,
    delta: float,
) -> list[CurvePoint]:
    """The cumulative RDP epsilon of every site after each (strategy, round) of the ledger, in
    ledger order, with rounds numbered from 1 (what ``epsilon_vs_rounds.png`` plots)."""
    curve = []
    for strategy, rnd in order:
        upto_seq = last_seq[(strategy, rnd)]
        point = {}
        for site in sites:
            events = _select(records, site, None, upto_seq, derived, caps)
            if canonical_events(events):
                point[site] = eps(events, delta, "rdp")
        curve.append(CurvePoint(_label(strategy, rnd + 1), strategy, rnd + 1, point))
    return curve
