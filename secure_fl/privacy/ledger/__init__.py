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

Layout (every name stays importable from ``secure_fl.privacy.ledger``): :mod:`.entries` (what is
stored: :class:`LedgerEntry`, :class:`LedgerHead`, canonical JSON), :mod:`.events` (what a record
spends: :class:`LedgerRecord`, survivor scaling, :func:`select_events`), :mod:`.chain` (hashes,
chain check and head anchor file) and :mod:`.store` (:class:`PrivacyLedger`, the SQLite file).
"""

from secure_fl.errors import LedgerIntegrityError  # defined there, re-exported here
from secure_fl.privacy.ledger.chain import SCHEMA_VERSION
from secure_fl.privacy.ledger.entries import (
    LEDGER_FILENAME,
    LEVELS,
    LedgerEntry,
    LedgerHead,
    canonical_json,
)
from secure_fl.privacy.ledger.events import (
    LedgerRecord,
    effective_multiplier,
    entry_event,
    honest_effective_multiplier,
    select_events,
)
from secure_fl.privacy.ledger.store import PrivacyLedger

__all__ = [
    "LEDGER_FILENAME",
    "LEVELS",
    "SCHEMA_VERSION",
    "LedgerEntry",
    "LedgerHead",
    "LedgerIntegrityError",
    "LedgerRecord",
    "PrivacyLedger",
    "canonical_json",
    "effective_multiplier",
    "entry_event",
    "honest_effective_multiplier",
    "select_events",
]
