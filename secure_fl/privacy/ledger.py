"""The privacy ledger: an append-only, hash-chained SQLite record of every DP mechanism that ran.

Protocol (the runner's side): before a round, :meth:`PrivacyLedger.record_intent` writes one
:class:`LedgerEntry` per site and mechanism (site, round, level, mechanism, noise multiplier, clip,
sampling rate, steps, expected survivors, delta, raw mechanism parameters); after the round,
:meth:`PrivacyLedger.confirm` records what actually ran. Each write is one SQLite transaction
(rollback journal, ``synchronous=FULL``: the file is self-contained and durable once the call
returns; no WAL side files an auditor could forget to copy).

Accounting never under-counts, whatever the crash point:

* an intent without a confirmation **counts in full** (the round may have run before the crash);
* a confirmation can only *increase* the spend: the accountant uses ``max(intended, confirmed)``
  steps, ``min(expected, confirmed)`` survivors and ``min(intended, confirmed)`` noise
  multiplier, so a confirmation that reports fewer steps (early stop, or a lie) changes nothing;
* distributed noise is sized for ``params["honest_survivors"]`` (``t - c``: the SecAgg threshold
  minus the ``params["colluders"]`` sites that may collude with the server and subtract their own
  shares); when fewer honest sites survived (``survivors - colluders``), the Gaussian-equivalent
  multiplier is scaled by ``sqrt(honest / honest_survivors)`` (each honest site adds
  ``1/honest_survivors`` of the noise variance). Records without those keys (older ledgers) scale
  by ``sqrt(survivors / params["threshold"])``;
* Skellam records are accounted at integer orders only (``PrivacyEvent.integer_orders``).

Tamper evidence. Every record carries ``prev_hash`` and ``hash = SHA-256(canonical JSON of every
column, including its sequence number and prev_hash)``; the first record chains to a genesis hash
derived from a random ledger id. :meth:`PrivacyLedger.verify` raises
:class:`LedgerIntegrityError` naming the first broken record when a record was edited (any field),
deleted from the middle, reordered, or inserted without recomputing the chain.

Truncating the tail is invisible to a hash chain alone, so the ledger keeps an *anchor* beside the
database, ``<ledger>.head`` (JSON: ledger id, record count and last hash; written atomically and
fsync'ed; before each commit it also names the single pending record, so a crash on either side of
the commit is told apart from tampering). Detected: deleting the last record(s), appending records
outside this API, replacing the database with another ledger. The runner should also copy
:meth:`PrivacyLedger.head` into each round's metrics line (``privacy.ledger_head``);
the audit checks those anchors too, so rewriting the database *and* the head file consistently
is still caught unless every metrics line is rewritten as well, and the audit compares the
epsilon the run reported with the ledger's. **Not detected:** an adversary with write access who
rewrites the database, the head file and metrics.jsonl consistently (an unkeyed hash chain cannot
prevent that: keep copies of the head hash outside the run folder - for example at every site -
or on write-once storage). One writer per ledger file is assumed (the federation server).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError
from secure_fl.errors import LedgerIntegrityError as LedgerIntegrityError
from secure_fl.privacy.accounting import PrivacyEvent, _check_int, _check_real, epsilon_of_events

LEDGER_FILENAME = "privacy_ledger.sqlite"
"""The ledger's file name inside a run folder."""

SCHEMA_VERSION = "1"
LEVELS: tuple[str, ...] = ("sample", "site")


