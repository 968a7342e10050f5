"""The plain baseline as one round: each site sends its (L2-clipped) update in the clear.

No protection at all: the server sees every update. A site sends one only when its own policy
accepts ``plain`` (``policy.allow_plain`` and ``"plain"`` listed). The server computes the float64
weighted mean of the updates that arrived, weighted by the plan's normalised weights.
"""

from __future__ import annotations

import os
import time

import numpy as np

from secure_fl.crypto import RandomBytes
from secure_fl.encoding import l2_clip
from secure_fl.errors import (
    ConfigError,
    InvalidUpdateError,
    LocalProtocolError,
    RemoteProtocolError,
    ThresholdError,
)
from secure_fl.rounds.base import NoiseHook, RoundOutcome, ServerRound, SiteRound
from secure_fl.rounds.checks import check_l2_clip, own_weight, setup_weights
from secure_fl.rounds.messages import Message, PlainSetup, PlainUpload
from secure_fl.rounds.plan import RoundPlan
from secure_fl.rounds.policy import SitePolicy
from secure_fl.transport import policy as site_policy

#: Relative slack on the plan's ``l2_clip`` when the server checks an upload's L2 norm (the
#: site's clipping rounds in float64).
L2_SLACK = 1e-9


def _l2_norm(vector: np.ndarray) -> float:
    """The L2 norm of finite ``vector`` without overflow (scaled by its largest magnitude)."""
    values = np.asarray(vector, dtype=np.float64)
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    if scale == 0.0:
        return 0.0
    return scale * float(np.linalg.norm(values / scale))


