"""The audit's findings model: severities, statuses, :class:`Finding`, :class:`CurvePoint`, and
the small value parsers every check shares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from secure_fl.privacy.ledger import LedgerEntry

ERROR = "error"

WARNING = "warning"

INFO = "info"
"""Severity of an explanation (e.g. a budget stop): it does not fail the audit."""

PASS, FAIL, NO_DP = "PASS", "FAIL", "NO DP"

EXIT_STATUS: dict[str, int] = {PASS: 0, FAIL: 1, NO_DP: 3}
"""Exit status of ``secure-fl audit`` per status (2: usage error)."""

AUDIT_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""The two independent accountants every site's epsilon is recomputed with."""


@dataclass(frozen=True)
class Finding:
    """One problem the audit found. ``severity`` is ``"error"``, ``"warning"`` or ``"info"`` (an
    explanation that does not fail the audit)."""

    code: str
    severity: str
    message: str
    site: str | None = None
    round: int | None = None
    strategy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CurvePoint:
    """Cumulative RDP epsilon of every site after one (strategy, round) of the ledger."""

    label: str
    strategy: str
    round: int
    epsilon: dict[str, float]


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _where(entry: LedgerEntry) -> dict[str, Any]:
    return {"site": entry.site, "round": entry.round, "strategy": entry.strategy or None}


def _label(strategy: str, number: int) -> str:
    """The plot label of round ``number`` (numbered from 1) of ``strategy``."""
    return f"{strategy}:{number}" if strategy else str(number)


def _to_index(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with its ``round`` (numbered from 1) turned into the ledger's 0-based index."""
    rnd = _int_or_none(row.get("round"))
    return row if rnd is None else {**row, "round": rnd - 1}


def _anchor_of(privacy: dict[str, Any]) -> Any:
    """The ledger anchor a metrics row carries (``"ledger_head"`` or ``"ledger"``), if any."""
    return privacy.get("ledger_head", privacy.get("ledger"))