# LedgerIntegrityError is defined in secure_fl.errors and re-exported here.


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace, no NaN/Infinity): what the hashes cover."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism invocation at one site in one round (what :meth:`record_intent` stores).

    ``noise_multiplier`` is the Gaussian-equivalent multiplier the accountant uses. For
    distributed mechanisms it is the one of the aggregate noise of ``params["honest_survivors"]``
    (``t - c``) honest sites (``distributed.effective_noise_multiplier(cfg, t - c)``), with
    ``params["threshold"]`` (``t``) and ``params["colluders"]`` (``c``) beside it, and
    ``params["nominal_noise_multiplier"]`` the multiplier ``z`` the noise was sized with.
    ``params`` holds the raw mechanism parameters (JSON values: e.g. per-site sigma, scale,
    threshold, bits, ``calibrated_noise_multiplier`` when the run calibrated for a target, and
    ``noise_source``: ``"csprng"`` or ``"seeded"`` - where the DP randomness came from).
    ``survivors`` is the expected number of contributing sites, or None when not applicable.
    ``strategy`` names the training strategy (several strategies of one run all spend the same
    patients' budget). ``round`` is the 0-based round index (metrics.jsonl, the console and
    the audit number rounds from 1: ``round + 1``). Invalid values raise ConfigError naming the
    field.
    """

    site: str
    round: int
    level: str
    mechanism: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    survivors: int | None
    delta: float
    params: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ConfigError(f"site must be a non-empty string, got {self.site!r}")
        if not isinstance(self.strategy, str):
            raise ConfigError(f"strategy must be a string, got {self.strategy!r}")
        _check_int("round", self.round, low=0)
        if self.level not in LEVELS:
            raise ConfigError(f"level must be one of {LEVELS}, got {self.level!r}")
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ConfigError(f"mechanism must be a non-empty string, got {self.mechanism!r}")
        _check_real("noise_multiplier", self.noise_multiplier, low=0.0, low_open=False)
        _check_real("clip", self.clip, low=0.0)
        _check_real("sample_rate", self.sample_rate, low=0.0, low_open=False, high=1.0)
        _check_int("steps", self.steps, low=0)
        if self.survivors is not None:
            _check_int("survivors", self.survivors, low=0)
        _check_real("delta", self.delta, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"params must be a mapping, got {type(self.params).__name__}")
        try:
            params = json.loads(canonical_json(dict(self.params)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"params must hold finite JSON values only: {exc}") from exc
        object.__setattr__(self, "params", params)
        for name in ("noise_multiplier", "clip", "sample_rate", "delta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "steps", int(self.steps))
        if self.survivors is not None:
            object.__setattr__(self, "survivors", int(self.survivors))


@dataclass(frozen=True)
class LedgerHead:
    """An anchor: the number of records and the hash of the last one (genesis hash when 0)."""

    count: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerHead:
        """Parse ``{"count": int, "hash": str}``; ConfigError when malformed."""
        count, digest = data.get("count"), data.get("hash")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"ledger anchor count must be an integer >= 0, got {count!r}")
        if not isinstance(digest, str):
            raise ConfigError(f"ledger anchor hash must be a hex string, got {digest!r}")
        return cls(count, digest)


def effective_multiplier(
    noise_multiplier: float, survivors: int | None, threshold: object
) -> float:
    """The Gaussian-equivalent multiplier when only ``survivors`` of the ``threshold`` sites the
    distributed noise was sized for contributed: ``sigma * sqrt(survivors / threshold)``.

    Unchanged when ``threshold`` is not a positive number or survivors are unknown or sufficient.
    """
    if (
        survivors is None
        or isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not threshold > 0
        or survivors >= threshold
    ):
        return noise_multiplier
    return noise_multiplier * math.sqrt(max(survivors, 0) / float(threshold))


def honest_effective_multiplier(
    noise_multiplier: float, survivors: int | None, params: Mapping[str, Any]
) -> float:
    """The Gaussian-equivalent multiplier of a record's noise when ``survivors`` sites contributed.

    With ``params["honest_survivors"]`` (``h = t - c``, what the distributed noise was sized for)
    only ``survivors - params["colluders"]`` shares are honest: below ``h`` the multiplier is
    ``sigma * sqrt(honest / h)`` (0 when no honest share is left). Without it, the older
    ``sqrt(survivors / params["threshold"])`` rule (:func:`effective_multiplier`). Unchanged when
    survivors are unknown or sufficient.
    """
    needed = _positive_number(params.get("honest_survivors"))
    if survivors is None or needed is None:
        return effective_multiplier(noise_multiplier, survivors, params.get("threshold"))
    colluders = _positive_number(params.get("colluders", 0)) or 0.0
    honest = max(float(survivors) - colluders, 0.0)
    if honest >= needed:
        return noise_multiplier
    return noise_multiplier * math.sqrt(honest / needed)


def _positive_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return float(value)


def entry_event(entry: LedgerEntry, survivors: int | None = None) -> PrivacyEvent:
    """The accountant event of ``entry`` (with ``survivors`` contributing sites, default the
    entry's expected count): what the ledger counts for an intent, and what a budget check
    must project. Skellam entries carry ``integer_orders=True`` (their RDP bound is stated at
    integer orders only)."""
    known = entry.survivors if survivors is None else survivors
    sigma = honest_effective_multiplier(entry.noise_multiplier, known, entry.params)
    return PrivacyEvent(
        sigma, entry.sample_rate, entry.steps, integer_orders=entry.mechanism == "skellam"
    )


@dataclass(frozen=True)
class LedgerRecord:
    """An intent joined with its confirmation (None fields when unconfirmed)."""

    id: int
    entry: LedgerEntry
    recorded_at: str
    confirm_id: int | None = None
    confirmed_steps: int | None = None
    confirmed_survivors: int | None = None
    confirmed_at: str | None = None
    confirmed_noise_multiplier: float | None = None

    @property
    def confirmed(self) -> bool:
        return self.confirm_id is not None

    @property
    def accounted_steps(self) -> int:
        """``max(intended, confirmed)`` steps: a confirmation never lowers the spend."""
        return max(self.entry.steps, self.confirmed_steps or 0)

    @property
    def accounted_survivors(self) -> int | None:
        """The smallest survivor count known (expected or confirmed); None when neither is."""
        known = [s for s in (self.entry.survivors, self.confirmed_survivors) if s is not None]
        return min(known) if known else None

    @property
    def effective_noise_multiplier(self) -> float:
        """The multiplier the accountant uses: the intended one, scaled down when honest survivors
        fell below what the noise was sized for (:func:`honest_effective_multiplier`), and never
        above a confirmed (measured) multiplier."""
        sigma = honest_effective_multiplier(
            self.entry.noise_multiplier, self.accounted_survivors, self.entry.params
        )
        if self.confirmed_noise_multiplier is not None:
            sigma = min(sigma, self.confirmed_noise_multiplier)
        return sigma

    def event(self) -> PrivacyEvent:
        """What this record spends, for the accountants."""
        return PrivacyEvent(
            self.effective_noise_multiplier,
            self.entry.sample_rate,
            self.accounted_steps,
            integer_orders=self.entry.mechanism == "skellam",
        )


def select_events(
    records: Iterable[LedgerRecord],
    site: str,
    *,
    strategy: str | None = None,
    upto: int | None = None,
    adjust: Callable[[LedgerRecord, PrivacyEvent], PrivacyEvent] | None = None,
) -> list[PrivacyEvent]:
    """The accountant events of ``site``'s records (optionally one strategy's), as the ledger
    stood after record ``upto``: later intents are left out and later confirmations ignored.
    ``adjust`` may replace each record's event (the audit raises sampling and steps to what it
    re-derives and lowers noise to what it can justify)."""
    events = []
    for r in records:
        if r.entry.site != site or (strategy is not None and r.entry.strategy != strategy):
            continue
        if upto is not None:
            if r.id > upto:
                continue
            if r.confirm_id is not None and r.confirm_id > upto:
                r = LedgerRecord(id=r.id, entry=r.entry, recorded_at=r.recorded_at)  # unconfirmed
        event = r.event()
        events.append(adjust(r, event) if adjust is not None else event)
    return events


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

        From this call on, the entry counts as spent (see the module docstring). Raises
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
        data = {
            "ledger_id": self.ledger_id,
            **head.to_dict(),
            "pending": pending.to_dict() if pending else None,
        }
        atomic_write(self.head_path, canonical_json(data))

    def _read_head(self) -> tuple[LedgerHead, LedgerHead | None] | None:
        if not self.head_path.exists():
            return None
        try:
            data = json.loads(self.head_path.read_text(encoding="utf-8"))
            head = LedgerHead.from_dict(data)
            pending = LedgerHead.from_dict(data["pending"]) if data.get("pending") else None
            ledger_id = data["ledger_id"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerIntegrityError(
                f"privacy ledger head anchor {self.head_path} is unreadable: {exc}"
            ) from exc
        if ledger_id != self.ledger_id:
            raise LedgerIntegrityError(
                f"privacy ledger head anchor {self.head_path} belongs to another ledger "
                f"(id {ledger_id}, this ledger is {self.ledger_id})"
            )
        return head, pending

    def _check_tail(self, tail: LedgerHead) -> None:
        """The database's last record must be the anchored one or the pending one."""
        anchor = self._read_head()
        if anchor is None:
            if tail.count == 0:
                return
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: the head anchor {self.head_path.name} is missing "
                f"while the ledger holds {tail.count} records; truncation cannot be ruled out"
            )
        head, pending = anchor
        if tail == head or (pending is not None and tail == pending):
            return
        if tail.count < head.count:
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} was truncated: the head anchor records {head.count} "
                f"records, the ledger holds {tail.count} (record {tail.count + 1} onwards deleted)"
            )
        if tail.count > head.count and (pending is None or tail.count > pending.count):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: record {head.count + 1} onwards lie beyond the head "
                f"anchor (count {head.count}): appended outside the ledger"
            )
        raise LedgerIntegrityError(
            f"privacy ledger {self.path}: record {tail.count} does not match the head anchor "
            "(rewritten)"
        )

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
        records: dict[int, LedgerRecord] = {}
        for row in self._rows():
            try:
                if row["kind"] == "intent":
                    entry = LedgerEntry(
                        site=row["site"],
                        round=row["round"],
                        level=row["level"],
                        mechanism=row["mechanism"],
                        noise_multiplier=row["noise_multiplier"],
                        clip=row["clip"],
                        sample_rate=row["sample_rate"],
                        steps=row["steps"],
                        survivors=row["survivors"],
                        delta=row["delta"],
                        params=json.loads(row["params"] or "{}"),
                        strategy=row["strategy"],
                    )
                    records[int(row["seq"])] = LedgerRecord(
                        id=int(row["seq"]), entry=entry, recorded_at=str(row["recorded_at"])
                    )
                elif row["kind"] == "confirm":
                    target = records.get(row["intent"])
                    if target is None or target.confirmed:
                        raise ConfigError(f"confirms unknown or confirmed intent {row['intent']}")
                    if row["steps"] is not None:
                        _check_int("steps", row["steps"], low=0)
                    if row["survivors"] is not None:
                        _check_int("survivors", row["survivors"], low=0)
                    if row["noise_multiplier"] is not None:
                        _check_real(
                            "noise_multiplier", row["noise_multiplier"], low=0.0, low_open=False
                        )
                    records[target.id] = LedgerRecord(
                        id=target.id,
                        entry=target.entry,
                        recorded_at=target.recorded_at,
                        confirm_id=int(row["seq"]),
                        confirmed_steps=row["steps"],
                        confirmed_survivors=row["survivors"],
                        confirmed_at=str(row["recorded_at"]),
                        confirmed_noise_multiplier=row["noise_multiplier"],
                    )
                else:
                    raise ConfigError(f"unknown record kind {row['kind']!r}")
            except (ConfigError, ValueError, TypeError) as exc:
                if strict:
                    raise LedgerIntegrityError(
                        f"privacy ledger {self.path}: record {row.get('seq')} is invalid: {exc}"
                    ) from exc
        return list(records.values())

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
        prev = _genesis(self.ledger_id)
        open_intents: dict[int, dict[str, Any]] = {}
        for i, row in enumerate(rows, start=1):
            seq = row["seq"]
            if seq != i:
                if isinstance(seq, int) and seq > i:
                    raise LedgerIntegrityError(
                        f"privacy ledger {self.path}: record {i} is missing (record {seq} follows "
                        f"record {i - 1}): deleted"
                    )
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path}: record {i} has sequence number {seq!r}: reordered"
                )
            if _record_hash(row) != row["hash"]:
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path}: record {i} ({_describe(row)}) was altered: its "
                    "contents do not match its hash (edited, forged or reordered)"
                )
            if row["prev_hash"] != prev:
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path}: record {i} ({_describe(row)}) does not chain to "
                    f"record {i - 1} (inserted, reordered or a predecessor deleted)"
                )
            self._check_semantics(i, row, open_intents)
            prev = row["hash"]
        tail = LedgerHead(len(rows), prev)
        self._check_tail(tail)
        for anchor in anchors:
            self._check_anchor(anchor, rows)

    def check_anchor(self, anchor: LedgerHead) -> None:
        """Check one external anchor against the stored chain (LedgerIntegrityError if it differs)."""
        self._check_anchor(anchor, self._rows())

    def _check_anchor(self, anchor: LedgerHead, rows: list[dict[str, Any]]) -> None:
        if anchor.count > len(rows):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: an anchor records {anchor.count} records, the ledger "
                f"holds {len(rows)} (record {len(rows) + 1} onwards deleted)"
            )
        actual = rows[anchor.count - 1]["hash"] if anchor.count else _genesis(self.ledger_id)
        if actual != anchor.hash:
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: record {anchor.count} does not match the anchor "
                "taken when it was written (the ledger was rewritten up to that record)"
            )

    def _check_semantics(
        self, i: int, row: dict[str, Any], open_intents: dict[int, dict[str, Any]]
    ) -> None:
        if row["kind"] == "intent":
            open_intents[i] = row
            return
        if row["kind"] != "confirm":
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: record {i} has unknown kind {row['kind']!r}"
            )
        intent = open_intents.pop(row["intent"], None) if isinstance(row["intent"], int) else None
        if intent is None:
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: record {i} confirms {row['intent']!r}, which is not "
                "an earlier unconfirmed intent"
            )
        if any(intent[k] != row[k] for k in ("strategy", "site", "round")):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: record {i} confirms intent {row['intent']} of "
                "another site, strategy or round"
            )
