"""SecAgg / SecAgg+ as one round: the recipe around the sans-IO protocol cores, written once.

Site half (:class:`SecAggSiteRound`): check the setup (roster, own weight, the site's policy)
before anything is sent; L2-clip the update (when the setup asks), encode it with the plan's
codec, its normalised weight and stochastic rounding; optionally add distributed DP noise on the
integers; mask it with a :class:`~secure_fl.secagg.SecAggClient`.

Server half (:class:`SecAggServerRound`): send each site its setup, run the phases of a
:class:`~secure_fl.secagg.SecAggServer`, unmask, decode the modular sum and divide it by the
survivors' normalised weight.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_fl.crypto import RandomBytes
from secure_fl.encoding import FixedPointCodec, l2_clip
from secure_fl.errors import (
    ConfigError,
    InvalidUpdateError,
    LocalProtocolError,
    RemoteProtocolError,
)
from secure_fl.rounds.base import NoiseHook, RoundOutcome, ServerRound, SiteRound
from secure_fl.rounds.checks import check_roster, config_from_setup, own_weight
from secure_fl.rounds.messages import Message, SecAggSetup
from secure_fl.rounds.plan import RoundPlan
from secure_fl.rounds.policy import SitePolicy
from secure_fl.secagg.client import SecAggClient
from secure_fl.secagg.messages import MaskedInput, UnmaskResponse
from secure_fl.secagg.policy import SitePolicy as CorePolicy
from secure_fl.secagg.server import SecAggServer, ServerPhase
from secure_fl.transport import policy as site_policy

if TYPE_CHECKING:
    from secure_fl.crypto import MaskPRG, SigningKey
    from secure_fl.rounds.guards import ReleaseGuard
    from secure_fl.rounds.state import StateSealer


def vector_sha256(vector: np.ndarray) -> str:
    """SHA-256 (hex) of an unsigned vector's little-endian bytes (host-independent digest)."""
    import hashlib

    little = vector.astype(vector.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(np.ascontiguousarray(little).tobytes()).hexdigest()


class SecAggServerRound(ServerRound):
    """The server half of a SecAgg / SecAgg+ round planned by :func:`~secure_fl.rounds.plan_round`.

    ``phase_deadline_s`` is copied into every setup (informative for the sites); ``prg`` an
    optional shared mask-expansion buffer (in process).

    Guarantee: the server learns only the modular sum of the survivors' encodings (see
    :class:`~secure_fl.secagg.SecAggServer`); ``outcome().mean`` is its decoded weighted mean.
    Errors: ConfigError when the plan is not a SecAgg plan.
    """

    def __init__(
        self, plan: RoundPlan, *, phase_deadline_s: float = 0.0, prg: MaskPRG | None = None
    ) -> None:
        if plan.secagg is None or plan.bit_plan is None:
            raise ConfigError(f"SecAggServerRound needs a secagg plan, got {plan.spec.protocol!r}")
        super().__init__(plan)
        self.config = plan.secagg
        self.codec: FixedPointCodec = plan.bit_plan.codec()
        self.phase_deadline_s = float(phase_deadline_s)
        self.server = SecAggServer(plan.secagg, prg=prg)
        self._started = False
        self._outcome: RoundOutcome | None = None
        self.seconds = 0.0

    def setup(self) -> dict[int, Message]:
        if self._started:
            raise LocalProtocolError("setup() was already called for this round")
        self._started = True
        plan, cfg = self.plan, self.config
        weights = {s: float(plan.weights[s]) for s in plan.ids}
        keys = dict(cfg.verify_keys or {})
        dp_json = plan.extra_binding.decode("utf-8")
        return {
            site: SecAggSetup(
                round_id=cfg.round_id,
                protocol=cfg.protocol,
                site_ids=tuple(sorted(cfg.site_ids)),
                threshold=cfg.threshold,
                k=cfg.degree,
                vector_length=cfg.vector_length,
                bits=cfg.bits,
                active=cfg.active,
                frac_bits=self.codec.frac_bits,
                clip_range=self.codec.clip_range,
                weight=float(plan.normalised[site]),
                weights=weights,
                verify_keys=keys,
                l2_clip=plan.spec.l2_clip,
                distributed_dp_json=dp_json,
                phase_deadline_s=self.phase_deadline_s,
            )
            for site in plan.ids
        }

    def receive(self, site: int, message: Message) -> None:
        sender = getattr(message, "sender", None)
        if sender != site:
            raise RemoteProtocolError(
                f"message claims sender {sender} but arrived from site {site}"
            )
        t0 = time.perf_counter()
        try:
            self.server.receive(message)
        finally:
            self.seconds += time.perf_counter() - t0

    @property
    def expected(self) -> frozenset[int]:
        if not self._started or self.done:
            return frozenset()
        return self.server.expected

    def close(self) -> dict[int, Message]:
        if not self._started:
            raise LocalProtocolError("close() before setup()")
        t0 = time.perf_counter()
        try:
            return dict(self.server.close_phase())
        finally:
            self.seconds += time.perf_counter() - t0

    @property
    def done(self) -> bool:
        return self.server.phase is ServerPhase.DONE

    @property
    def phase(self) -> ServerPhase:
        """The protocol core's phase (for logs)."""
        return self.server.phase

    def outcome(self) -> RoundOutcome:
        if self._outcome is not None:
            return self._outcome
        if not self.done:
            raise LocalProtocolError(f"no outcome: the round is in phase {self.phase.value}")
        t0 = time.perf_counter()
        total = self.server.result()
        survivors = frozenset(self.server.u3)
        weight = self.plan.surviving_weight(survivors)
        mean = self.codec.decode(total) / weight
        self.seconds += time.perf_counter() - t0
        bp = self.plan.bit_plan
        assert bp is not None  # checked in __init__
        self._outcome = RoundOutcome(
            survivors=survivors,
            dropped=frozenset(self.server.dropped),
            excluded=frozenset(self.server.excluded),
            mean=mean,
            total=total,
            record={
                "threshold": self.config.threshold,
                "k": self.config.degree,
                "active": self.config.active,
                "bits": bp.bits,
                "frac_bits": bp.frac_bits,
                "clip_range": bp.clip_range,
                "survivors": sorted(survivors),
                "dropped": sorted(self.server.dropped),
                "excluded": sorted(self.server.excluded),
                "sum_sha256": vector_sha256(total),
                "surviving_weight": weight,
                "max_error": bp.mean_error_bound(weight, len(survivors)),
                "server_seconds": self.seconds,
            },
        )
        return self._outcome


class SecAggSiteRound(SiteRound):
    """The site half of a SecAgg / SecAgg+ round.

    Besides :class:`SiteRound`'s arguments: ``roster`` the provisioned roster (site id ->
    pinned Ed25519 verify key or None), **required for the active variant** unless
    ``in_process=True`` says that server and sites are one program (:func:`~secure_fl.rounds.
    local.run_local`; there only this site's presence is checked): without it every verify key
    would be the server's word, and a server that invents the other participants (its own keys,
    zero updates) would pass every check and decode this site's update; ``release_guard`` the
    site's :class:`~secure_fl.rounds.guards.ReleaseGuard` (one participation and one unmasking per
    round id), which **every host must provide** (optional only for compatibility: without it a
    server can run two rounds under one id and difference the sums); ``max_vector_length`` the
    longest vector the site allocates; ``announced`` the aggregation the round started as (the
    setup must match it); ``prg`` an optional shared mask-expansion buffer (in process).

    Guarantee (against a malicious server): before anything is sent, :meth:`on_setup` refuses
    (PolicyError, nothing sent) a setup that breaks this site's policy (aggregation, variant,
    threshold, degree, vector length, colluders: :func:`secure_fl.transport.policy.
    check_secagg_round`) or misstates its weight (:func:`~secure_fl.rounds.checks.own_weight`),
    and (RemoteProtocolError) one that is malformed or names sites or keys off the roster; the
    ``release_guard`` refuses (PolicyError) a round id this site already took part in, and an
    unmasking of a round id already answered for another survivor set. The plain update is not
    kept past encoding.

    Errors (construction): ConfigError when the site's policy requires the active variant and no
    ``roster`` is given without ``in_process=True``.
    """

    def __init__(
        self,
        site_id: int,
        *,
        policy: SitePolicy,
        signing_key: SigningKey | None = None,
        randbytes: RandomBytes = os.urandom,
        rng: np.random.Generator | None = None,
        noise: NoiseHook | None = None,
        roster: dict[int, bytes | None] | None = None,
        max_vector_length: int | None = None,
        announced: str | None = None,
        prg: MaskPRG | None = None,
        in_process: bool = False,
        release_guard: ReleaseGuard | None = None,
    ) -> None:
        if roster is None and not in_process and policy.require_active:
            raise ConfigError(
                "SecAggSiteRound: the active variant needs the provisioned roster (roster=...); "
                "in_process=True only when server and sites are one program"
            )
        super().__init__(
            site_id,
            policy=policy,
            signing_key=signing_key,
            randbytes=randbytes,
            rng=rng,
            noise=noise,
        )
        self.roster = dict(roster) if roster is not None else None
        self.max_vector_length = max_vector_length
        self.announced = announced
        self.prg = prg
        self.in_process = bool(in_process)
        self.release_guard = release_guard
        self._sealer: StateSealer | None = None  # set by export/restore (rounds.state)
        self.client: SecAggClient | None = None
        self.setup_message: SecAggSetup | None = None
        self.clipped = 0
        self.l2_clipped = False
        self.seconds = 0.0

    def check_setup(
        self, setup: Message, *, update_length: int, reported_weight: float
    ) -> tuple[Any, FixedPointCodec, float]:
        """Every check of :meth:`on_setup` and nothing else: (config, codec, own weight).
        Errors: PolicyError / RemoteProtocolError / ConfigError as :meth:`on_setup`."""
        config, codec = config_from_setup(setup, max_length=self.max_vector_length)
        if config.active and self.roster is None and not self.in_process:
            raise ConfigError(
                "the active variant needs this site's provisioned roster (roster=...): the "
                "verify keys of the setup are the server's word"
            )
        check_roster(config, self.site_id, self.roster)
        weight = own_weight(setup.weights, self.site_id, reported_weight, setup.weight)
        roster_size = len(self.roster) if self.roster is not None else None
        site_policy.check_secagg_round(
            self.policy,
            announced=self.announced if self.announced is not None else config.protocol,
            protocol=config.protocol,
            active=config.active,
            num_sites=len(config.site_ids),
            k=config.degree,
            threshold=config.threshold,
            vector_length=config.vector_length,
            model_length=update_length,
            roster_size=roster_size,
        )
        if config.active and self.signing_key is None:
            raise ConfigError("the active variant needs this site's signing_key")
        return config, codec, weight

    def on_setup(
        self, setup: Message, *, update: np.ndarray, reported_weight: float
    ) -> Message | None:
        if self.setup_message is not None:
            raise RemoteProtocolError("a second setup for one round")
        t0 = time.perf_counter()
        vector = np.asarray(update)
        if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.floating):
            raise InvalidUpdateError("update must be a flat float vector")
        config, codec, weight = self.check_setup(
            setup, update_length=int(vector.size), reported_weight=reported_weight
        )
        if not np.all(np.isfinite(vector)):
            raise InvalidUpdateError("update holds NaN or Inf")
        if self.release_guard is not None:
            self.release_guard.claim(config.round_id, None)  # PolicyError: id already used
        vector = vector.astype(np.float64, copy=False)
        if setup.l2_clip is not None:
            vector, info = l2_clip(vector, setup.l2_clip)
            self.l2_clipped = bool(info.clipped)
        encoded = codec.encode(vector, weight=weight, rng=self.stochastic_rng())
        del vector  # the plain update is not kept past encoding
        self.clipped = int(encoded.clipped)
        values = encoded.values
        if self.noise is not None:
            values = self.noise(values, setup)
        self.client = self.new_client(config, values)
        self.setup_message = setup
        advert = self.client.start()
        self.seconds += time.perf_counter() - t0
        return advert

    def new_client(self, config: Any, values: np.ndarray | None = None) -> SecAggClient:
        """The protocol client of this half for ``config``, holding ``values`` (the encoded,
        noised update) when given. Its core policy enforces the same threshold and variant as
        :meth:`check_setup` (defence in depth), at the round's share of this site's assumed
        colluders. Errors: PolicyError / LocalProtocolError from the client."""
        return SecAggClient(
            self.site_id,
            config,
            policy=CorePolicy(
                corrupt_fraction=site_policy.round_corrupt_fraction(
                    self.policy.corrupt_fraction,
                    len(config.site_ids),
                    len(self.roster) if self.roster is not None else None,
                ),
                require_active=self.policy.require_active,
            ),
            input_vector=values,
            signing_key=self.signing_key,
            randbytes=self.randbytes,
            prg=self.prg,
        )

    def handle(self, message: Message) -> Message | None:
        if self.client is None:
            raise RemoteProtocolError(f"{type(message).__name__} before the round's setup")
        if self._sealer is not None:
            # Every blob exported before this message dies (rounds.state: freshness).
            self._sealer.advance(self.site_id, self.client.config.round_id)
        t0 = time.perf_counter()
        try:
            reply = self.client.handle(message)
        finally:
            self.seconds += time.perf_counter() - t0
        if isinstance(reply, MaskedInput) and self.release_guard is not None:
            # The masked input alone releases the update (the others' shares rebuild the
            # self-mask): recorded before it leaves; a refusal discards it.
            self.release_guard.contribute(self.client.config.round_id)
        if isinstance(reply, UnmaskResponse) and self.release_guard is not None:
            survivors = frozenset(getattr(message, "survivors", frozenset()))
            # Recorded before the answer leaves; a refusal discards the answer.
            self.release_guard.claim(self.client.config.round_id, survivors)
        return reply

    @property
    def done(self) -> bool:
        from secure_fl.secagg.client import ClientPhase

        return self.client is not None and self.client.phase in (
            ClientPhase.DONE,
            ClientPhase.ERROR,
        )


__all__ = ["SecAggServerRound", "SecAggSiteRound", "vector_sha256"]
