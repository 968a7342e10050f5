"""The server's side of SecAgg / SecAgg+ as a sans-IO state machine.

The server routes messages between sites, accumulates the masked inputs and, in the last phase,
removes the masks: it reconstructs each survivor's self-mask seed and each dropped site's mask key
from ``threshold`` Shamir shares and regenerates the corresponding PRG outputs.

Guarantee: :meth:`SecAggServer.result` is the exact sum modulo ``2**bits`` of the inputs of the sites
whose masked input arrived (U3), provided at least ``threshold`` holders of every needed secret
reveal a share that matches its owner's commitment. A holder that reveals a wrong share is caught,
its shares are ignored and it is listed in :attr:`SecAggServer.excluded`; one malicious site can
therefore neither abort nor silently corrupt the sum through its shares. Otherwise the round aborts
with :class:`ThresholdError` and the server holds only masked vectors and fewer than ``threshold``
shares of any secret, which reveal nothing about any single input.

This module stays whole (a little under 500 lines): it is one class, the server's side of one
protocol, whose per-phase checks and phase closings read as one state machine.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from enum import Enum
from typing import Any, NoReturn

import numpy as np

from secure_fl.crypto import MaskPRG, Share, X25519KeyPair, agree_key, combine, verify
from secure_fl.crypto.prg import sum_into
from secure_fl.errors import (
    CryptoError,
    InconsistentSharesError,
    InsufficientSharesError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SignatureError,
    ThresholdError,
)
from secure_fl.secagg import commit
from secure_fl.secagg.client import advert_payload, consistency_payload
from secure_fl.secagg.config import SecAggConfig
from secure_fl.secagg.graph import consistency_quorum, derive_graph
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    RevealNonce,
    RevealSet,
    ServerMessage,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)


class ServerPhase(Enum):
    COLLECT_KEYS = "collect-keys"
    COLLECT_REVEALS = "collect-reveals"
    COLLECT_SHARES = "collect-shares"
    COLLECT_MASKED = "collect-masked"
    COLLECT_SIGNATURES = "collect-signatures"
    COLLECT_UNMASK = "collect-unmask"
    DONE = "done"
    ABORTED = "aborted"


# The one table of phases: phase -> (message type accepted, arrival check, closing handler).
# Each closing handler sets the next phase: after COLLECT_KEYS it is COLLECT_REVEALS for a sparse
# graph and COLLECT_SHARES otherwise; after COLLECT_MASKED it is COLLECT_SIGNATURES in the active
# variant and COLLECT_UNMASK otherwise.
_PHASES: dict[ServerPhase, tuple[type, str, str]] = {
    ServerPhase.COLLECT_KEYS: (AdvertiseKeys, "_check_advert", "_close_keys"),
    ServerPhase.COLLECT_REVEALS: (RevealNonce, "_check_reveal", "_close_reveals"),
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
    ``threshold`` sites answered, when half the round or fewer signed the survivor set (no site
    would accept it, see :func:`~secure_fl.secagg.graph.consistency_quorum`), or a secret cannot be
    reconstructed from verified shares; and
    RemoteProtocolError when a site of U1 did not reveal its graph nonce (the reveal set is not the
    server's to choose, so the round aborts).
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
        self.graph_seed = b""
        self.graph: dict[int, frozenset[int]] | None = None
        # owner -> holder -> (mask-key commitment, self-seed commitment), from the owner's ShareKeys.
        self._commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        # routes[receiver] = senders whose shares it was given (its view of U2, minus itself).
        self._delivered: dict[int, frozenset[int]] = {}
        #: Holders whose revealed share did not match its owner's commitment; their shares are ignored.
        self.excluded: frozenset[int] = frozenset()
        #: Holder -> owners whose share it reported as failing the owner's commitment on receipt.
        self.rejections: dict[int, tuple[int, ...]] = {}

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
        cfg = self.config
        if len(m.enc_public) != 32 or len(m.mask_public) != 32:
            raise RemoteProtocolError(f"site {m.sender}: public keys must be 32 bytes")
        if m.enc_public == m.mask_public:
            raise RemoteProtocolError(f"site {m.sender}: the two public keys must differ")
        probe = X25519KeyPair.generate()
        for name, key in (("enc_public", m.enc_public), ("mask_public", m.mask_public)):
            try:
                probe.exchange(key)  # refuses low-order points (all-zero shared secret)
            except CryptoError as exc:
                raise RemoteProtocolError(
                    f"site {m.sender}: {name} is not a valid X25519 public key: {exc}"
                ) from exc
        expected = commit.COMMITMENT_SIZE if cfg.sparse else 0
        if len(m.graph_commitment) != expected:
            raise RemoteProtocolError(
                f"site {m.sender}: graph_commitment must be {expected} bytes, got "
                f"{len(m.graph_commitment)}"
            )
        if cfg.active:
            if m.signature is None or cfg.verify_keys is None:
                raise RemoteProtocolError(
                    f"site {m.sender}: advert must be signed in the active variant"
                )
            payload = advert_payload(cfg, m.sender, m.enc_public, m.mask_public, m.graph_commitment)
            try:
                verify(cfg.verify_keys[m.sender], m.signature, payload)
            except SignatureError as exc:
                raise RemoteProtocolError(f"site {m.sender}: bad advert signature") from exc

    def _check_reveal(self, m: RevealNonce) -> None:
        expected = self._adverts[m.sender].graph_commitment
        computed = commit.graph_commitment(self.config.context("graph-commit"), m.sender, m.nonce)
        if len(m.nonce) != commit.NONCE_SIZE or not commit.matches(expected, computed):
            raise RemoteProtocolError(
                f"site {m.sender}: revealed nonce does not match its graph commitment"
            )

    def _neighbours(self, site: int) -> frozenset[int]:
        if self.graph is None:
            raise LocalProtocolError("the masking graph is not known yet")
        return self.graph[site]

    def _check_shares(self, m: ShareKeys) -> None:
        # Exactly one ciphertext for every neighbour in U1: a site that skipped a neighbour would
        # mask with it while the neighbour does not mask back, and the sum would be garbage.
        required = self.u1 & self._neighbours(m.sender)
        receivers = [r for r, _ in m.ciphertexts]
        if len(set(receivers)) != len(receivers) or set(receivers) != required:
            raise RemoteProtocolError(
                f"site {m.sender}: share ciphertexts must go once to each neighbour in U1"
            )
        holders = [h for h, _, _ in m.commitments]
        if len(set(holders)) != len(holders) or set(holders) != required | {m.sender}:
            raise RemoteProtocolError(
                f"site {m.sender}: share commitments must name each holder (the neighbours in U1 "
                "and the site itself) once"
            )
        for holder, mcommit, scommit in m.commitments:
            if len(mcommit) != commit.COMMITMENT_SIZE or len(scommit) != commit.COMMITMENT_SIZE:
                raise RemoteProtocolError(
                    f"site {m.sender}: share commitment for {holder} must be 2 x 32 bytes"
                )

    def _check_masked(self, m: MaskedInput) -> None:
        v = m.vector
        if v.dtype != self._dtype or v.shape != (self.config.vector_length,):
            raise RemoteProtocolError(
                f"site {m.sender}: masked input must be {np.dtype(self._dtype).name}"
                f"[{self.config.vector_length}], got {v.dtype}{list(v.shape)}"
            )

    def _check_signature(self, m: ConsistencySignature) -> None:
        if self.config.verify_keys is None:
            raise LocalProtocolError("verify_keys missing in the active variant")
        try:
            verify(
                self.config.verify_keys[m.sender],
                m.signature,
                consistency_payload(self.config, self.u3, self.graph_seed),
            )
        except SignatureError as exc:
            raise RemoteProtocolError(f"site {m.sender}: bad consistency signature") from exc

    def _check_unmask(self, m: UnmaskResponse) -> None:
        holders_of = self._neighbours(m.sender) | {m.sender}
        owners_s = [o for o, _, _ in m.self_mask_shares]
        owners_m = [o for o, _, _ in m.mask_key_shares]
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
        cfg = self.config
        self.u1 = arrived
        self._adverts = {s: m for s, m in self._got.items() if isinstance(m, AdvertiseKeys)}
        roster = KeyRoster(cfg.round_id, tuple(self._adverts[v] for v in sorted(arrived)))
        self._expected = arrived
        if cfg.sparse:
            self.phase = ServerPhase.COLLECT_REVEALS
        else:
            self.graph = derive_graph(cfg.site_ids, cfg.degree, b"")
            self.phase = ServerPhase.COLLECT_SHARES
        return dict.fromkeys(arrived, roster)

    def _close_reveals(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        cfg = self.config
        missing = self.u1 - arrived
        if missing:
            raise RemoteProtocolError(
                f"sites {sorted(missing)} committed to a graph nonce but did not reveal it; the "
                "round aborts (the reveal set may not be chosen by the server)"
            )
        reveals = {s: m.nonce for s, m in self._got.items() if isinstance(m, RevealNonce)}
        self.graph_seed = commit.graph_seed(cfg.context("graph-seed"), reveals)
        self.graph = derive_graph(cfg.site_ids, cfg.degree, self.graph_seed)
        message = RevealSet(cfg.round_id, tuple(sorted(reveals.items())))
        self._expected = arrived
        self.phase = ServerPhase.COLLECT_SHARES
        return dict.fromkeys(arrived, message)

    def _close_shares(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u2 = arrived
        routes: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        forwarded: dict[int, list[tuple[int, bytes, bytes]]] = defaultdict(list)
        for sender in sorted(arrived):
            message = self._got[sender]
            if not isinstance(message, ShareKeys):
                raise LocalProtocolError("internal: a non-ShareKeys message was collected")
            self._commitments[sender] = {h: (m, s) for h, m, s in message.commitments}
            for receiver, sealed in message.ciphertexts:
                if receiver in arrived:
                    routes[receiver].append((sender, sealed))
                    forwarded[receiver].append((sender, *self._commitments[sender][receiver]))
        self._delivered = {site: frozenset(s for s, _ in routes[site]) for site in arrived}
        out: dict[int, ServerMessage] = {
            site: ShareDelivery(self.config.round_id, tuple(routes[site]), tuple(forwarded[site]))
            for site in arrived
        }
        self._expected = arrived
        self.phase = ServerPhase.COLLECT_MASKED
        return out

    def _close_masked(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        self.u3 = arrived
        vectors = []
        for site in sorted(arrived):
            message = self._got[site]
            if not isinstance(message, MaskedInput):
                raise LocalProtocolError("internal: a non-MaskedInput message was collected")
            vectors.append(message.vector)
        sum_into(self._sum, vectors)  # one chunked, multi-threaded pass over all inputs
        self._expected = arrived
        rid = self.config.round_id
        if self.config.active:
            self.phase = ServerPhase.COLLECT_SIGNATURES
            return {site: ConsistencyRequest(rid, arrived) for site in arrived}
        self.phase = ServerPhase.COLLECT_UNMASK
        return {site: UnmaskRequest(rid, arrived, self.dropped) for site in arrived}

    def _close_signatures(self, arrived: frozenset[int]) -> dict[int, ServerMessage]:
        # Every site reveals shares only for a survivor set signed by more than (n + c) / 2 sites
        # of the round (c >= 0 its own assumption), so with half or fewer no site would answer:
        # abort now. Otherwise every signature received is forwarded to every signer.
        quorum = consistency_quorum(len(self.config.site_ids), 0.0)
        if len(arrived) < quorum:
            raise ThresholdError(
                f"phase {self.phase.value}: only {len(arrived)} of {len(self.config.site_ids)} "
                f"sites signed the survivor set; every site needs at least {quorum} (more than "
                "half the round); round aborted, nothing revealed"
            )
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
        commit_context = cfg.context("share-commit")
        collected: list[tuple[int, int, bytes, Share, bytes, bytes]] = []
        excluded: set[int] = set()
        for site in sorted(arrived):
            message = self._got[site]
            if not isinstance(message, UnmaskResponse):
                raise LocalProtocolError("internal: a non-UnmaskResponse message was collected")
            if message.rejected:
                self.rejections[site] = tuple(message.rejected)
            for kind, entries in (
                (commit.SELF_SEED, message.self_mask_shares),
                (commit.MASK_KEY, message.mask_key_shares),
            ):
                for owner, raw, salt in entries:
                    mcommit, scommit = self._commitments[owner][site]
                    expected = scommit if kind == commit.SELF_SEED else mcommit
                    computed = commit.share_commitment(commit_context, kind, owner, site, salt, raw)
                    if len(salt) != commit.SALT_SIZE or not commit.matches(expected, computed):
                        excluded.add(site)
                        continue
                    share = self._parse_share(raw, site, owner)
                    collected.append((site, owner, kind, share, raw, salt))
        # A holder caught revealing one wrong share is not trusted for any other.
        self.excluded = frozenset(excluded)
        seed_shares: dict[int, list[Share]] = defaultdict(list)
        key_shares: dict[int, list[Share]] = defaultdict(list)
        for site, owner, kind, share, _, _ in collected:
            if site in excluded:
                continue
            (seed_shares if kind == commit.SELF_SEED else key_shares)[owner].append(share)
        # Check every count before reconstructing anything, so that an abort reconstructs nothing.
        for owners, shares, what in (
            (self.u3, seed_shares, "self-mask seed"),
            (self.dropped, key_shares, "mask key"),
        ):
            for owner in sorted(owners):
                if len({s.x for s in shares[owner]}) < cfg.threshold:
                    raise ThresholdError(
                        f"only {len(shares[owner])} verified shares of the {what} of site {owner} "
                        f"arrived, threshold is {cfg.threshold}; round aborted, nothing "
                        "reconstructed"
                        + (f" (excluded holders: {sorted(excluded)})" if excluded else "")
                    )
        # Every mask to remove is collected first and removed in one chunked, multi-threaded pass.
        terms: list[tuple[bytes, int]] = []
        for owner in sorted(self.u3):
            seed = self._reconstruct(seed_shares[owner], owner, "self-mask seed")
            terms.append((seed, -1))
        mask_context = cfg.context("pairwise-mask")
        for owner in sorted(self.dropped):
            secret = self._reconstruct(key_shares[owner], owner, "mask key")
            key = X25519KeyPair.from_private_bytes(secret)
            if key.public_bytes != self._adverts[owner].mask_public:
                raise RemoteProtocolError(
                    f"reconstructed mask key of site {owner} does not match its advertised key"
                )
            for peer in sorted(self.u3 & self._neighbours(owner)):
                if owner not in self._delivered.get(peer, frozenset()):
                    continue  # the peer never got the owner's shares, so it did not mask with it
                seed = agree_key(key, self._adverts[peer].mask_public, context=mask_context)
                # The survivor added sign(peer > owner) * PRG(seed); remove it.
                terms.append((seed, -1 if peer > owner else 1))
        total = self._sum
        self._prg.add_many_into(total, terms)
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
