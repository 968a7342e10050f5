"""Ledger-chain checks of the audit: the hash chain, its head anchor and the anchors copied into
metrics.jsonl.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.privacy.audit.model import ERROR, Finding, _anchor_of, _int_or_none, _str_or_none
from secure_fl.privacy.ledger import LedgerHead, LedgerIntegrityError, LedgerRecord, PrivacyLedger


def _check_anchors(
    anchors: Sequence[tuple[dict[str, Any], LedgerHead | None]],
    last_seq: Mapping[tuple[str, int], int],
    strategies_named: bool,
    findings: list[Finding],
) -> None:
    """Anchors of successive rows must grow, and each must cover its own round's records."""
    previous: int | None = None
    for row, anchor in anchors:
        if anchor is None:
            continue
        rnd = _int_or_none(row.get("round"))
        strategy = str(row.get("strategy") or "")
        where: dict[str, Any] = {"round": rnd, "strategy": strategy or None}
        if previous is not None and anchor.count <= previous:
            findings.append(
                Finding(
                    "ANCHOR_NOT_MONOTONE",
                    ERROR,
                    f"the row's ledger anchor (record {anchor.count}) does not come after the "
                    f"previous row's (record {previous}): an anchor was re-used or rows reordered",
                    **where,
                )
            )
        previous = anchor.count if previous is None else max(previous, anchor.count)
        needed = last_seq.get(
            (strategy if strategies_named else "", rnd if rnd is not None else -1)
        )
        if needed is not None and anchor.count < needed:
            findings.append(
                Finding(
                    "ANCHOR_STALE",
                    ERROR,
                    f"the row's ledger anchor stops at record {anchor.count}, before record "
                    f"{needed}, the last of its own round: it is an earlier round's anchor",
                    **where,
                )
            )


def _check_numbering(rows: Sequence[dict[str, Any]], findings: list[Finding]) -> None:
    """metrics.jsonl numbers rounds from 1; a row with round < 1 was written by an older
    secure-fl (rounds from 0) or edited: its rows cannot be matched with the ledger's rounds."""
    bad = [r["round"] for r in rows if isinstance(r.get("round"), int) and r["round"] < 1]
    if bad:
        findings.append(
            Finding(
                "ROUND_NUMBERING",
                ERROR,
                f"metrics.jsonl has round {bad[0]}: rounds are numbered from 1 (a run written "
                "by a secure-fl that numbered them from 0, or an edited file); its rows are "
                "compared with the ledger's round - 1",
            )
        )


Anchors = list[tuple[dict[str, Any], LedgerHead | None]]
"""The metrics rows that carry a ledger anchor, each with its parsed anchor (None: it did not
match the ledger, reported as ``ANCHOR_MISMATCH``)."""


def _read_ledger(
    ledger_path: Path, rows: Sequence[dict[str, Any]], findings: list[Finding]
) -> tuple[list[LedgerRecord], list[dict[str, Any]], Anchors] | None:
    """Open the ledger read-only, verify its hash chain and head anchor (``CHAIN_BROKEN``) and
    every anchor a metrics row carries (``ANCHOR_MISMATCH``); returns the records (invalid rows
    skipped), the raw rows and the rows' anchors, or None when the ledger cannot be opened at
    all (``CHAIN_BROKEN`` appended). Raises nothing."""
    try:
        ledger = PrivacyLedger(ledger_path, readonly=True)
    except (LedgerIntegrityError, ConfigError) as exc:
        findings.append(Finding("CHAIN_BROKEN", ERROR, str(exc)))
        return None
    anchors: list[tuple[dict[str, Any], LedgerHead | None]] = []
    with ledger:
        try:
            ledger.verify()
        except LedgerIntegrityError as exc:
            findings.append(Finding("CHAIN_BROKEN", ERROR, str(exc)))
        for row in rows:
            priv = row.get("privacy")
            anchor_raw = _anchor_of(priv) if isinstance(priv, dict) else None
            if anchor_raw is None:
                continue
            try:
                anchor = LedgerHead.from_dict(anchor_raw)
                ledger.check_anchor(anchor)
                anchors.append((row, anchor))
            except (ConfigError, LedgerIntegrityError, AttributeError) as exc:
                anchors.append((row, None))
                findings.append(
                    Finding(
                        "ANCHOR_MISMATCH",
                        ERROR,
                        f"metrics.jsonl anchor: {exc}",
                        round=_int_or_none(row.get("round")),
                        strategy=_str_or_none(row.get("strategy")),
                    )
                )
        try:
            records = ledger.entries(strict=False)
            raw_rows = ledger.raw_records()
        except LedgerIntegrityError as exc:
            findings.append(Finding("CHAIN_BROKEN", ERROR, str(exc)))
            records, raw_rows = [], []
    return records, raw_rows, anchors


def _round_ends(
    raw_rows: Sequence[dict[str, Any]],
) -> tuple[dict[tuple[str, int], int], list[tuple[str, int]]]:
    """The last record id (intent or confirm) of each (strategy, round) - the ledger "after that
    round" - and the (strategy, round) pairs in ledger order."""
    last_seq: dict[tuple[str, int], int] = {}
    order: list[tuple[str, int]] = []
    for raw in raw_rows:
        key = (str(raw.get("strategy") or ""), raw.get("round"))
        if not isinstance(key[1], int) or not isinstance(raw.get("seq"), int):
            continue
        k = (key[0], key[1])
        if k not in last_seq:
            order.append(k)
        last_seq[k] = max(last_seq.get(k, 0), int(raw["seq"]))
    return last_seq, order
