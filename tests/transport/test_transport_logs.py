"""Every line a server or site process writes is one JSON object, library warnings included."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
