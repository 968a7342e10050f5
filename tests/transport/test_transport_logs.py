"""Every line a server or site process writes is one JSON object, library warnings included."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from secure_fl.errors import ConfigError
from secure_fl.transport import logs


def test_library_warnings_become_json_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "site.log"
    log = logs.setup("site:a", log_file)
    try:
        log.info("round-start", round=1, round_id=0)
        logging.getLogger("secure_fl.secagg").warning(
            "secagg with 2 sites: threshold 2, no dropout tolerance"
        )
        logging.getLogger("secure_fl.training").info("torch threads: %d", 2)
    finally:
        for name in ("secure_fl", "secure_fl.transport.site:a"):
            for handler in list(logging.getLogger(name).handlers):
                handler.close()
                logging.getLogger(name).removeHandler(handler)
    lines = log_file.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line parses
    assert entries[0]["event"] == "round-start" and entries[0]["round"] == 1
    assert entries[1] == {
        "ts": entries[1]["ts"],
        "level": "warning",
        "party": "site:a",
        "event": "library-log",
        "logger": "secure_fl.secagg",
        "message": "secagg with 2 sites: threshold 2, no dropout tolerance",
    }
    assert entries[2]["message"] == "torch threads: 2"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _close(party: str) -> None:
    for name in ("secure_fl", f"secure_fl.transport.{party}"):
        for handler in list(logging.getLogger(name).handlers):
            handler.close()
            logging.getLogger(name).removeHandler(handler)


def test_a_terminal_gets_readable_lines_with_iso_utc_times(tmp_path: Path) -> None:
    """In a terminal (``auto``) a person reads ``<ISO-8601 UTC> LEVEL party event key=value``;
    the log file next to it stays JSON lines."""
    term = _Terminal()
    log = logs.setup("server", tmp_path / "server.log", stream=term)
    try:
        log.info("round-start", round=1, sites=4)
        log.warning("waiting", site="hospital-d", seconds_left=312, note="two words")
        logging.getLogger("secure_fl.secagg").warning("threshold 2, no dropout tolerance")
    finally:
        _close("server")
    lines = term.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(rf"{stamp} INFO server round-start round=1 sites=4", lines[0]), lines
    assert re.fullmatch(
        rf'{stamp} WARNING server waiting site=hospital-d seconds_left=312 note="two words"',
        lines[1],
    ), lines
    assert re.fullmatch(
        rf"{stamp} WARNING server library-log logger=secure_fl.secagg "
        r'message="threshold 2, no dropout tolerance"',
        lines[2],
    ), lines
    entries = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["round-start", "waiting", "library-log"]


def test_log_format_json_and_auto_off_a_terminal_give_json_lines() -> None:
    for fmt, stream in (("json", _Terminal()), ("auto", io.StringIO()), (None, io.StringIO())):
        log = logs.setup("site:a", fmt=fmt, stream=stream)
        try:
            log.info("round-start", round=2, round_id=7)
        finally:
            _close("site:a")
        entry = json.loads(stream.getvalue())
        assert (entry["event"], entry["round"], entry["round_id"]) == ("round-start", 2, 7)
    logs.set_default_format("text")
    try:
        stream = io.StringIO()
        logs.setup("site:a", stream=stream).info("joined")
        _close("site:a")
        assert stream.getvalue().split()[1:] == ["INFO", "site:a", "joined"]
    finally:
        logs.set_default_format("auto")
    with pytest.raises(ConfigError, match="auto, text, json"):
        logs.set_default_format("yaml")


def test_the_log_format_flag_is_on_server_and_site(capsys: pytest.CaptureFixture[str]) -> None:
    from secure_fl.cli import main

    for command in ("server", "site", "simulate"):
        assert main([command, "--help"]) == 0
        assert "--log-format {auto,text,json}" in capsys.readouterr().out
    assert main(["site", "x.json", "--log-format", "yaml"]) == 2
    assert "invalid choice: 'yaml'" in capsys.readouterr().err
