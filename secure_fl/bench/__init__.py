"""Benchmarks that ship with the package: ``secure-fl bench privacy-utility``.

:mod:`.profiles` (the grids: smoke, quick, full), :mod:`.privacy_utility` (the runs),
:mod:`.report` (summary.json, summary.md, plots), :mod:`.cli` (the ``bench`` verb). Importing
this package imports nothing heavy; the runs import torch and MONAI when they start.
"""

from secure_fl.bench.profiles import PROFILES, BenchProfile, get_profile

__all__ = ["PROFILES", "BenchProfile", "get_profile"]
