"""What pipelines import: one interface over plain and secure aggregation.

>>> from secure_fl import aggregators
>>> agg = aggregators.create("secagg+")
>>> result = agg.aggregate({"a": [np.ones(3)], "b": [np.zeros(3)], "c": [np.ones(3)]})  # doctest: +SKIP
>>> result.mean, result.report["included"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from secure_fl.aggregators.base import AggregationResult, Aggregator, Updates
from secure_fl.aggregators.ckks import CKKSAggregator
from secure_fl.aggregators.masked import MaskedAggregator
from secure_fl.aggregators.plain import PlainAggregator
from secure_fl.errors import ConfigError

#: Names accepted by :func:`create`.
NAMES = ("plain", "secagg", "secagg+", "ckks")


def create(name: str, **options: Any) -> Aggregator:
    """Return the aggregator called ``name`` configured with ``options``.

    ``name`` is one of ``"plain"``, ``"secagg"``, ``"secagg+"``, ``"ckks"``. Options are keyword
    arguments of :class:`PlainAggregator`, :class:`MaskedAggregator` or :class:`CKKSAggregator`.

    Errors: ConfigError for an unknown name or an unknown or invalid option.
    """
    if name not in NAMES:
        raise ConfigError(f"aggregator name must be one of {NAMES}, got {name!r}")
    try:
        if name == "plain":
            return PlainAggregator(**options)
        if name == "ckks":
            return CKKSAggregator(**options)
        return MaskedAggregator(name, **options)
    except TypeError as exc:
        raise ConfigError(f"invalid option for aggregator {name!r}: {exc}") from exc


__all__ = [
    "NAMES",
    "AggregationResult",
    "Aggregator",
    "CKKSAggregator",
    "MaskedAggregator",
    "PlainAggregator",
    "Updates",
    "create",
]
