"""Test-only launcher: a site process that kills itself (SIGKILL) just before a named step.

``python tests/transport/crashing_site.py SITE_JSON STEP ROUND_ID`` (ROUND_ID ``-1``: any round).
The crash is an injected hook (``SiteRunner(crash_hook=...)``), never a config key, so no
production config can carry it.
"""

from __future__ import annotations

import os
import signal
import sys

from secure_fl.transport.config import CRASH_POINTS, load_site_config
from secure_fl.transport.site import SiteRunner


def main(argv: list[str]) -> int:
    path, step, round_text = argv
    if step not in CRASH_POINTS:
        raise SystemExit(f"step must be one of {CRASH_POINTS}, got {step!r}")
    crash_round = int(round_text)

    def hook(point: str, round_id: int) -> None:
        if point == step and crash_round in (-1, round_id):
            runner.log.warning("test-crash", point=point, round=round_id)
            os.kill(os.getpid(), signal.SIGKILL)

    runner = SiteRunner(load_site_config(path), crash_hook=hook)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
