"""Structured logs: one JSON object per line (``ts``, ``level``, ``party``, ``event`` and fields).

Events carry identifiers, counts, sizes, phases and durations only: never keys, shares, vectors,
model values or certificates' private parts.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


class _JsonFormatter(logging.Formatter):
    def __init__(self, party: str) -> None:
        super().__init__()
        self.party = party

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "party": self.party,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:  # a library logger (secure_fl.secagg, ...): its sentence becomes a field
            entry["event"] = "library-log"
            entry["logger"] = record.name
            entry["message"] = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(entry, default=str, separators=(",", ":"))


class EventLog:
    """A thin wrapper: ``log.info("phase-closed", phase=..., arrived=...)``."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc: bool = False) -> None:
        self._logger.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, exc: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields, exc)


def setup(party: str, log_file: Path | None = None, level: int = logging.INFO) -> EventLog:
    """Configure JSON-lines logging for this process (stderr, and ``log_file`` when given).

    The library's own loggers (``secure_fl.secagg``, ``secure_fl.aggregators``,
    ``secure_fl.training``, ...) go to the same handlers as ``library-log`` events, so that every
    line a server or site process writes is one JSON object (a plain-text warning would break a
    line-by-line reader)."""
    logger = logging.getLogger(f"secure_fl.transport.{party}")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    library = logging.getLogger("secure_fl")
    library.setLevel(level)
    for handler in list(library.handlers):
        library.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(_JsonFormatter(party))
        logger.addHandler(handler)
        library.addHandler(handler)
    logging.Formatter.converter = time.gmtime
    return EventLog(logger)
