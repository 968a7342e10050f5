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
from secure_fl.rounds.spec import AggregationSpec

#: Names accepted by :func:`create`.
NAMES = ("plain", "secagg", "secagg+", "ckks")


def create(name: str, **options: Any) -> Aggregator:
    """Return the aggregator called ``name`` configured with ``options``.

    ``name`` is one of ``"plain"``, ``"secagg"``, ``"secagg+"``, ``"ckks"``. Options are the
    fields of :class:`secure_fl.rounds.spec.AggregationSpec` that apply to ``name`` (see
    :data:`secure_fl.rounds.spec.OPTIONS`) and the driver options (``seed`` for SecAgg; the
    contexts and ``measure_error`` for CKKS): the keyword arguments of
    :class:`PlainAggregator`, :class:`MaskedAggregator` or :class:`CKKSAggregator`.

    Errors: ConfigError for an unknown name or an unknown or invalid option (the message lists
    the options allowed for ``name``).
    """
    if name not in NAMES:
        raise ConfigError(f"aggregator name must be one of {NAMES}, got {name!r}")
    try:
        AggregationSpec.split_options(name, options, where="options")
    except ConfigError as exc:
        raise ConfigError(f"invalid option for aggregator {name!r}: {exc}") from exc
    if name == "plain":
        return PlainAggregator(**options)
    if name == "ckks":
        return CKKSAggregator(**options)
    return MaskedAggregator(name, **options)


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