class PlainServerRound(ServerRound):
    """The server half of a plain round: one stage (uploads), then the weighted mean.

    Guarantee: only finite uploads of the plan's length, and, when the plan has an ``l2_clip``,
    of L2 norm at most ``l2_clip * (1 + L2_SLACK)``, enter the mean (:meth:`receive` refuses
    any other with RemoteProtocolError: the round goes on without that site); a non-finite
    mean is never released.
    Errors: ConfigError for a plan of another protocol; :meth:`close` raises ThresholdError
    when no update arrived or when the weighted mean is not finite (no outcome)."""

    def __init__(self, plan: RoundPlan) -> None:
        if plan.spec.protocol != "plain":
            raise ConfigError(f"PlainServerRound needs a plain plan, got {plan.spec.protocol!r}")
        super().__init__(plan)
        self._started = False
        self._closed = False
        self._got: dict[int, PlainUpload] = {}
        self._outcome: RoundOutcome | None = None
        self.seconds = 0.0

    def setup(self) -> dict[int, Message]:
        if self._started:
            raise LocalProtocolError("setup() was already called for this round")
        self._started = True
        plan = self.plan
        weights = {s: float(plan.weights[s]) for s in plan.ids}
        return {
            s: PlainSetup(plan.round_id, plan.ids, plan.vector_length, weights, plan.spec.l2_clip)
            for s in plan.ids
        }

    def receive(self, site: int, message: Message) -> None:
        if not self._started or self._closed:
            raise RemoteProtocolError(f"upload from site {site} outside the upload stage")
        if not isinstance(message, PlainUpload):
            raise RemoteProtocolError(f"{type(message).__name__} is not allowed in a plain round")
        if message.sender != site:
            raise RemoteProtocolError(f"upload claims sender {message.sender}, arrived from {site}")
        if message.round_id != self.plan.round_id:
            raise RemoteProtocolError(f"upload from site {site} is for round {message.round_id}")
        if site not in self.plan.weights:
            raise RemoteProtocolError(f"site {site} is not a participant of this round")
        if site in self._got:
            raise RemoteProtocolError(f"duplicate upload from site {site}")
        vector = message.vector
        if vector.shape != (self.plan.vector_length,):
            raise RemoteProtocolError(
                f"upload from site {site} has shape {vector.shape}, expected "
                f"({self.plan.vector_length},)"
            )
        if not np.all(np.isfinite(vector)):
            raise RemoteProtocolError(f"upload from site {site} holds NaN or Inf")
        bound = self.plan.spec.l2_clip
        if bound is not None:
            norm = _l2_norm(vector)
            if norm > float(bound) * (1.0 + L2_SLACK):
                raise RemoteProtocolError(
                    f"upload from site {site} has L2 norm {norm:.6g}, above the plan's "
                    f"l2_clip {float(bound):.6g} (relative slack {L2_SLACK:g})"
                )
        self._got[site] = message

    @property
    def expected(self) -> frozenset[int]:
        if not self._started or self._closed:
            return frozenset()
        return frozenset(self.plan.ids) - frozenset(self._got)

    def close(self) -> dict[int, Message]:
        if not self._started:
            raise LocalProtocolError("close() before setup()")
        if self._closed:
            raise LocalProtocolError("the round is closed")
        if not self._got:
            raise ThresholdError("no site sent its update; nothing to aggregate")
        self._closed = True
        t0 = time.perf_counter()
        survivors = frozenset(self._got)
        total = np.zeros(self.plan.vector_length, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
            for site in sorted(survivors):
                total += self.plan.weights[site] * self._got[site].vector
            total /= sum(self.plan.weights[s] for s in sorted(survivors))
        self.seconds += time.perf_counter() - t0
        if not np.all(np.isfinite(total)):
            self._got = {}
            raise ThresholdError(
                "the weighted mean of the uploads is not finite (it overflowed); the round "
                "has no outcome and nothing is applied"
            )
        self._outcome = RoundOutcome(
            survivors=survivors,
            dropped=frozenset(self.plan.ids) - survivors,
            excluded=frozenset(),
            mean=total,
            record={
                "survivors": sorted(survivors),
                "dropped": sorted(frozenset(self.plan.ids) - survivors),
                "clipped_updates": sorted(s for s, m in self._got.items() if m.clipped),
                "max_error": 0.0,
                "server_seconds": self.seconds,
            },
        )
        self._got = {}
        return {}

    @property
    def done(self) -> bool:
        return self._outcome is not None

    def outcome(self) -> RoundOutcome:
        if self._outcome is None:
            raise LocalProtocolError("no outcome: the upload stage is still open")
        return self._outcome


class PlainSiteRound(SiteRound):
    """The site half of a plain round. Sends its update in the clear, and only when its own
    ``policy`` accepts plain aggregation and does not require distributed DP
    (``require_dp``, or implied by ``min_noise_multiplier`` / ``max_dp_rounds``: a plain round
    carries no noise; PolicyError otherwise, nothing sent) and the setup lists its reported
    weight (PolicyError otherwise). A setup whose weights are not one finite
    weight > 0 per site, or whose ``l2_clip`` is not None or finite > 0, is refused
    (RemoteProtocolError naming the field)."""

    def __init__(
        self,
        site_id: int,
        *,
        policy: SitePolicy,
        signing_key: object = None,
        randbytes: RandomBytes = os.urandom,
        rng: np.random.Generator | None = None,
        noise: NoiseHook | None = None,
    ) -> None:
        super().__init__(site_id, policy=policy, randbytes=randbytes, rng=rng, noise=noise)
        self.setup_message: PlainSetup | None = None
        self.l2_clipped = False
        self._sent = False

    def on_setup(
        self, setup: Message, *, update: np.ndarray, reported_weight: float
    ) -> Message | None:
        if not isinstance(setup, PlainSetup):
            raise RemoteProtocolError(f"expected a PlainSetup, got {type(setup).__name__}")
        if self.setup_message is not None:
            raise RemoteProtocolError("a second setup for one round")
        site_policy.check_aggregation(self.policy, "plain")
        # A plain round carries no distributed DP noise: refused when the policy requires DP.
        site_policy.check_privacy_floor(self.policy, "plain")
        if self.site_id not in setup.site_ids:
            raise RemoteProtocolError("this site is not in the round")
        listed = setup_weights(setup)  # RemoteProtocolError: not one finite weight > 0 per site
        l2_bound = check_l2_clip(setup.l2_clip)
        own_weight(listed, self.site_id, reported_weight, _share(listed, self.site_id))
        vector = np.asarray(update)
        if vector.ndim != 1 or vector.shape[0] != setup.vector_length:
            raise InvalidUpdateError(
                f"update must be a flat vector of {setup.vector_length} values, got shape "
                f"{vector.shape}"
            )
        vector = vector.astype(np.float64)
        if not np.all(np.isfinite(vector)):
            raise InvalidUpdateError("update holds NaN or Inf")
        if l2_bound is not None:
            vector, info = l2_clip(vector, l2_bound)
            self.l2_clipped = bool(info.clipped)
        self.setup_message = setup
        self._sent = True
        return PlainUpload(setup.round_id, self.site_id, vector, self.l2_clipped)

    def handle(self, message: Message) -> Message | None:
        raise RemoteProtocolError(f"{type(message).__name__} is not expected in a plain round")

    @property
    def done(self) -> bool:
        return self._sent


def _share(listed: dict[int, float], site: int) -> float:
    from fractions import Fraction

    total = sum((Fraction(listed[s]) for s in sorted(listed)), Fraction(0))
    return float(Fraction(listed.get(site, 0.0)) / total) if total else 0.0


__all__ = ["PlainServerRound", "PlainSiteRound"]
