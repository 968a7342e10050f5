"""How the Flower workflow plans a round (split from :mod:`.workflow` to keep it short): a
fresh round id; the plan itself is the shared
:func:`secure_fl.rounds.plan.plan_secure_round` (re-exported here), the same function the gRPC
server plans with."""

from __future__ import annotations

import os

from secure_fl.rounds.plan import plan_secure_round


def fresh_round_id() -> int:
    """A round id drawn from ``os.urandom``, uniform in [1, 2^62) (fresh per round)."""
    while True:
        value = int.from_bytes(os.urandom(8), "big") >> 2
        if value >= 1:
            return value


__all__ = ["fresh_round_id", "plan_secure_round"]
