"""The two halves of a round, as sans-IO state machines, and what a round produces.

A :class:`ServerRound` and one :class:`SiteRound` per participant exchange message objects
(:mod:`secure_fl.rounds.messages`, :mod:`secure_fl.secagg.messages`); a driver carries them (in
process: :func:`secure_fl.rounds.local.run_local`; over gRPC: the transport; as bytes:
:mod:`secure_fl.rounds.codec`). Neither half does I/O, reads a clock or draws randomness it was
not given. The h11 split applies: a :class:`~secure_fl.errors.RemoteProtocolError` from
:meth:`ServerRound.receive` refuses that one message and the round goes on; any other
ProtocolError aborts the round.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from secure_fl.crypto import RandomBytes
from secure_fl.rounds.messages import Message
from secure_fl.rounds.plan import RoundPlan
from secure_fl.rounds.policy import SitePolicy

if TYPE_CHECKING:
    from secure_fl.crypto import SigningKey
    from secure_fl.rounds.guards import ReleaseGuard
    from secure_fl.rounds.messages import SecAggSetup
    from secure_fl.rounds.state import StateSealer

#: Distributed DP noise on the encoded integers, before masking: called by a site with its
#: encoded unsigned vector (``uint32``/``uint64``, modulo ``2**bits``) and the setup it accepted;
#: returns the noised vector (same dtype and length, still modulo ``2**bits``).
NoiseHook: TypeAlias = Callable[[np.ndarray, "SecAggSetup"], np.ndarray]


@dataclass(frozen=True)
class RoundOutcome:
    """What a closed round produced (public: no secret, no single site's update).

    ``survivors`` sites whose contribution is in the result; ``dropped`` participants that
    vanished (their masks recovered); ``excluded`` sites the protocol excluded for misbehaving.
    ``mean`` the float64 weighted mean of the survivors' updates (plain, secagg); ``total`` the
    modular sum (secagg: for parity tests); ``encrypted`` the encrypted weighted sum (ckks).
    ``record`` what logs and reports need: threshold, k, bits, frac_bits, sum_sha256,
    max_error, bytes and seconds where the driver measured them, ...
    """

    survivors: frozenset[int]
    dropped: frozenset[int]
    excluded: frozenset[int]
    mean: np.ndarray | None = field(default=None, repr=False)
    total: np.ndarray | None = field(default=None, repr=False)
    encrypted: bytes | None = field(default=None, repr=False)
    record: Mapping[str, Any] = field(default_factory=dict)


class ServerRound(ABC):
    """The server half of one round (PlainServerRound, SecAggServerRound, CkksServerRound).

    Drive it as: ``setup()`` -> deliver the messages; ``receive`` each site message; when
    ``expected`` is empty or the stage's deadline passes, ``close()`` -> deliver; repeat until
    ``done``; then ``outcome()``.
    """

    plan: RoundPlan

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan

    @abstractmethod
    def setup(self) -> dict[int, Message]:
        """The first message for each participant (site id -> message). Call once.
        Errors: LocalProtocolError when called twice."""

    @abstractmethod
    def receive(self, site: int, message: Message) -> None:
        """Accept ``message`` from ``site`` (the authenticated sender) for the open stage.

        Errors: RemoteProtocolError refuses that message (the round goes on); any other
        ProtocolError aborts the round."""

    @property
    @abstractmethod
    def expected(self) -> frozenset[int]:
        """Sites whose message of the open stage has not arrived (empty: close now)."""

    @abstractmethod
    def close(self) -> dict[int, Message]:
        """Close the open stage (all arrived, or its deadline passed): the next messages.
        Errors: ThresholdError when too few sites remain (the round aborts, reveals nothing);
        other ProtocolError on an aborted round."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True once the round's result is known (:meth:`outcome` may be called)."""

    @abstractmethod
    def outcome(self) -> RoundOutcome:
        """The round's result. Errors: LocalProtocolError before :attr:`done`."""


class SiteRound(ABC):
    """The site half of one round (PlainSiteRound, SecAggSiteRound, CkksSiteRound).

    ``policy`` is the site's own (pinned in its config, never the server's word);
    ``signing_key`` its long-term Ed25519 key (active SecAgg); ``randbytes`` the source of its
    protocol secrets (the OS CSPRNG unless a test passes a named deterministic stream); ``rng``
    the generator of stochastic rounding (default: seeded from ``randbytes``); ``noise`` an
    optional distributed-DP hook on the encoded integers.
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
    ) -> None:
        self.site_id = site_id
        self.policy = policy
        self.signing_key = signing_key
        self.randbytes = randbytes
        self.rng = rng
        self.noise = noise

    def stochastic_rng(self) -> np.random.Generator:
        """The generator of stochastic rounding: ``rng`` when given, else one seeded with 256
        bits from ``randbytes``."""
        if self.rng is not None:
            return self.rng
        return np.random.default_rng(int.from_bytes(self.randbytes(32), "big"))

    @abstractmethod
    def on_setup(
        self, setup: Message, *, update: np.ndarray, reported_weight: float
    ) -> Message | None:
        """Check ``setup`` against this site's policy and its own ``reported_weight`` BEFORE
        anything is sent, then prepare ``update`` (flat float vector) and return the first
        message to send (None: nothing to send yet).

        Errors: PolicyError (nothing sent) when the setup breaks the policy or misstates the
        weight; RemoteProtocolError on a malformed setup; InvalidUpdateError on a bad update."""

    @abstractmethod
    def handle(self, message: Message) -> Message | None:
        """Process the server's next message; the reply to send, or None.
        Errors: ProtocolError (the site leaves the round; the object refuses everything after)."""

    @property
    def done(self) -> bool:
        """True once this site has nothing more to do in the round."""
        return False

    def export_state(self, sealer: StateSealer) -> bytes:
        """This half's state between two messages, as bytes: public state in the clear, secrets
        sealed with ``sealer`` (AES-256-GCM), bound to this site, its round and a fresh counter
        (every older blob of this site and round dies). A host exports after every message,
        before it sends the reply (:mod:`secure_fl.rounds.state`).
        Errors: LocalProtocolError before the setup or where unsupported."""
        from secure_fl.rounds.state import export_state

        return export_state(self, sealer)

    @classmethod
    def restore(
        cls,
        blob: bytes,
        sealer: StateSealer,
        *,
        site_id: int,
        round_id: int,
        policy: SitePolicy,
        signing_key: SigningKey | None = None,
        randbytes: RandomBytes = os.urandom,
        rng: np.random.Generator | None = None,
        noise: NoiseHook | None = None,
        release_guard: ReleaseGuard | None = None,
    ) -> SiteRound:
        """The site half exported as ``blob`` by :meth:`export_state` with the same ``sealer``,
        for the ``site_id`` and ``round_id`` the host expects; only the latest blob of that site
        and round, and only once. The host passes again what is not state (policy, long-term
        key, randomness, hooks, the site's ``release_guard``).
        Errors: DecryptionError (one opaque error) for a tampered, truncated, foreign, stale,
        replayed or other site's or round's blob."""
        from secure_fl.errors import DecryptionError
        from secure_fl.rounds.state import restore_state

        half = restore_state(
            blob,
            sealer,
            site_id=site_id,
            round_id=round_id,
            policy=policy,
            signing_key=signing_key,
            randbytes=randbytes,
            rng=rng,
            noise=noise,
            release_guard=release_guard,
        )
        if not isinstance(half, cls):  # a blob of another kind of half: as opaque as any other
            raise DecryptionError("round state could not be restored")
        return half


__all__ = ["NoiseHook", "RoundOutcome", "ServerRound", "SitePolicy", "SiteRound"]
