"""Shared set-up of the round-layer tests: a small planned round with fixed keys and seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from secure_fl.crypto import DeterministicRandom, SigningKey
from secure_fl.rounds import AggregationSpec, RoundPlan, plan_round


@dataclass
class Round:
    plan: RoundPlan
    updates: dict[int, np.ndarray]
    keys: dict[int, SigningKey]


def make_round(
    protocol: str = "secagg+",
    n: int = 6,
    length: int = 40,
    *,
    seed: int = 0,
    weights: dict[int, float] | None = None,
    **options: object,
) -> Round:
    """A plan among sites 1..n with deterministic signing keys and updates in [-1, 1]."""
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    keys = {
        i: SigningKey.generate(DeterministicRandom(f"tests/rounds/key/{seed}/{i}".encode()))
        for i in ids
    }
    w = weights if weights is not None else {i: float(rng.integers(1, 100)) for i in ids}
    spec = AggregationSpec.from_options(protocol, options)
    plan = plan_round(
        spec,
        w,
        vector_length=length,
        round_id=7,
        verify_keys={i: k.public_bytes for i, k in keys.items()},
    )
    updates = {i: rng.uniform(-1, 1, size=length) for i in ids}
    return Round(plan, updates, keys)


def site_streams(seed: int, ids: tuple[int, ...]) -> dict[str, dict[int, object]]:
    """Per-site deterministic randomness (tests only): protocol bytes and stochastic rounding."""
    return {
        "randbytes": {i: DeterministicRandom(f"tests/rounds/{seed}/{i}".encode()) for i in ids},
        "rng": {i: np.random.default_rng([seed, i]) for i in ids},
    }


def weighted_mean(
    updates: dict[int, np.ndarray], weights: dict[int, float], survivors: frozenset[int]
) -> np.ndarray:
    total = sum(weights[s] for s in survivors)
    return sum(weights[s] * updates[s] for s in sorted(survivors)) / total  # type: ignore[return-value]
