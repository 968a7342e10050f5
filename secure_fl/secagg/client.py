"""The site's side of SecAgg / SecAgg+ as a sans-IO state machine.

The client consumes server messages and returns its replies; it never touches a socket, a clock or a
file, so the same object runs in the in-process harness, behind gRPC and inside other frameworks.

Guarantee (against a server that may deviate arbitrarily, colluding with at most the corrupt
fraction of sites its :class:`SitePolicy` assumes, in the active variant): the server learns the
site's input only inside the sum of at least ``threshold`` sites. The client checks every request
against its *own view* (Bonawitz et al. 2017, rounds 3-4): it never reveals both the self-mask share
and the mask-key share of one peer, answers only survivor/dropped sets consistent with the peers
that actually shared keys with it, refuses a threshold below its policy's minimum, recomputes the
SecAgg+ graph itself from the sites' revealed nonces, and after any failure (including a
cryptographic one) stays in a permanent error state with its secrets dropped.

This module stays whole (over 600 lines): it is one class, one protocol, whose own-view checks
guard each other across phases; split apart, a reader could no longer audit them in one place.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from enum import Enum
from typing import Any, NoReturn

import numpy as np

from secure_fl.crypto import (
    SHARE_SIZE,
    MaskPRG,
    Share,
    ShareAD,
    SigningKey,
    X25519KeyPair,
    agree_key,
    open_sealed,
    seal,
    split,
    verify,
)
from secure_fl.crypto.hygiene import NoPickle
from secure_fl.errors import (
    DecryptionError,
    InconsistentSharesError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SecureFLError,
    SignatureError,
    ThresholdError,
)
from secure_fl.secagg import commit
from secure_fl.secagg.config import PROTOCOL_VERSION, SecAggConfig
from secure_fl.secagg.graph import derive_graph
from secure_fl.secagg.messages import (
    AdvertiseKeys,
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
from secure_fl.secagg.policy import SitePolicy

RandomBytes = Callable[[int], bytes]
_PLAIN = struct.Struct(">II")
_PLAIN_SIZE = _PLAIN.size + 2 * SHARE_SIZE + 2 * commit.SALT_SIZE


class ClientPhase(Enum):
    INIT = "init"
    ADVERTISED = "advertised"
    REVEALED = "revealed"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ERROR = "error"


# The one table of legal transitions: (phase, incoming message type) -> (handler, next phase).
# Anything not in the table is a protocol violation. A KeyRoster is followed by the reveal phase
# only for a sparse graph; ``_on_roster`` then moves to REVEALED instead of SHARED.
_TRANSITIONS: dict[tuple[ClientPhase, type], tuple[str, ClientPhase]] = {
    (ClientPhase.ADVERTISED, KeyRoster): ("_on_roster", ClientPhase.SHARED),
    (ClientPhase.REVEALED, RevealSet): ("_on_reveals", ClientPhase.SHARED),
    (ClientPhase.SHARED, ShareDelivery): ("_on_shares", ClientPhase.MASKED),
    (ClientPhase.MASKED, ConsistencyRequest): ("_on_consistency", ClientPhase.SIGNED),
    (ClientPhase.MASKED, UnmaskRequest): ("_on_unmask", ClientPhase.DONE),
    (ClientPhase.SIGNED, UnmaskRequest): ("_on_unmask", ClientPhase.DONE),
}


def advert_payload(
    config: SecAggConfig,
    sender: int,
    enc_public: bytes,
    mask_public: bytes,
    graph_commitment: bytes = b"",
) -> bytes:
    """The bytes a site signs to bind its public keys and graph commitment to itself and the round."""
    return (
        config.context("advertise")
        + struct.pack(">I", sender)
        + enc_public
        + mask_public
        + struct.pack(">I", len(graph_commitment))
        + graph_commitment
    )


def consistency_payload(
    config: SecAggConfig, survivors: frozenset[int], graph_seed: bytes = b""
) -> bytes:
    """The bytes a site signs in the consistency check: the round, the graph seed it derived (empty
    for a complete graph) and the sorted survivor set. A server that showed different sites
    different reveal sets gets signatures over different seeds, which no other site accepts."""
    ids = sorted(survivors)
    return (
        config.context("consistency")
        + struct.pack(">I", len(graph_seed))
        + graph_seed
        + struct.pack(f">{len(ids)}I", *ids)
    )


def share_ad(config: SecAggConfig, sender: int, receiver: int) -> ShareAD:
    """Associated data binding a share ciphertext to protocol, round, sender and receiver."""
    return ShareAD(
        protocol=f"{PROTOCOL_VERSION}|{config.protocol}",
        round_id=config.round_id,
        sender=sender,
        receiver=receiver,
    )


class SecAggClient(NoPickle):
    """One site in one round.

    ``input_vector`` is the site's encoded input (unsigned integers of ``config.bits`` bits, length
    ``config.vector_length``); it may be supplied later with :meth:`set_input`, any time before the
    masked-input phase. ``signing_key`` is required in the active variant. ``policy`` is what this
    site accepts (default :class:`SitePolicy`: active variant only, threshold at least
    :func:`~secure_fl.secagg.graph.minimum_threshold` with no corrupt sites assumed); the semi-honest
    variant needs ``SitePolicy(require_active=False)``. ``randbytes`` supplies all randomness of
    this party (OS CSPRNG by default; a deterministic source only in tests).

    Errors: the constructor raises PolicyError when the configuration breaks ``policy`` and
    LocalProtocolError on a bad site id or missing signing key. Every handler raises a
    :class:`ProtocolError` subclass on any failure (a non-protocol error is wrapped in a
    RemoteProtocolError) and leaves the client in :attr:`ClientPhase.ERROR` with its secrets
    dropped, where it refuses everything.
    """

    _no_pickle_message = "SecAggClient holds secret keys and cannot be pickled or copied"

    def __init__(
        self,
        site_id: int,
        config: SecAggConfig,
        *,
        policy: SitePolicy | None = None,
        input_vector: np.ndarray | None = None,
        signing_key: SigningKey | None = None,
        randbytes: RandomBytes | None = None,
        prg: MaskPRG | None = None,
    ) -> None:
        if site_id not in config.site_ids:
            raise LocalProtocolError(f"site_id {site_id} is not on the round's roster")
        if config.active and signing_key is None:
            raise LocalProtocolError("signing_key is required in the active variant")
        self.policy = policy if policy is not None else SitePolicy()
        self.policy.check(config)
        self.site_id = site_id
        self.config = config
        self.phase = ClientPhase.INIT
        self.error: ProtocolError | None = None
        self.graph_seed = b""
        self.graph: dict[int, frozenset[int]] | None = None
        self._rand: RandomBytes = randbytes if randbytes is not None else os.urandom
        self._signing_key = signing_key
        self._prg = prg if prg is not None else MaskPRG(config.vector_length, config.bits)
        self._input: np.ndarray | None = None
        if input_vector is not None:
            self.set_input(input_vector)
        self._enc_key: X25519KeyPair | None = None
        self._mask_key: X25519KeyPair | None = None
        self._self_seed: bytes | None = None
        self._nonce: bytes | None = None
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] | None = None
        # Shares this site holds: owner -> (mask-key share, its salt, self-seed share, its salt).
        self._held: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}
        # Owners whose share failed its commitment on receipt: their shares are never revealed.
        self._rejected: set[int] = set()

    def __repr__(self) -> str:
        return f"SecAggClient(site_id={self.site_id}, phase={self.phase.value})"

    # -- public API ---------------------------------------------------------------------------

    def set_input(self, vector: np.ndarray) -> None:
        """Supply the encoded input. Errors: LocalProtocolError on wrong dtype, length or phase."""
        if self.phase not in (
            ClientPhase.INIT,
            ClientPhase.ADVERTISED,
            ClientPhase.REVEALED,
            ClientPhase.SHARED,
        ):
            raise LocalProtocolError(f"input can no longer be set in phase {self.phase.value}")
        dtype = np.uint32 if self.config.bits == 32 else np.uint64
        if not isinstance(vector, np.ndarray) or vector.dtype != dtype or vector.ndim != 1:
            raise LocalProtocolError(
                f"input_vector must be a 1-D numpy array of dtype {np.dtype(dtype).name}"
            )
        if vector.shape[0] != self.config.vector_length:
            raise LocalProtocolError(
                f"input_vector has length {vector.shape[0]}, expected {self.config.vector_length}"
            )
        self._input = vector

    def start(self) -> AdvertiseKeys:
        """Phase 0: generate two fresh key pairs (and, for a sparse graph, a graph nonce) and
        advertise the public keys and the nonce's commitment."""
        if self.phase is not ClientPhase.INIT:
            return self._fail(LocalProtocolError(f"start() called in phase {self.phase.value}"))
        try:
            cfg = self.config
            self._enc_key = X25519KeyPair.generate(self._rand)
            self._mask_key = X25519KeyPair.generate(self._rand)
            enc_pub, mask_pub = self._enc_key.public_bytes, self._mask_key.public_bytes
            graph_commitment = b""
            if cfg.sparse:
                self._nonce = self._rand(commit.NONCE_SIZE)
                graph_commitment = commit.graph_commitment(
                    cfg.context("graph-commit"), self.site_id, self._nonce
                )
            signature = None
            if self._signing_key is not None and cfg.active:
                payload = advert_payload(cfg, self.site_id, enc_pub, mask_pub, graph_commitment)
                signature = self._signing_key.sign(payload)
        except SecureFLError as exc:
            return self._fail(LocalProtocolError(f"site {self.site_id}: start failed: {exc}"))
        self.phase = ClientPhase.ADVERTISED
        advert = AdvertiseKeys(
            cfg.round_id, self.site_id, enc_pub, mask_pub, signature, graph_commitment
        )
        self._adverts[self.site_id] = advert
        return advert

    def handle(self, message: ServerMessage) -> Any:
        """Consume one server message and return this site's reply.

        Errors: RemoteProtocolError for a message of the wrong round or phase or one that fails a
        check (any other failure inside a handler, e.g. a CryptoError on a low-order key, is
        wrapped in one); ThresholdError when fewer than ``threshold`` parties remain;
        LocalProtocolError when the client is already in the error state. Every error is permanent
        and drops the client's secrets.
        """
        if self.phase is ClientPhase.ERROR:
            raise LocalProtocolError(f"site {self.site_id} is in the error state: {self.error}")
        entry = _TRANSITIONS.get((self.phase, type(message)))
        if entry is None:
            return self._fail(
                RemoteProtocolError(
                    f"site {self.site_id}: {type(message).__name__} is not allowed in phase "
                    f"{self.phase.value}"
                )
            )
        if message.round_id != self.config.round_id:
            return self._fail(
                RemoteProtocolError(
                    f"site {self.site_id}: message for round {message.round_id}, this is round "
                    f"{self.config.round_id}"
                )
            )
        handler, next_phase = entry
        try:
            reply = getattr(self, handler)(message)
        except ProtocolError as exc:
            return self._fail(exc)
        except Exception as exc:  # every failure must reach the error state
            wrapped = RemoteProtocolError(
                f"site {self.site_id}: {type(message).__name__} could not be processed: "
                f"{type(exc).__name__}: {exc}"
            )
            wrapped.__cause__ = exc
            return self._fail(wrapped)
        if isinstance(reply, RevealNonce):
            next_phase = ClientPhase.REVEALED
        self.phase = next_phase
        return reply

    # -- helpers ------------------------------------------------------------------------------

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self.phase = ClientPhase.ERROR
        self.error = exc
        # Secrets are dropped at once: nothing more can be derived from this client.
        self._held.clear()
        self._self_seed = None
        self._enc_key = None
        self._mask_key = None
        self._nonce = None
        self._input = None
        raise exc

    def _need(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise ThresholdError(
                f"site {self.site_id}: only {count} {what}, threshold is {self.config.threshold}; "
                "aborting the round"
            )

    def _neighbours(self) -> frozenset[int]:
        if self.graph is None:
            raise LocalProtocolError("the masking graph is not known yet")
        return self.graph[self.site_id]

    # -- handlers -----------------------------------------------------------------------------

    def _on_roster(self, roster: KeyRoster) -> ShareKeys | RevealNonce:
        cfg, me = self.config, self.site_id
        roster_ids = frozenset(cfg.site_ids)
        seen: dict[int, AdvertiseKeys] = {}
        keys_seen: set[bytes] = set()
        for advert in roster.adverts:
            if advert.round_id != cfg.round_id:
                raise RemoteProtocolError(f"advert of site {advert.sender} is for another round")
            if advert.sender not in roster_ids or advert.sender in seen:
                raise RemoteProtocolError(f"unexpected or duplicate advert from {advert.sender}")
            if advert.sender == me:
                if advert != self._adverts[me]:
                    raise RemoteProtocolError("the roster altered this site's own advertisement")
            else:
                expected = commit.COMMITMENT_SIZE if cfg.sparse else 0
                if len(advert.graph_commitment) != expected:
                    raise RemoteProtocolError(
                        f"advert of site {advert.sender}: graph_commitment must be {expected} "
                        f"bytes, got {len(advert.graph_commitment)}"
                    )
                if cfg.active:
                    self._verify_advert(advert)
            for key in (advert.enc_public, advert.mask_public):
                if len(key) != 32 or key in keys_seen:
                    raise RemoteProtocolError(f"advert of site {advert.sender}: bad or reused key")
                keys_seen.add(key)
            seen[advert.sender] = advert
        if me not in seen:
            raise RemoteProtocolError("the roster omits this site's own advertisement")
        self._need(len(seen), "sites advertised keys")
        self._adverts = seen
        if cfg.sparse:
            if self._nonce is None:
                raise LocalProtocolError("no graph nonce was drawn")
            return RevealNonce(cfg.round_id, me, self._nonce)
        self.graph = derive_graph(cfg.site_ids, cfg.degree, b"")
        return self._share_keys()

    def _verify_advert(self, advert: AdvertiseKeys) -> None:
        cfg = self.config
        if cfg.verify_keys is None:
            raise LocalProtocolError("verify_keys missing in the active variant")
        if advert.signature is None:
            raise RemoteProtocolError(f"advert of site {advert.sender} is unsigned")
        payload = advert_payload(
            cfg, advert.sender, advert.enc_public, advert.mask_public, advert.graph_commitment
        )
        try:
            verify(cfg.verify_keys[advert.sender], advert.signature, payload)
        except SignatureError as exc:
            raise RemoteProtocolError(f"advert of site {advert.sender}: bad signature") from exc

    def _on_reveals(self, message: RevealSet) -> ShareKeys:
        cfg, me = self.config, self.site_id
        reveals: dict[int, bytes] = {}
        context = cfg.context("graph-commit")
        for site, nonce in message.reveals:
            if site in reveals or site not in self._adverts:
                raise RemoteProtocolError(f"site {me}: unexpected or duplicate reveal of {site}")
            expected = self._adverts[site].graph_commitment
            if len(nonce) != commit.NONCE_SIZE or not commit.matches(
                expected, commit.graph_commitment(context, site, nonce)
            ):
                raise RemoteProtocolError(
                    f"site {me}: the revealed graph nonce of site {site} does not match its "
                    "commitment"
                )
            reveals[site] = nonce
        missing = set(self._adverts) - set(reveals)
        if missing:
            raise RemoteProtocolError(
                f"site {me}: the reveal set omits sites {sorted(missing)} of the key roster; a "
                "server may not choose which nonces make the graph"
            )
        self.graph_seed = commit.graph_seed(cfg.context("graph-seed"), reveals)
        self.graph = derive_graph(cfg.site_ids, cfg.degree, self.graph_seed)
        return self._share_keys()

    def _share_keys(self) -> ShareKeys:
        cfg, me = self.config, self.site_id
        holders = (self._neighbours() | {me}) & frozenset(self._adverts)
        self._need(len(holders), "share holders advertised keys")
        if self._enc_key is None or self._mask_key is None:
            raise LocalProtocolError("keys missing")
        self._adverts = {s: a for s, a in self._adverts.items() if s in holders}
        self._self_seed = self._rand(32)
        xs = sorted(holders)
        mask_shares = split(
            self._mask_key.private_bytes(), threshold=cfg.threshold, xs=xs, randbytes=self._rand
        )
        seed_shares = split(self._self_seed, threshold=cfg.threshold, xs=xs, randbytes=self._rand)
        out: list[tuple[int, bytes]] = []
        commitments: list[tuple[int, bytes, bytes]] = []
        context = cfg.context("share-encryption")
        commit_context = cfg.context("share-commit")
        for mshare, sshare in zip(mask_shares, seed_shares, strict=True):
            receiver = mshare.x
            mbytes, sbytes = mshare.to_bytes(), sshare.to_bytes()
            msalt, ssalt = self._rand(commit.SALT_SIZE), self._rand(commit.SALT_SIZE)
            commitments.append(
                (
                    receiver,
                    commit.share_commitment(
                        commit_context, commit.MASK_KEY, me, receiver, msalt, mbytes
                    ),
                    commit.share_commitment(
                        commit_context, commit.SELF_SEED, me, receiver, ssalt, sbytes
                    ),
                )
            )
            if receiver == me:
                self._held[me] = (mbytes, msalt, sbytes, ssalt)
                continue
            key = agree_key(self._enc_key, self._adverts[receiver].enc_public, context=context)
            plaintext = _PLAIN.pack(me, receiver) + mbytes + sbytes + msalt + ssalt
            out.append((receiver, seal(key, plaintext, share_ad(cfg, me, receiver))))
        return ShareKeys(cfg.round_id, me, tuple(out), tuple(commitments))

    def _on_shares(self, delivery: ShareDelivery) -> MaskedInput:
        cfg, me = self.config, self.site_id
        if self._input is None:
            raise LocalProtocolError(f"site {me}: no input was set before the masked-input phase")
        if self._enc_key is None or self._mask_key is None or self._self_seed is None:
            raise LocalProtocolError("keys missing")
        commitments: dict[int, tuple[bytes, bytes]] = {}
        for owner, mcommit, scommit in delivery.commitments:
            if owner in commitments:
                raise RemoteProtocolError(f"site {me}: duplicate share commitment of {owner}")
            commitments[owner] = (mcommit, scommit)
        context = cfg.context("share-encryption")
        commit_context = cfg.context("share-commit")
        neighbours = self._neighbours()
        received: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}
        for sender, sealed in delivery.ciphertexts:
            if sender not in neighbours or sender not in self._adverts or sender in received:
                raise RemoteProtocolError(f"site {me}: unexpected or duplicate share from {sender}")
            if sender not in commitments:
                raise RemoteProtocolError(f"site {me}: no share commitment for site {sender}")
            key = agree_key(self._enc_key, self._adverts[sender].enc_public, context=context)
            try:
                plaintext = open_sealed(key, sealed, share_ad(cfg, sender, me))
            except DecryptionError as exc:
                raise RemoteProtocolError(
                    f"site {me}: the share from site {sender} failed authentication "
                    "(tampered, replayed from another round, or redirected)"
                ) from exc
            if len(plaintext) != _PLAIN_SIZE or _PLAIN.unpack_from(plaintext) != (sender, me):
                raise RemoteProtocolError(f"site {me}: share from {sender} names other parties")
            offset = _PLAIN.size
            mshare = plaintext[offset : offset + SHARE_SIZE]
            sshare = plaintext[offset + SHARE_SIZE : offset + 2 * SHARE_SIZE]
            msalt = plaintext[offset + 2 * SHARE_SIZE : offset + 2 * SHARE_SIZE + commit.SALT_SIZE]
            ssalt = plaintext[offset + 2 * SHARE_SIZE + commit.SALT_SIZE :]
            try:
                ok = Share.from_bytes(mshare).x == me and Share.from_bytes(sshare).x == me
            except InconsistentSharesError:
                ok = False
            mcommit, scommit = commitments[sender]
            good = (
                ok
                and commit.matches(
                    mcommit,
                    commit.share_commitment(
                        commit_context, commit.MASK_KEY, sender, me, msalt, mshare
                    ),
                )
                and commit.matches(
                    scommit,
                    commit.share_commitment(
                        commit_context, commit.SELF_SEED, sender, me, ssalt, sshare
                    ),
                )
            )
            if not good:
                # The key exchange is authentic, so the pairwise mask still cancels; only this
                # owner's shares are unusable and are never revealed.
                self._rejected.add(sender)
            received[sender] = (mshare, msalt, sshare, ssalt)
        u2 = frozenset(received) | {me}
        self._need(len(u2), "share holders completed the key sharing")
        self._held.update(received)
        self._u2 = u2
        # masked = input + PRG(self seed) + sum over peers of sign(me - peer) * PRG(pair seed),
        # generated and added in one chunked, multi-threaded pass (MaskPRG.add_many_into).
        terms: list[tuple[bytes, int]] = [(self._self_seed, 1)]
        mask_context = cfg.context("pairwise-mask")
        for peer in sorted(u2 & neighbours):
            seed = agree_key(self._mask_key, self._adverts[peer].mask_public, context=mask_context)
            terms.append((seed, 1 if me > peer else -1))
        masked = np.empty_like(self._input)
        self._prg.add_many_into(masked, terms, base=self._input)
        self._input = None  # the plain input is not kept past this point
        return MaskedInput(cfg.round_id, me, masked)

    def _check_own_view(self, survivors: frozenset[int]) -> None:
        """Bonawitz et al. 2017 round 3 at this site: the survivors it is told of must be consistent
        with the peers that actually shared keys with it (its U2), and enough of them."""
        cfg, me = self.config, self.site_id
        if me not in survivors:
            raise RemoteProtocolError(f"site {me}: asked to go on but not listed as a survivor")
        if not survivors <= frozenset(cfg.site_ids):
            raise RemoteProtocolError(f"site {me}: survivor set names sites off the roster")
        stranger = (survivors & self._neighbours()) - self._u2
        if stranger:
            raise RemoteProtocolError(
                f"site {me}: neighbours {sorted(stranger)} are named survivors but never shared "
                "keys with this site"
            )
        self._need(len(survivors & self._u2), "share holders of this site survived")

    def _on_consistency(self, request: ConsistencyRequest) -> ConsistencySignature:
        cfg, me = self.config, self.site_id
        if not cfg.active:
            raise RemoteProtocolError("consistency check requested in the semi-honest variant")
        self._check_own_view(request.survivors)
        if self._signing_key is None:
            raise LocalProtocolError("signing key missing")
        self._u3 = request.survivors
        payload = consistency_payload(cfg, request.survivors, self.graph_seed)
        return ConsistencySignature(cfg.round_id, me, self._signing_key.sign(payload))

    def _on_unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        cfg, me = self.config, self.site_id
        both = request.survivors & request.dropped
        if both:
            raise RemoteProtocolError(
                f"site {me}: refusing to unmask: sites {sorted(both)} are named both dropped and "
                "surviving (answering would reveal their inputs)"
            )
        if not (request.survivors | request.dropped) <= frozenset(cfg.site_ids):
            raise RemoteProtocolError(f"site {me}: unmask request names sites off the roster")
        self._check_own_view(request.survivors)
        unknown = (request.dropped & self._neighbours()) - self._u2
        if unknown:
            raise RemoteProtocolError(
                f"site {me}: neighbours {sorted(unknown)} are named dropped but never shared keys "
                "with this site"
            )
        if cfg.active:
            self._check_consistency(request)
        elif request.signatures:
            raise RemoteProtocolError("signatures sent in the semi-honest variant")
        survivors_mine: list[tuple[int, bytes, bytes]] = []
        dropped_mine: list[tuple[int, bytes, bytes]] = []
        for owner in sorted(self._u2):
            mshare, msalt, sshare, ssalt = self._held[owner]
            if owner in request.survivors:
                if owner not in self._rejected:
                    survivors_mine.append((owner, sshare, ssalt))
            elif owner in request.dropped:
                if owner not in self._rejected:
                    dropped_mine.append((owner, mshare, msalt))
            else:
                raise RemoteProtocolError(
                    f"site {me}: peer {owner} completed key sharing but is neither dropped nor "
                    "surviving in the unmask request"
                )
        self._held.clear()
        self._self_seed = None
        return UnmaskResponse(
            cfg.round_id,
            me,
            tuple(survivors_mine),
            tuple(dropped_mine),
            tuple(sorted(self._rejected)),
        )

    def _check_consistency(self, request: UnmaskRequest) -> None:
        cfg, me = self.config, self.site_id
        if self._u3 is None or request.survivors != self._u3:
            raise RemoteProtocolError(
                f"site {me}: the unmask request's survivors differ from the signed set"
            )
        if cfg.verify_keys is None:
            raise LocalProtocolError("verify_keys missing in the active variant")
        payload = consistency_payload(cfg, self._u3, self.graph_seed)
        signers: set[int] = set()
        for signer, signature in request.signatures:
            if signer not in self._u3 or signer in signers:
                raise RemoteProtocolError(f"site {me}: unexpected consistency signer {signer}")
            try:
                verify(cfg.verify_keys[signer], signature, payload)
            except SignatureError as exc:
                raise RemoteProtocolError(
                    f"site {me}: consistency signature of site {signer} does not verify"
                ) from exc
            signers.add(signer)
        # Counted from this site's own holders (all sites for a complete graph): for SecAgg+,
        # t signatures from anywhere would let a server gather two disjoint signing sets.
        own = signers & (self._neighbours() | {me})
        self._need(len(own), "valid consistency signatures from this site's share holders")
        # And from more than (n + c) / 2 sites of the whole round: every honest site signs one set
        # only, so two different survivor sets cannot both reach this count (they would share
        # more than c signers, one of them honest). Without it a SecAgg+ server shows a target and
        # the t - 1 peers it let the target mask with one U3, everyone else another U3 (the
        # peers dropped), and collects t shares of the target's self seed and of every peer's
        # mask key (the view-split attack, tests/adversary/test_secagg_core.py).
        quorum = self.policy.consistency_quorum(cfg)
        if len(signers) < quorum:
            raise ThresholdError(
                f"site {me}: only {len(signers)} sites of the round signed its survivor set; it "
                f"needs {quorum}, more than (n + c) / 2 with n={len(cfg.site_ids)} and "
                f"c={self.policy.colluders(cfg)} assumed colluders; aborting the round, nothing "
                "revealed"
            )
