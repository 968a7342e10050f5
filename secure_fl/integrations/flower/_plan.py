"""How the Flower workflow plans a round (split from :mod:`.workflow` to keep it short): a
fresh round id, and the plan of a round with the privacy layer's clip, noise JSON and threshold
floor, as the gRPC server plans one."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.rounds.plan import RoundPlan, plan_round
from secure_fl.rounds.spec import AggregationSpec


def fresh_round_id() -> int:
    """A round id drawn from ``os.urandom``, uniform in [1, 2^62) (fresh per round)."""
    while True:
        value = int.from_bytes(os.urandom(8), "big") >> 2
        if value >= 1:
            return value


def plan_secure_round(
    spec: AggregationSpec,
    weights: Mapping[int, float],
    *,
    vector_length: int,
    round_id: int,
    verify_keys: Mapping[int, bytes] | None = None,
    distributed_dp_json: str = "",
    l2_clip: float | None = None,
    min_threshold: int | None = None,
) -> RoundPlan:
    """:func:`~secure_fl.rounds.plan.plan_round` as the gRPC server plans a private round
    (:func:`secure_fl.transport.server_rounds.secagg_open`): ``l2_clip`` (the privacy layer's
    bound, when given) replaces the spec's; ``distributed_dp_json`` is bound into the round; a
    SecAgg plan whose threshold is below the noise's threshold (its JSON's, or
    ``min_threshold``: the noise is sized for it, sites refuse less) is planned again with
    it. Errors: ConfigError for a round that cannot be planned (too few sites for the
    noise threshold, the active variant without a key per site, ...)."""
    from secure_fl.transport.server_rounds import dp_noise_threshold

    if l2_clip is not None:
        spec = dataclasses.replace(spec, l2_clip=l2_clip)
    extra = distributed_dp_json.encode("utf-8")
    kwargs: dict[str, Any] = {
        "vector_length": vector_length,
        "round_id": round_id,
        "verify_keys": verify_keys,
        "extra_binding": extra,
    }
    plan = plan_round(spec, weights, **kwargs)
    floors = [t for t in (dp_noise_threshold(distributed_dp_json), min_threshold) if t]
    noise_t = max(floors) if floors else None
    if noise_t is None or plan.secagg is None or plan.secagg.threshold >= noise_t:
        return plan
    if len(weights) < noise_t:
        raise ConfigError(
            f"a distributed-DP round of {len(weights)} sites cannot reach the noise threshold "
            f"t={noise_t} (sized for the roster); the round is not started"
        )
    return plan_round(dataclasses.replace(spec, threshold=noise_t), weights, **kwargs)


__all__ = ["fresh_round_id", "plan_secure_round"]
