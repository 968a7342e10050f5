"""What a data check reports: one :class:`Problem` per finding, and the :class:`CheckReport` of a
whole datalist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One problem of one file of one case. ``role`` is ``image``, ``label`` or ``brainmask``."""

    case_id: str
    site: str
    role: str
    file: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class CheckReport:
    """The outcome of :func:`check_cases`.

    ``cases`` is the number of cases checked, ``problems`` every problem found (in case order,
    then image, label, brain mask), ``seconds`` the wall time, ``bytes_read`` the decompressed
    bytes read.
    """

    cases: int
    problems: tuple[Problem, ...]
    seconds: float
    bytes_read: int

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def bad_cases(self) -> tuple[str, ...]:
        """The ids of the cases with at least one problem, in case order."""
        return tuple(dict.fromkeys(p.case_id for p in self.problems))

    def lines(self) -> list[str]:
        """One line per bad case: ``<file>: <reason>[; <reason>][; <file>: <reason>] (case <id>,
        site <site>)``, files in image, label, brain-mask order."""
        out = []
        for case_id in self.bad_cases:
            mine = [p for p in self.problems if p.case_id == case_id]
            parts: list[str] = []
            last_file: Path | None = None
            for p in mine:
                parts.append(p.reason if p.file == last_file else f"{p.file}: {p.reason}")
                last_file = p.file
            out.append(f"{'; '.join(parts)} (case {case_id}, site {mine[0].site})")
        return out

    def summary(self) -> str:
        """``ok: N cases`` or ``K of N cases failed the data check``."""
        if self.ok:
            return f"ok: {self.cases} cases"
        return f"{len(self.bad_cases)} of {self.cases} cases failed the data check"
