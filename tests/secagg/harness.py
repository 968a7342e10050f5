"""Test helpers: random inputs and a model of which sites survive each phase."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from secure_fl.secagg import Phase, SecAggConfig


def random_inputs(config: SecAggConfig, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if config.bits == 32 else np.uint64
    high = np.iinfo(dtype).max
    return {
        site: rng.integers(0, high, size=config.vector_length, dtype=dtype, endpoint=True)
        for site in config.site_ids
    }


def modular_sum(inputs: Mapping[int, np.ndarray], sites: frozenset[int], bits: int) -> np.ndarray:
    dtype = np.uint32 if bits == 32 else np.uint64
    length = len(next(iter(inputs.values())))
    total = np.zeros(length, dtype=dtype)
    for site in sites:
        total += inputs[site]  # unsigned numpy arithmetic wraps modulo 2**bits
    return total


def predict(config: SecAggConfig, dropouts: Mapping[int, Phase]) -> frozenset[int] | None:
    """Survivor set U3 when the round should succeed, None when it must abort.

    Follows the specification in protocols/secagg.md: each site checks that at least ``threshold``
    of its share holders remain; the server needs ``threshold`` answers in every phase and
    ``threshold`` shares of every secret it must reconstruct.
    """
    t = config.threshold

    def alive(site: int, phase: Phase) -> bool:
        gone = dropouts.get(site)
        return gone is None or phase.value < gone.value

    u1 = frozenset(s for s in config.site_ids if alive(s, Phase.ADVERTISE_KEYS))
    if len(u1) < t:
        return None
    u2 = frozenset(s for s in u1 if alive(s, Phase.SHARE_KEYS) and len(u1 & config.holders(s)) >= t)
    if len(u2) < t:
        return None
    u3 = frozenset(
        s for s in u2 if alive(s, Phase.MASKED_INPUT) and len(u2 & config.holders(s)) >= t
    )
    if len(u3) < t:
        return None
    last = u3
    if config.active:
        last = frozenset(s for s in u3 if alive(s, Phase.CONSISTENCY_CHECK))
        if len(last) < t:
            return None
        # Every signer verifies the signatures of the others: needs t of them.
    u5 = frozenset(s for s in last if alive(s, Phase.UNMASKING))
    if len(u5) < t:
        return None
    for owner in u2:
        holders = config.holders(owner) & u2 & u5
        if len(holders) < t:
            return None
    return u3
