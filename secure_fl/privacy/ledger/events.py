"""What a ledger record spends: intents joined with their confirmations (:class:`LedgerRecord`), the
Gaussian-equivalent multiplier when fewer sites survived than the noise was sized for, and the
accountant events of a site.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError, LedgerIntegrityError
from secure_fl.privacy.accounting import PrivacyEvent, _check_int, _check_real
from secure_fl.privacy.ledger.entries import LedgerEntry


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


def records_from_rows(
    path: Path, rows: Iterable[Mapping[str, Any]], *, strict: bool = True
) -> list[LedgerRecord]:
    """Every intent of the stored ``rows`` of the ledger at ``path``, in order, joined with its
    confirmation (what :meth:`PrivacyLedger.entries` returns).

    ``strict=False`` skips rows whose values are invalid (a tampered ledger:
    :meth:`PrivacyLedger.verify` reports them) instead of raising LedgerIntegrityError.
    """
    records: dict[int, LedgerRecord] = {}
    for row in rows:
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
                    f"privacy ledger {path}: record {row.get('seq')} is invalid: {exc}"
                ) from exc
    return list(records.values())
