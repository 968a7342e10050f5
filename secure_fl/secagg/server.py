"""The server's side of SecAgg / SecAgg+ as a sans-IO state machine.

The server routes messages between sites, accumulates the masked inputs and, in the last phase,
removes the masks: it reconstructs each survivor's self-mask seed and each dropped site's mask key
from ``threshold`` Shamir shares and regenerates the corresponding PRG outputs.

Guarantee: :meth:`SecAggServer.result` is the exact sum modulo ``2**bits`` of the inputs of the sites
whose masked input arrived (U3), provided at least ``threshold`` parties complete every phase.
Otherwise the round aborts with :class:`ThresholdError` and the server holds only masked vectors and
fewer than ``threshold`` shares of any secret, which reveal nothing about any single input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from enum import Enum
from typing import Any, NoReturn

import numpy as np

from secure_fl.crypto import MaskPRG, Share, X25519KeyPair, agree_key, combine, verify
from secure_fl.errors import (
    InconsistentSharesError,
    InsufficientSharesError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SignatureError,
    ThresholdError,
)
from secure_fl.secagg.client import consistency_payload
from secure_fl.secagg.config import SecAggConfig
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    ServerMessage,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)


class ServerPhase(Enum):
    COLLECT_KEYS = "collect-keys"
    COLLECT_SHARES = "collect-shares"
    COLLECT_MASKED = "collect-masked"
    COLLECT_SIGNATURES = "collect-signatures"
    COLLECT_UNMASK = "collect-unmask"
    DONE = "done"
    ABORTED = "aborted"


# The one table of phases: phase -> (message type accepted, arrival check, closing handler).
# Each closing handler sets the next phase: after COLLECT_MASKED it is COLLECT_SIGNATURES in the
# active variant and COLLECT_UNMASK otherwise.
_PHASES: dict[ServerPhase, tuple[type, str, str]] = {
    ServerPhase.COLLECT_KEYS: (AdvertiseKeys, "_check_advert", "_close_keys"),
    ServerPhase.COLLECT_SHARES: (ShareKeys, "_check_shares", "_close_shares"),
    ServerPhase.COLLECT_MASKED: (MaskedInput, "_check_masked", "_close_masked"),
    ServerPhase.COLLECT_SIGNATURES: (
        ConsistencySignature,
        "_check_signature",
        "_close_signatures",
    ),
    ServerPhase.COLLECT_UNMASK: (UnmaskResponse, "_check_unmask", "_close_unmask"),
}


class SecAggServer:
    """The aggregation server for one round.

    Use: feed every arriving site message to :meth:`receive`; when the phase's deadline passes (or
    every expected site answered) call :meth:`close_phase`, which returns the messages to send, keyed
    by site id. After the unmasking phase closes, :meth:`result` returns the sum.

    Errors: :meth:`receive` raises RemoteProtocolError for a message that is out of phase, of another
    round, from an unexpected or duplicate sender, or malformed; the message is dropped and the round
    goes on. :meth:`close_phase` raises ThresholdError (and the server aborts for good) when fewer than
    ``threshold`` sites answered, or a secret cannot be reconstructed.
    """

    def __init__(self, config: SecAggConfig, *, prg: MaskPRG | None = None) -> None:
        self.config = config
        self.phase = ServerPhase.COLLECT_KEYS
        self.error: ProtocolError | None = None
        self._prg = prg if prg is not None else MaskPRG(config.vector_length, config.bits)
        self._dtype = np.uint32 if config.bits == 32 else np.uint64
        self._expected: frozenset[int] = frozenset(config.site_ids)
        self._got: dict[int, object] = {}
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._routes: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        self.u1: frozenset[int] = frozenset()
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()
        self.u4: frozenset[int] = frozenset()
        self.u5: frozenset[int] = frozenset()
        self._sum: np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]] = np.zeros(
            config.vector_length, dtype=self._dtype
        )
        self._signatures: dict[int, bytes] = {}
        self._result: np.ndarray | None = None

    @property
    def dropped(self) -> frozenset[int]:
        """Sites that completed key sharing but whose masked input never arrived (U2 minus U3)."""
        return self.u2 - self.u3

    @property
    def expected(self) -> frozenset[int]:
        """The sites from which a message is still expected in the current phase."""
        return self._expected - frozenset(self._got)

    def receive(self, message: ClientMessage) -> None:
        """Accept one site message for the current phase (see the class docstring for errors)."""
        if self.phase in (ServerPhase.DONE, ServerPhase.ABORTED):
            raise RemoteProtocolError(f"round is {self.phase.value}; message refused")
        accepted, check_name, _ = _PHASES[self.phase]
        sender = getattr(message, "sender", None)
        if not isinstance(message, accepted):
            raise RemoteProtocolError(
                f"{type(message).__name__} from site {sender} is not allowed in phase "
                f"{self.phase.value}"
            )
        if message.round_id != self.config.round_id:
            raise RemoteProtocolError(f"message from site {sender} is for round {message.round_id}")
        if sender not in self._expected:
            raise RemoteProtocolError(f"site {sender} is not expected in phase {self.phase.value}")
        if sender in self._got:
            raise RemoteProtocolError(f"duplicate {type(message).__name__} from site {sender}")
        getattr(self, check_name)(message)
        self._got[sender] = message

    def close_phase(self) -> dict[int, ServerMessage]:
        """End the current phase and produce the next phase's messages (see class docstring)."""
        if self.phase in (ServerPhase.DONE, ServerPhase.ABORTED):
            raise LocalProtocolError(f"round is {self.phase.value}")
        arrived = frozenset(self._got)
        if len(arrived) < self.config.threshold:
            self._abort(
                ThresholdError(
                    f"phase {self.phase.value}: only {len(arrived)} sites answered, threshold is "
                    f"{self.config.threshold}; round aborted, nothing revealed"
                )
            )
        try:
            out = getattr(self, _PHASES[self.phase][2])(arrived)
        except ProtocolError as exc:
            self._abort(exc)
        self._got = {}
        return out  # type: ignore[no-any-return]

    def result(self) -> np.ndarray:
        """The exact modular sum of the survivors' inputs. Errors: LocalProtocolError if not done."""
        if self._result is None:
            raise LocalProtocolError(f"no result: the round is in phase {self.phase.value}")
        return self._result

    # -- checks on arrival --------------------------------------------------------------------

    def _check_advert(self, m: AdvertiseKeys) -> None:
        if len(m.enc_public) != 32 or len(m.mask_public) != 32:
            raise RemoteProtocolError(f"site {m.sender}: public keys must be 32 bytes")
        if self.config.active and m.signature is None:
            raise RemoteProtocolError(
                f"site {m.sender}: advert must be signed in the active variant"
            )

    def _check_shares(self, m: ShareKeys) -> None:
        # Exactly one ciphertext for every neighbour in U1: a site that skipped a neighbour would
        # mask with it while the neighbour does not mask back, and the sum would be garbage.
        required = self.u1 & self.config.neighbours(m.sender)
        receivers = [r for r, _ in m.ciphertexts]
        if len(set(receivers)) != len(receivers) or set(receivers) != required:
            raise RemoteProtocolError(
                f"site {m.sender}: share ciphertexts must go once to each neighbour in U1"
            )

    def _check_masked(self, m: MaskedInput) -> None:
        v = m.vector
        if v.dtype != self._dtype or v.shape != (self.config.vector_length,):
            raise RemoteProtocolError(
                f"site {m.sender}: masked input must be {np.dtype(self._dtype).name}"
                f"[{self.config.vector_length}], got {v.dtype}{list(v.shape)}"
            )

    def _check_signature(self, m: ConsistencySignature) -> None:
        assert self.config.verify_keys is not None
        try:
            verify(
                self.config.verify_keys[m.sender],
                m.signature,
                consistency_payload(self.config, self.u3),
            )
        except SignatureError as exc:
            raise RemoteProtocolError(f"site {m.sender}: bad consistency signature") from exc

    def _check_unmask(self, m: UnmaskResponse) -> None:
        holders_of = self.config.holders(m.sender)
        owners_s = [o for o, _ in m.self_mask_shares]
        owners_m = [o for o, _ in m.mask_key_shares]
        if set(owners_s) & set(owners_m):
            raise RemoteProtocolError(f"site {m.sender}: both shares sent for one owner")
        if len(set(owners_s)) != len(owners_s) or not set(owners_s) <= self.u3 & holders_of:
            raise RemoteProtocolError(f"site {m.sender}: self-mask shares for non-survivors")
        if len(set(owners_m)) != len(owners_m) or not set(owners_m) <= self.dropped & holders_of:
            raise RemoteProtocolError(f"site {m.sender}: mask-key shares for non-dropped sites")

    # -- phase closings -----------------------------------------------------------------------

    def _abort(self, exc: ProtocolError) -> NoReturn:
        self.phase = ServerPhase.ABORTED
        self.error = exc
        self._sum.fill(0)
        self._got = {}
        raise exc

    def _close_keys(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u1 = arrived
        self._adverts = {s: m for s, m in self._got.items() if isinstance(m, AdvertiseKeys)}
        out: dict[int, ServerMessage] = {}
        for site in arrived:
            visible = sorted(self.config.holders(site) & arrived)
            out[site] = KeyRoster(self.config.round_id, tuple(self._adverts[v] for v in visible))
        self._expected = arrived
        self.phase = ServerPhase.COLLECT_SHARES
        return out

    def _close_shares(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u2 = arrived
        routes: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        for sender in sorted(arrived):
            message = self._got[sender]
            assert isinstance(message, ShareKeys)
            for receiver, sealed in message.ciphertexts:
                if receiver in arrived:
                    routes[receiver].append((sender, sealed))
        out: dict[int, ServerMessage] = {
            site: ShareDelivery(self.config.round_id, tuple(routes[site])) for site in arrived
        }
        self._expected = arrived
        self.phase = ServerPhase.COLLECT_MASKED
        return out

    def _close_masked(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u3 = arrived
        for site in sorted(arrived):
            message = self._got[site]
            assert isinstance(message, MaskedInput)
            np.add(self._sum, message.vector, out=self._sum)
        self._expected = arrived
        rid = self.config.round_id
        if self.config.active:
            self.phase = ServerPhase.COLLECT_SIGNATURES
            return {site: ConsistencyRequest(rid, arrived) for site in arrived}
        self.phase = ServerPhase.COLLECT_UNMASK
        return {site: UnmaskRequest(rid, arrived, self.dropped) for site in arrived}

    def _close_signatures(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u4 = arrived
        signatures = tuple(
            (site, self._got[site].signature)  # type: ignore[attr-defined]
            for site in sorted(arrived)
        )
        self._expected = arrived
        self.phase = ServerPhase.COLLECT_UNMASK
        rid = self.config.round_id
        return {site: UnmaskRequest(rid, self.u3, self.dropped, signatures) for site in arrived}

    def _close_unmask(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u5 = arrived
        cfg = self.config
        seed_shares: dict[int, list[Share]] = defaultdict(list)
        key_shares: dict[int, list[Share]] = defaultdict(list)
        for site in sorted(arrived):
            message = self._got[site]
            assert isinstance(message, UnmaskResponse)
            for owner, raw in message.self_mask_shares:
                seed_shares[owner].append(self._parse_share(raw, site, owner))
            for owner, raw in message.mask_key_shares:
                key_shares[owner].append(self._parse_share(raw, site, owner))
        # Check every count before reconstructing anything, so that an abort reconstructs nothing.
        for owners, shares, what in (
            (self.u3, seed_shares, "self-mask seed"),
            (self.dropped, key_shares, "mask key"),
        ):
            for owner in sorted(owners):
                if len({s.x for s in shares[owner]}) < cfg.threshold:
                    raise ThresholdError(
                        f"only {len(shares[owner])} shares of the {what} of site {owner} arrived, "
                        f"threshold is {cfg.threshold}; round aborted, nothing reconstructed"
                    )
        total = self._sum
        for owner in sorted(self.u3):
            seed = self._reconstruct(seed_shares[owner], owner, "self-mask seed")
            self._prg.add_into(total, seed, -1)
        mask_context = cfg.context("pairwise-mask")
        for owner in sorted(self.dropped):
            secret = self._reconstruct(key_shares[owner], owner, "mask key")
            key = X25519KeyPair.from_private_bytes(secret)
            if key.public_bytes != self._adverts[owner].mask_public:
                raise RemoteProtocolError(
                    f"reconstructed mask key of site {owner} does not match its advertised key"
                )
            for peer in sorted(self.u3 & cfg.neighbours(owner)):
                seed = agree_key(key, self._adverts[peer].mask_public, context=mask_context)
                # The survivor added sign(peer > owner) * PRG(seed); remove it.
                self._prg.add_into(total, seed, -1 if peer > owner else 1)
        self._result = total
        self.phase = ServerPhase.DONE
        return {}

    def _parse_share(self, raw: bytes, holder: int, owner: int) -> Share:
        try:
            share = Share.from_bytes(raw)
        except InconsistentSharesError as exc:
            raise RemoteProtocolError(f"site {holder}: malformed share of site {owner}") from exc
        if share.x != holder:
            raise RemoteProtocolError(f"site {holder} sent a share evaluated at x={share.x}")
        return share

    def _reconstruct(self, shares: Iterable[Share], owner: int, what: str) -> bytes:
        shares = list(shares)
        try:
            return combine(shares, threshold=self.config.threshold)
        except InsufficientSharesError as exc:
            raise ThresholdError(
                f"only {len(shares)} shares of the {what} of site {owner} arrived, threshold is "
                f"{self.config.threshold}; round aborted"
            ) from exc
        except InconsistentSharesError as exc:
            raise RemoteProtocolError(
                f"shares of the {what} of site {owner} are inconsistent"
            ) from exc
