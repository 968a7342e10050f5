"""The ledger's hash chain and its head anchor: the schema, record hashes, the chain check and the
``<ledger>.head`` file (pure functions over stored rows; :class:`PrivacyLedger` calls them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import LedgerIntegrityError
from secure_fl.privacy.ledger.entries import LedgerHead, canonical_json

SCHEMA_VERSION = "1"

_COLUMNS: tuple[str, ...] = (
    "seq",
    "kind",
    "intent",
    "strategy",
    "site",
    "round",
    "level",
    "mechanism",
    "noise_multiplier",
    "clip",
    "sample_rate",
    "steps",
    "survivors",
    "delta",
    "params",
    "recorded_at",
    "prev_hash",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    intent INTEGER,
    strategy TEXT NOT NULL,
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    level TEXT,
    mechanism TEXT,
    noise_multiplier REAL,
    clip REAL,
    sample_rate REAL,
    steps INTEGER,
    survivors INTEGER,
    delta REAL,
    params TEXT,
    recorded_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


def _record_hash(row: Mapping[str, Any]) -> str:
    payload = {c: row[c] for c in _COLUMNS}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def _genesis(ledger_id: str) -> str:
    return hashlib.sha256(f"secure_fl privacy ledger v1\x00{ledger_id}".encode()).hexdigest()


def _describe(row: Mapping[str, Any]) -> str:
    rnd = row.get("round")  # the 0-based index; people read rounds numbered from 1
    number = rnd + 1 if isinstance(rnd, int) and not isinstance(rnd, bool) else rnd
    return f"{row.get('kind')}, site {row.get('site')!r}, round {number}"


def read_head(head_path: Path, ledger_id: str) -> tuple[LedgerHead, LedgerHead | None] | None:
    """The head anchor file ``head_path`` of ledger ``ledger_id``: (anchored head, pending record)
    or None when there is no such file. Raises LedgerIntegrityError when it is unreadable or
    belongs to another ledger."""
    if not head_path.exists():
        return None
    try:
        data = json.loads(head_path.read_text(encoding="utf-8"))
        head = LedgerHead.from_dict(data)
        pending = LedgerHead.from_dict(data["pending"]) if data.get("pending") else None
        stored_id = data["ledger_id"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerIntegrityError(
            f"privacy ledger head anchor {head_path} is unreadable: {exc}"
        ) from exc
    if stored_id != ledger_id:
        raise LedgerIntegrityError(
            f"privacy ledger head anchor {head_path} belongs to another ledger "
            f"(id {stored_id}, this ledger is {ledger_id})"
        )
    return head, pending


def write_head(
    head_path: Path, ledger_id: str, head: LedgerHead, *, pending: LedgerHead | None
) -> None:
    """Write the head anchor file atomically (fsync'ed): ``head`` and the ``pending`` record about
    to be committed (None when nothing is pending). Raises OSError when it cannot be written."""
    data = {
        "ledger_id": ledger_id,
        **head.to_dict(),
        "pending": pending.to_dict() if pending else None,
    }
    atomic_write(head_path, canonical_json(data))


def check_tail(
    path: Path,
    head_path: Path,
    tail: LedgerHead,
    anchor: tuple[LedgerHead, LedgerHead | None] | None,
) -> None:
    """The ledger's last stored record ``tail`` must be the anchored or the pending one of
    ``anchor`` (as read from ``head_path``; None: no head file, allowed for an empty ledger only).

    Raises LedgerIntegrityError saying whether the tail was truncated, appended to outside the
    ledger or rewritten; None when it matches."""
    if anchor is None:
        if tail.count == 0:
            return
        raise LedgerIntegrityError(
            f"privacy ledger {path}: the head anchor {head_path.name} is missing "
            f"while the ledger holds {tail.count} records; truncation cannot be ruled out"
        )
    head, pending = anchor
    if tail == head or (pending is not None and tail == pending):
        return
    if tail.count < head.count:
        raise LedgerIntegrityError(
            f"privacy ledger {path} was truncated: the head anchor records {head.count} "
            f"records, the ledger holds {tail.count} (record {tail.count + 1} onwards deleted)"
        )
    if tail.count > head.count and (pending is None or tail.count > pending.count):
        raise LedgerIntegrityError(
            f"privacy ledger {path}: record {head.count + 1} onwards lie beyond the head "
            f"anchor (count {head.count}): appended outside the ledger"
        )
    raise LedgerIntegrityError(
        f"privacy ledger {path}: record {tail.count} does not match the head anchor (rewritten)"
    )


def verify_chain(path: Path, ledger_id: str, rows: list[dict[str, Any]]) -> LedgerHead:
    """Check the hash chain of the stored ``rows`` of the ledger at ``path`` from its genesis and
    every confirmation against an earlier unconfirmed intent; returns the chain's tail (count,
    last hash) for the head-anchor check.

    Raises LedgerIntegrityError naming the first broken record when a record was edited,
    deleted, reordered or inserted, or when a confirmation does not match an earlier unconfirmed
    intent.
    """
    prev = _genesis(ledger_id)
    open_intents: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows, start=1):
        seq = row["seq"]
        if seq != i:
            if isinstance(seq, int) and seq > i:
                raise LedgerIntegrityError(
                    f"privacy ledger {path}: record {i} is missing (record {seq} follows "
                    f"record {i - 1}): deleted"
                )
            raise LedgerIntegrityError(
                f"privacy ledger {path}: record {i} has sequence number {seq!r}: reordered"
            )
        if _record_hash(row) != row["hash"]:
            raise LedgerIntegrityError(
                f"privacy ledger {path}: record {i} ({_describe(row)}) was altered: its "
                "contents do not match its hash (edited, forged or reordered)"
            )
        if row["prev_hash"] != prev:
            raise LedgerIntegrityError(
                f"privacy ledger {path}: record {i} ({_describe(row)}) does not chain to "
                f"record {i - 1} (inserted, reordered or a predecessor deleted)"
            )
        _check_semantics(path, i, row, open_intents)
        prev = row["hash"]
    return LedgerHead(len(rows), prev)


def check_anchor_rows(
    path: Path, ledger_id: str, anchor: LedgerHead, rows: list[dict[str, Any]]
) -> None:
    """Check one external ``anchor`` against the stored ``rows`` of the ledger at ``path``: raises
    LedgerIntegrityError when the rows end before it or the anchored record's hash differs."""
    if anchor.count > len(rows):
        raise LedgerIntegrityError(
            f"privacy ledger {path}: an anchor records {anchor.count} records, the ledger "
            f"holds {len(rows)} (record {len(rows) + 1} onwards deleted)"
        )
    actual = rows[anchor.count - 1]["hash"] if anchor.count else _genesis(ledger_id)
    if actual != anchor.hash:
        raise LedgerIntegrityError(
            f"privacy ledger {path}: record {anchor.count} does not match the anchor "
            "taken when it was written (the ledger was rewritten up to that record)"
        )


def _check_semantics(
    path: Path, i: int, row: dict[str, Any], open_intents: dict[int, dict[str, Any]]
) -> None:
    """Record ``i`` is an intent, or confirms an earlier unconfirmed intent of the same site,
    strategy and round (LedgerIntegrityError otherwise)."""
    if row["kind"] == "intent":
        open_intents[i] = row
        return
    if row["kind"] != "confirm":
        raise LedgerIntegrityError(
            f"privacy ledger {path}: record {i} has unknown kind {row['kind']!r}"
        )
    intent = open_intents.pop(row["intent"], None) if isinstance(row["intent"], int) else None
    if intent is None:
        raise LedgerIntegrityError(
            f"privacy ledger {path}: record {i} confirms {row['intent']!r}, which is not "
            "an earlier unconfirmed intent"
        )
    if any(intent[k] != row[k] for k in ("strategy", "site", "round")):
        raise LedgerIntegrityError(
            f"privacy ledger {path}: record {i} confirms intent {row['intent']} of "
            "another site, strategy or round"
        )
