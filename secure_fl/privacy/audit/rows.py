"""metrics.jsonl cross-checked against the ledger: one row per released round, in order, with
the survivors the ledger and the row's own DP event account.

Every writer of a DP run folder (the simulation runner, the gRPC server's
:class:`~secure_fl.transport.privacy.ServerPrivacy`, the Flower workflow's
:class:`~secure_fl.integrations.flower.privacy.FlowerPrivacy`) confirms a round's ledger intents
and then appends that round's row; an aborted round (nothing released) leaves its intents
unconfirmed and writes no row, a budget stop charges nothing and writes ``stopped.json``. So:

* a (strategy, round) with a confirmed ledger record and no metrics row is ``METRICS_ROW_MISSING``
  (error: e.g. the last row dropped to hide a release; a crash between the confirmation and the
  row is indistinguishable from it and fails too);
* the rows of one strategy must be numbered in non-decreasing order (``METRICS_ROW_ORDER``,
  error: rows moved or renumbered);
* a row that repeats an earlier row exactly is ``METRICS_ROW_DUPLICATE`` (info, tolerated: a
  server that crashed after writing a round's row and before its checkpoint may write it again)
  and dropped before every check of the audit (:func:`_drop_identical_duplicates`, called by
  :func:`~secure_fl.privacy.audit.run.audit_run`); two different rows of one round are left to the anchor checks (a server that re-ran a released
  round after a crash writes a second row with a later ledger anchor, and charged it twice);
* a row's ``survivors`` list must have as many names as the row's own ``dp_event.survivors``
  and, where the ledger's confirmations record a survivor count for the round (distributed
  trust), as one of those counts (``METRICS_SURVIVORS_MISMATCH``, error: a survivors list
  shrunk or padded). Survivors the ledger did not charge are ``UNCHARGED_SURVIVOR`` (checks).

Rows without an integer ``round`` are skipped here; round numbers in findings are the ledger's
0-based index (the audit renumbers them from 1 at the end), in messages from 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secure_fl.privacy.audit.model import ERROR, INFO, Finding, _int_or_none, _str_or_none
from secure_fl.privacy.ledger import LedgerRecord


def _key(row: dict[str, Any], strategies_named: bool) -> str:
    return str(row.get("strategy") or "") if strategies_named else ""


def _check_row_survivor_count(
    row: dict[str, Any],
    rnd: int,
    strategy: str,
    ledger_counts: set[int],
    findings: list[Finding],
) -> None:
    names = row.get("survivors")
    if not isinstance(names, list):
        return
    event = row.get("dp_event")
    claimed = _int_or_none(event.get("survivors")) if isinstance(event, dict) else None
    problems = []
    if claimed is not None and claimed != len(names):
        problems.append(f"its dp_event counts {claimed}")
    if ledger_counts and len(names) not in ledger_counts:
        problems.append(f"the ledger's confirmations count {sorted(ledger_counts)}")
    if problems:
        findings.append(
            Finding(
                "METRICS_SURVIVORS_MISMATCH",
                ERROR,
                f"metrics.jsonl names {len(names)} survivor(s) of round {rnd + 1}, but "
                + " and ".join(problems),
                round=rnd,
                strategy=strategy or None,
            )
        )


def _drop_identical_duplicates(
    raw_rows: Sequence[dict[str, Any]], findings: list[Finding]
) -> list[dict[str, Any]]:
    """``raw_rows`` (metrics.jsonl as written, rounds from 1) without the rows that repeat an
    earlier row exactly, each dropped one reported as ``METRICS_ROW_DUPLICATE`` (info: module
    docstring); every other check then sees each row once."""
    kept: list[dict[str, Any]] = []
    for row in raw_rows:
        if any(row == other for other in kept):
            rnd = _int_or_none(row.get("round"))
            findings.append(
                Finding(
                    "METRICS_ROW_DUPLICATE",
                    INFO,
                    f"metrics.jsonl repeats the row of round {rnd} exactly; the copy is ignored "
                    "(tolerated: a server that crashed after a round's row and before its "
                    "checkpoint may write it again)",
                    round=None if rnd is None else rnd - 1,
                    strategy=_str_or_none(row.get("strategy")),
                )
            )
            continue
        kept.append(row)
    return kept


def _check_metrics_rows(
    records: Sequence[LedgerRecord],
    rows: Sequence[dict[str, Any]],
    strategies_named: bool,
    dp_enabled: bool,
    findings: list[Finding],
) -> None:
    """The module docstring's checks; ``rows`` carry the ledger's 0-based round index."""
    if not dp_enabled:
        return
    released: set[tuple[str, int]] = set()
    counts: dict[tuple[str, int], set[int]] = {}
    for r in records:
        if not r.confirmed:
            continue
        key = (r.entry.strategy if strategies_named else "", r.entry.round)
        released.add(key)
        if r.confirmed_survivors is not None:
            counts.setdefault(key, set()).add(r.confirmed_survivors)
    seen: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    for row in rows:
        rnd = _int_or_none(row.get("round"))
        if rnd is None:
            continue
        s = _key(row, strategies_named)
        seen.add((s, rnd))
        if s in last and rnd < last[s]:
            findings.append(
                Finding(
                    "METRICS_ROW_ORDER",
                    ERROR,
                    f"metrics.jsonl has round {rnd + 1} after round {last[s] + 1}: rows are "
                    "appended as rounds are released (moved or renumbered rows)",
                    round=rnd,
                    strategy=s or None,
                )
            )
        last[s] = max(rnd, last.get(s, rnd))
        _check_row_survivor_count(row, rnd, s, counts.get((s, rnd), set()), findings)
    for s, rnd in sorted(released - seen):
        findings.append(
            Finding(
                "METRICS_ROW_MISSING",
                ERROR,
                f"the ledger confirmed round {rnd + 1} (a released round) but metrics.jsonl has "
                "no row for it (a dropped row, or a crash between the release and its row)",
                round=rnd,
                strategy=s or None,
            )
        )
