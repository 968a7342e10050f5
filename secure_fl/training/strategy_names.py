"""The names of the collaboration strategies, torch-free.

Kept apart from :mod:`secure_fl.training.strategies` (which imports torch and MONAI) so that
reading an experiment configuration imports no torch; that module re-exports :data:`STRATEGIES`.
"""

from __future__ import annotations

__all__ = ["STRATEGIES"]

#: Every strategy :func:`secure_fl.training.strategies.make_strategy` builds, by name.
STRATEGIES = ("fedavg", "fedprox", "cwt", "swt", "ensemble", "local", "centralized")
