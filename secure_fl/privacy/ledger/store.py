"""The ledger store: :class:`PrivacyLedger`, the SQLite file, its writes (intent, confirmation)
and reads (records, events, spent epsilon, verification).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from secure_fl.errors import ConfigError, LedgerIntegrityError
from secure_fl.privacy.accounting import PrivacyEvent, _check_int, _check_real, epsilon_of_events
from secure_fl.privacy.ledger.chain import (
    _COLUMNS,
    _SCHEMA,
    SCHEMA_VERSION,
    _genesis,
    _record_hash,
    check_anchor_rows,
    check_tail,
    read_head,
    verify_chain,
    write_head,
)
from secure_fl.privacy.ledger.entries import LedgerEntry, LedgerHead, canonical_json
from secure_fl.privacy.ledger.events import LedgerRecord, records_from_rows, select_events


class PrivacyLedger:
    """Append-only, hash-chained privacy ledger in SQLite at ``path`` (created if missing).

    ``readonly=True`` opens an existing ledger without modifying anything (the audit's mode;
    ConfigError if it does not exist). Use as a context manager or call :meth:`close`.
    Thread-safe within one process; one writing process per ledger.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly and not self.path.is_file():
            raise ConfigError(f"privacy ledger {self.path} does not exist")
        if not readonly and not self.path.parent.is_dir():
            raise ConfigError(f"privacy ledger folder {self.path.parent} does not exist")
        if readonly:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            self._conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            if not readonly:
                # rollback journal, not WAL: the .sqlite file alone holds every committed record
                self._conn.execute("PRAGMA journal_mode=DELETE")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._init_schema()
            self.ledger_id = self._read_ledger_id()
            if not readonly and not self.head_path.exists() and self._count() == 0:
                self._write_head(LedgerHead(0, _genesis(self.ledger_id)), pending=None)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise LedgerIntegrityError(f"privacy ledger {self.path} is unreadable: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    # -- set-up ------------------------------------------------------------------------------

    def _init_schema(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                row = self._conn.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()
                count = self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
                if row is None:
                    if count:
                        raise LedgerIntegrityError(
                            f"privacy ledger {self.path}: the ledger id is missing while "
                            f"{count} records exist (meta table edited)"
                        )
                    ledger_id = secrets.token_hex(16)
                    self._conn.execute(
                        "INSERT INTO meta(key, value) VALUES ('ledger_id', ?), ('version', ?)",
                        (ledger_id, SCHEMA_VERSION),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _read_ledger_id(self) -> str:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise LedgerIntegrityError(f"privacy ledger {self.path} is unreadable: {exc}") from exc
        if row is None:
            raise LedgerIntegrityError(f"privacy ledger {self.path}: the ledger id is missing")
        return str(row["value"])

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def record_intent(self, entry: LedgerEntry) -> int:
        """Append ``entry`` before its round runs; returns its record id (for :meth:`confirm`).

        From this call on, the entry counts as spent (see :mod:`secure_fl.privacy.ledger`). Raises
        ConfigError for a non-LedgerEntry and LedgerIntegrityError when the ledger's tail does not
        match its head anchor (the ledger was truncated or appended to outside this API: nothing
        is written to a tampered ledger).
        """
        if not isinstance(entry, LedgerEntry):
            raise ConfigError(f"entry must be a LedgerEntry, got {type(entry).__name__}")

        def build(_: sqlite3.Connection) -> dict[str, Any]:
            return {
                "kind": "intent",
                "intent": None,
                "strategy": entry.strategy,
                "site": entry.site,
                "round": entry.round,
                "level": entry.level,
                "mechanism": entry.mechanism,
                "noise_multiplier": entry.noise_multiplier,
                "clip": entry.clip,
                "sample_rate": entry.sample_rate,
                "steps": entry.steps,
                "survivors": entry.survivors,
                "delta": entry.delta,
                "params": canonical_json(entry.params),
            }

        return self._append(build)

    def confirm(
        self,
        intent_id: int,
        *,
        steps: int | None = None,
        survivors: int | None = None,
        noise_multiplier: float | None = None,
    ) -> int:
        """Record, after the round, what ran for intent ``intent_id``; returns the record id.

        ``steps`` / ``survivors`` default to the intended values; ``noise_multiplier`` is the
        Gaussian-equivalent multiplier measured after the round, if known (for distributed noise:
        ``effective_noise_multiplier(cfg, survivors)``). The accountant takes ``max(intended,
        confirmed)`` steps, ``min(expected, confirmed)`` survivors and ``min(intended, confirmed)``
        multiplier, so a confirmation can only raise the spend. Raises ConfigError when
        ``intent_id`` is not an unconfirmed intent of this ledger or a value is out of range.
        """
        _check_int("intent_id", intent_id, low=1)
        if steps is not None:
            _check_int("steps", steps, low=0)
        if survivors is not None:
            _check_int("survivors", survivors, low=0)
        if noise_multiplier is not None:
            _check_real("noise_multiplier", noise_multiplier, low=0.0, low_open=False)

        def build(conn: sqlite3.Connection) -> dict[str, Any]:
            intent = conn.execute(
                "SELECT * FROM records WHERE seq=? AND kind='intent'", (int(intent_id),)
            ).fetchone()
            if intent is None:
                raise ConfigError(
                    f"intent_id must be the id of an intent record of this ledger, got {intent_id}"
                )
            done = conn.execute(
                "SELECT seq FROM records WHERE kind='confirm' AND intent=?", (int(intent_id),)
            ).fetchone()
            if done is not None:
                raise ConfigError(
                    f"intent_id {intent_id} is already confirmed (record {done['seq']})"
                )
            return {
                "kind": "confirm",
                "intent": int(intent_id),
                "strategy": intent["strategy"],
                "site": intent["site"],
                "round": intent["round"],
                "level": intent["level"],
                "mechanism": intent["mechanism"],
                "noise_multiplier": (
                    float(noise_multiplier) if noise_multiplier is not None else None
                ),
                "clip": None,
                "sample_rate": None,
                "steps": int(steps) if steps is not None else intent["steps"],
                "survivors": int(survivors) if survivors is not None else intent["survivors"],
                "delta": None,
                "params": None,
            }

        return self._append(build)

    def _append(self, build: Callable[[sqlite3.Connection], dict[str, Any]]) -> int:
        if self.readonly:
            raise ConfigError(f"privacy ledger {self.path} was opened read-only")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                last = conn.execute(
                    "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                tail = (
                    LedgerHead(int(last["seq"]), str(last["hash"]))
                    if last
                    else LedgerHead(0, _genesis(self.ledger_id))
                )
                self._check_tail(tail)
                row = build(conn)
                row["seq"] = tail.count + 1
                row["recorded_at"] = datetime.now(UTC).isoformat(timespec="microseconds")
                row["prev_hash"] = tail.hash
                row["hash"] = _record_hash(row)
                # Name the pending record before the commit: a crash on either side of the commit
                # then leaves a state verify() accepts, and any other state is tampering.
                self._write_head(tail, pending=LedgerHead(row["seq"], row["hash"]))
                cols = (*_COLUMNS, "hash")
                conn.execute(
                    f"INSERT INTO records ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",  # noqa: S608
                    tuple(row[c] for c in cols),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._write_head(LedgerHead(row["seq"], row["hash"]), pending=None)
            return int(row["seq"])

    def _write_head(self, head: LedgerHead, *, pending: LedgerHead | None) -> None:
        write_head(self.head_path, self.ledger_id, head, pending=pending)

    def _read_head(self) -> tuple[LedgerHead, LedgerHead | None] | None:
        return read_head(self.head_path, self.ledger_id)

    def _check_tail(self, tail: LedgerHead) -> None:
        """The database's last record must be the anchored one or the pending one."""
        check_tail(self.path, self.head_path, tail, self._read_head())

    # -- reading -------------------------------------------------------------------------------

    def _count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def _rows(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                cur = self._conn.execute("SELECT * FROM records ORDER BY seq")
                return [dict(r) for r in cur.fetchall()]
            except sqlite3.DatabaseError as exc:
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path} is unreadable: {exc}"
                ) from exc

    def head(self) -> LedgerHead:
        """The current anchor (count, last hash): copy it into each round's metrics line."""
        with self._lock:
            last = self._conn.execute(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        if last is None:
            return LedgerHead(0, _genesis(self.ledger_id))
        return LedgerHead(int(last["seq"]), str(last["hash"]))

    def raw_records(self) -> list[dict[str, Any]]:
        """Every stored row (intents and confirmations) as a dict of columns, in order."""
        return self._rows()

    def entries(self, *, strict: bool = True) -> list[LedgerRecord]:
        """Every intent, in order, joined with its confirmation.

        ``strict=False`` skips rows whose values are invalid (a tampered ledger: :meth:`verify`
        reports them) instead of raising LedgerIntegrityError.
        """
        return records_from_rows(self.path, self._rows(), strict=strict)

    def sites(self) -> list[str]:
        """The sites that have at least one record, sorted."""
        return sorted({r.entry.site for r in self.entries()})

    def events_for(
        self, site: str, *, strategy: str | None = None, upto: int | None = None
    ) -> list[PrivacyEvent]:
        """What ``site`` has spent, as accountant events, one per intent (confirmed or not).

        ``strategy`` restricts to one strategy's records (default: all - they train on the same
        patients); ``upto`` evaluates the ledger as it stood after record ``upto``.
        """
        return select_events(self.entries(), site, strategy=strategy, upto=upto)

    def spent(
        self,
        site: str,
        delta: float,
        accountant: str = "rdp",
        *,
        strategy: str | None = None,
        upto: int | None = None,
    ) -> float:
        """Epsilon ``site`` has spent at ``delta``: unconfirmed intents count (never under-counts).

        An upper bound on the tight epsilon (see :func:`secure_fl.privacy.epsilon_of_events`).
        """
        events = self.events_for(site, strategy=strategy, upto=upto)
        return epsilon_of_events(events, delta, accountant)

    # -- verification --------------------------------------------------------------------------

    def verify(self, *, anchors: Iterable[LedgerHead] = ()) -> None:
        """Check the whole chain, the head anchor and any external ``anchors``; None when intact.

        Raises LedgerIntegrityError naming the first broken record when a record was edited,
        deleted, reordered or inserted, when a confirmation does not match an earlier unconfirmed
        intent, when the tail was truncated or extended outside the API (head anchor), or when an
        external anchor (count, hash) - e.g. one copied into metrics.jsonl - does not match.
        """
        rows = self._rows()
        self._check_tail(verify_chain(self.path, self.ledger_id, rows))
        for anchor in anchors:
            self._check_anchor(anchor, rows)

    def check_anchor(self, anchor: LedgerHead) -> None:
        """Check one external anchor against the stored chain (LedgerIntegrityError if it differs)."""
        self._check_anchor(anchor, self._rows())

    def _check_anchor(self, anchor: LedgerHead, rows: list[dict[str, Any]]) -> None:
        check_anchor_rows(self.path, self.ledger_id, anchor, rows)
