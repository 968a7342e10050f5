"""Privacy-utility benchmark: a thin wrapper of ``secure-fl bench privacy-utility``.

The benchmark lives in the package (:mod:`secure_fl.bench.privacy_utility`); this script only
forwards its arguments, e.g. ``.venv/bin/python benchmarks/privacy_utility.py --profile quick
--out runs/privacy-utility`` (see ``secure-fl bench privacy-utility --help``).
"""

from __future__ import annotations

import sys

from secure_fl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "privacy-utility", *sys.argv[1:]]))
