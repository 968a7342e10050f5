"""Logs people and programs can read: human-readable lines in a terminal, JSON lines otherwise.

Two formats of the same events (``party``, ``event`` and fields):

* ``text`` (a terminal's default):
  ``2026-12-01T18:30:00Z INFO server round-start round=1 sites=4``: the ISO-8601 UTC time, the
  level, the party, the event and its fields as ``key=value`` (a value with spaces or quotes is
  JSON-quoted; lists and objects are compact JSON).
* ``json`` (``--log-format json``, the default when stderr is not a terminal, and always for a
  log file): one JSON object per line: ``ts`` (Unix seconds), ``level``, ``party``, ``event`` and
  the fields.

The format is chosen per process with :func:`set_default_format` (the ``--log-format`` flag of
``secure-fl server`` / ``site`` / ``simulate`` / ``demo``: ``auto``, ``text`` or ``json``) or per
call of :func:`setup`. The library's own loggers (``secure_fl.secagg``, ...) go to the same
handlers as ``library-log`` events. Rounds are numbered from 1 in the ``round`` field wherever a
person reads them; ``round_id`` is the protocol's id.

Events carry identifiers, counts, sizes, phases and durations only: never keys, shares, vectors,
model values or certificates' private parts.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from secure_fl.errors import ConfigError

#: The values of ``--log-format``: ``auto`` is text on a terminal, JSON lines otherwise.
FORMATS = ("auto", "text", "json")
_default_format = "auto"


def set_default_format(fmt: str) -> None:
    """Set the format :func:`setup` uses when it is not given one (``--log-format``).
    Errors: ConfigError naming the allowed values."""
    global _default_format
    _default_format = check_format(fmt)


def check_format(fmt: str) -> str:
    """``fmt`` when it is one of :data:`FORMATS`. Errors: ConfigError naming the allowed values."""
    if fmt not in FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def resolve_format(fmt: str | None, stream: TextIO) -> str:
    """``text`` or ``json`` for ``stream``: ``fmt`` (or the process default), ``auto`` resolved
    to ``text`` when ``stream`` is a terminal. Errors: ConfigError for an unknown format."""
    chosen = check_format(fmt if fmt is not None else _default_format)
    if chosen != "auto":
        return chosen
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def _entry(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The event name and fields of ``record`` (a library sentence becomes ``library-log``)."""
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        out = dict(fields)
        event = record.getMessage()
    else:
        event = "library-log"
        out = {"logger": record.name, "message": record.getMessage()}
    if record.exc_info and record.exc_info[1] is not None:
        out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return event, out


class _JsonFormatter(logging.Formatter):
    def __init__(self, party: str) -> None:
        super().__init__()
        self.party = party

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _entry(record)
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "party": self.party,
            "event": event,
        }
        entry.update(fields)
        return json.dumps(entry, default=str, separators=(",", ":"))


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c.isspace() or c in "\"'=" for c in value):
            return value
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def iso_utc(created: float) -> str:
    """``created`` (Unix seconds) as ISO-8601 UTC to the second, e.g. ``2026-12-01T18:30:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


class _TextFormatter(logging.Formatter):
    def __init__(self, party: str) -> None:
        super().__init__()
        self.party = party

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _entry(record)
        parts = [iso_utc(record.created), record.levelname, self.party, event]
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        return " ".join(parts)


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


def setup(
    party: str,
    log_file: Path | None = None,
    level: int = logging.INFO,
    *,
    fmt: str | None = None,
    stream: TextIO | None = None,
) -> EventLog:
    """Configure this process's logs for ``party``: ``stream`` (default stderr) in ``fmt``
    (default: :func:`set_default_format`'s, ``auto``: text on a terminal, JSON otherwise), and
    ``log_file`` (always JSON lines) when given.

    The library's own loggers go to the same handlers as ``library-log`` events, so that a line
    reader of a JSON stream never meets a plain-text warning. Errors: ConfigError for an unknown
    format."""
    out = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, out)
    logger = logging.getLogger(f"secure_fl.transport.{party}")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    console = logging.StreamHandler(out)
    console.setFormatter(_TextFormatter(party) if chosen == "text" else _JsonFormatter(party))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(_JsonFormatter(party))
        handlers.append(file_handler)
    library = logging.getLogger("secure_fl")
    library.setLevel(level)
    for handler in list(library.handlers):
        library.removeHandler(handler)
    for handler in handlers:
        logger.addHandler(handler)
        library.addHandler(handler)
    return EventLog(logger)
