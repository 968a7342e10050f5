"""The site's side of SecAgg / SecAgg+ as a sans-IO state machine.

The client consumes server messages and returns its replies; it never touches a socket, a clock or a
file, so the same object runs in the in-process harness, behind gRPC and inside other frameworks.

Guarantee (semi-honest server, or active with ``config.active``): the server learns the site's input
only inside the sum of at least ``threshold`` sites. The client never reveals both the self-mask share
and the mask-key share of one peer, refuses any message of another round or phase, and after any
protocol violation stays in a permanent error state.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from enum import Enum
from typing import Any, NoReturn

import numpy as np

from secure_fl.crypto import (
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
    SignatureError,
    ThresholdError,
)
from secure_fl.secagg.config import PROTOCOL_VERSION, SecAggConfig
from secure_fl.secagg.messages import (
    AdvertiseKeys,
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

RandomBytes = Callable[[int], bytes]
_PLAIN = struct.Struct(">II")


class ClientPhase(Enum):
    INIT = "init"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ERROR = "error"


# The one table of legal transitions: (phase, incoming message type) -> (handler, next phase).
# Anything not in the table is a protocol violation.
_TRANSITIONS: dict[tuple[ClientPhase, type], tuple[str, ClientPhase]] = {
    (ClientPhase.ADVERTISED, KeyRoster): ("_on_roster", ClientPhase.SHARED),
    (ClientPhase.SHARED, ShareDelivery): ("_on_shares", ClientPhase.MASKED),
    (ClientPhase.MASKED, ConsistencyRequest): ("_on_consistency", ClientPhase.SIGNED),
    (ClientPhase.MASKED, UnmaskRequest): ("_on_unmask", ClientPhase.DONE),
    (ClientPhase.SIGNED, UnmaskRequest): ("_on_unmask", ClientPhase.DONE),
}


def advert_payload(
    config: SecAggConfig, sender: int, enc_public: bytes, mask_public: bytes
) -> bytes:
    """The bytes a site signs to bind its two public keys to itself and this round."""
    return config.context("advertise") + struct.pack(">I", sender) + enc_public + mask_public


def consistency_payload(config: SecAggConfig, survivors: frozenset[int]) -> bytes:
    """The bytes a site signs in the consistency check: the round and the sorted survivor set."""
    ids = sorted(survivors)
    return config.context("consistency") + struct.pack(f">{len(ids)}I", *ids)


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
    masked-input phase. ``signing_key`` is required in the active variant. ``randbytes`` supplies all
    randomness of this party (OS CSPRNG by default; a deterministic source only in tests).

    Errors: every handler raises a :class:`ProtocolError` subclass on a violation and leaves the
    client in :attr:`ClientPhase.ERROR`, where it refuses everything.
    """

    _no_pickle_message = "SecAggClient holds secret keys and cannot be pickled or copied"

    def __init__(
        self,
        site_id: int,
        config: SecAggConfig,
        *,
        input_vector: np.ndarray | None = None,
        signing_key: SigningKey | None = None,
        randbytes: RandomBytes | None = None,
        prg: MaskPRG | None = None,
    ) -> None:
        if site_id not in config.graph:
            raise LocalProtocolError(f"site_id {site_id} is not on the round's roster")
        if config.active and signing_key is None:
            raise LocalProtocolError("signing_key is required in the active variant")
        self.site_id = site_id
        self.config = config
        self.phase = ClientPhase.INIT
        self.error: ProtocolError | None = None
        self._rand: RandomBytes = randbytes if randbytes is not None else os.urandom
        self._signing_key = signing_key
        self._prg = prg if prg is not None else MaskPRG(config.vector_length, config.bits)
        self._input: np.ndarray | None = None
        if input_vector is not None:
            self.set_input(input_vector)
        self._enc_key: X25519KeyPair | None = None
        self._mask_key: X25519KeyPair | None = None
        self._self_seed: bytes | None = None
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] | None = None
        # Shares this site holds: owner -> (share of owner's mask key, share of owner's self seed).
        self._held: dict[int, tuple[bytes, bytes]] = {}

    def __repr__(self) -> str:
        return f"SecAggClient(site_id={self.site_id}, phase={self.phase.value})"

    # -- public API ---------------------------------------------------------------------------

    def set_input(self, vector: np.ndarray) -> None:
        """Supply the encoded input. Errors: LocalProtocolError on wrong dtype, length or phase."""
        if self.phase not in (ClientPhase.INIT, ClientPhase.ADVERTISED, ClientPhase.SHARED):
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
        """Phase 0: generate two fresh key pairs and advertise their public halves."""
        if self.phase is not ClientPhase.INIT:
            return self._fail(LocalProtocolError(f"start() called in phase {self.phase.value}"))
        self._enc_key = X25519KeyPair.generate(self._rand)
        self._mask_key = X25519KeyPair.generate(self._rand)
        enc_pub, mask_pub = self._enc_key.public_bytes, self._mask_key.public_bytes
        signature = None
        if self._signing_key is not None and self.config.active:
            payload = advert_payload(self.config, self.site_id, enc_pub, mask_pub)
            signature = self._signing_key.sign(payload)
        self.phase = ClientPhase.ADVERTISED
        advert = AdvertiseKeys(self.config.round_id, self.site_id, enc_pub, mask_pub, signature)
        self._adverts[self.site_id] = advert
        return advert

    def handle(self, message: ServerMessage) -> Any:
        """Consume one server message and return this site's reply.

        Errors: RemoteProtocolError for a message of the wrong round or phase or one that fails a
        check; ThresholdError when fewer than ``threshold`` parties remain; LocalProtocolError when
        the client is already in the error state. Every error is permanent.
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
        self.phase = next_phase
        return reply

    # -- handlers -----------------------------------------------------------------------------

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self.phase = ClientPhase.ERROR
        self.error = exc
        # Secrets are dropped at once: nothing more can be derived from this client.
        self._held.clear()
        self._self_seed = None
        raise exc

    def _need(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise ThresholdError(
                f"site {self.site_id}: only {count} {what}, threshold is {self.config.threshold}; "
                "aborting the round"
            )

    def _on_roster(self, roster: KeyRoster) -> ShareKeys:
        cfg, me = self.config, self.site_id
        holders = cfg.holders(me)
        seen: dict[int, AdvertiseKeys] = {}
        keys_seen: set[bytes] = set()
        for advert in roster.adverts:
            if advert.round_id != cfg.round_id:
                raise RemoteProtocolError(f"advert of site {advert.sender} is for another round")
            if advert.sender not in holders or advert.sender in seen:
                raise RemoteProtocolError(f"unexpected or duplicate advert from {advert.sender}")
            if advert.sender == me:
                if advert != self._adverts[me]:
                    raise RemoteProtocolError("the roster altered this site's own advertisement")
            elif cfg.active:
                assert cfg.verify_keys is not None  # guaranteed by SecAggConfig
                payload = advert_payload(cfg, advert.sender, advert.enc_public, advert.mask_public)
                if advert.signature is None:
                    raise RemoteProtocolError(f"advert of site {advert.sender} is unsigned")
                try:
                    verify(cfg.verify_keys[advert.sender], advert.signature, payload)
                except SignatureError as exc:
                    raise RemoteProtocolError(
                        f"advert of site {advert.sender}: bad signature"
                    ) from exc
            for key in (advert.enc_public, advert.mask_public):
                if len(key) != 32 or key in keys_seen:
                    raise RemoteProtocolError(f"advert of site {advert.sender}: bad or reused key")
                keys_seen.add(key)
            seen[advert.sender] = advert
        seen[me] = self._adverts[me]
        u1 = frozenset(seen)
        self._need(len(u1), "share holders advertised keys")
        self._adverts = seen
        assert self._enc_key is not None and self._mask_key is not None
        self._self_seed = self._rand(32)
        xs = sorted(u1)
        mask_shares = split(
            self._mask_key.private_bytes(), threshold=cfg.threshold, xs=xs, randbytes=self._rand
        )
        seed_shares = split(self._self_seed, threshold=cfg.threshold, xs=xs, randbytes=self._rand)
        out: list[tuple[int, bytes]] = []
        context = cfg.context("share-encryption")
        for mshare, sshare in zip(mask_shares, seed_shares, strict=True):
            receiver = mshare.x
            if receiver == me:
                self._held[me] = (mshare.to_bytes(), sshare.to_bytes())
                continue
            key = agree_key(self._enc_key, seen[receiver].enc_public, context=context)
            plaintext = _PLAIN.pack(me, receiver) + mshare.to_bytes() + sshare.to_bytes()
            out.append((receiver, seal(key, plaintext, share_ad(cfg, me, receiver))))
        return ShareKeys(cfg.round_id, me, tuple(out))

    def _on_shares(self, delivery: ShareDelivery) -> MaskedInput:
        cfg, me = self.config, self.site_id
        if self._input is None:
            raise LocalProtocolError(f"site {me}: no input was set before the masked-input phase")
        assert self._enc_key is not None and self._mask_key is not None
        assert self._self_seed is not None
        context = cfg.context("share-encryption")
        received: dict[int, tuple[bytes, bytes]] = {}
        for sender, sealed in delivery.ciphertexts:
            if sender == me or sender not in self._adverts or sender in received:
                raise RemoteProtocolError(f"site {me}: unexpected or duplicate share from {sender}")
            key = agree_key(self._enc_key, self._adverts[sender].enc_public, context=context)
            try:
                plaintext = open_sealed(key, sealed, share_ad(cfg, sender, me))
            except DecryptionError as exc:
                raise RemoteProtocolError(
                    f"site {me}: the share from site {sender} failed authentication "
                    "(tampered, replayed from another round, or redirected)"
                ) from exc
            half = (len(plaintext) - _PLAIN.size) // 2
            if _PLAIN.unpack_from(plaintext) != (sender, me) or half <= 0:
                raise RemoteProtocolError(f"site {me}: share from {sender} names other parties")
            mshare = plaintext[_PLAIN.size : _PLAIN.size + half]
            sshare = plaintext[_PLAIN.size + half :]
            try:
                ok = Share.from_bytes(mshare).x == me and Share.from_bytes(sshare).x == me
            except InconsistentSharesError as exc:
                raise RemoteProtocolError(f"site {me}: malformed share from {sender}") from exc
            if not ok:
                raise RemoteProtocolError(f"site {me}: share from {sender} is for another holder")
            received[sender] = (mshare, sshare)
        u2 = frozenset(received) | {me}
        self._need(len(u2), "share holders completed the key sharing")
        self._held.update(received)
        self._u2 = u2
        masked = self._input.copy()
        self._prg.add_into(masked, self._self_seed, 1)
        mask_context = cfg.context("pairwise-mask")
        for peer in sorted(u2 & cfg.neighbours(me)):
            seed = agree_key(self._mask_key, self._adverts[peer].mask_public, context=mask_context)
            self._prg.add_into(masked, seed, 1 if me > peer else -1)
        self._input = None  # the plain input is not kept past this point
        return MaskedInput(cfg.round_id, me, masked)

    def _on_consistency(self, request: ConsistencyRequest) -> ConsistencySignature:
        cfg, me = self.config, self.site_id
        if not cfg.active:
            raise RemoteProtocolError("consistency check requested in the semi-honest variant")
        if me not in request.survivors or not request.survivors <= frozenset(cfg.site_ids):
            raise RemoteProtocolError(f"site {me}: malformed survivor set in consistency check")
        self._need(len(request.survivors), "sites survived the masked-input phase")
        assert self._signing_key is not None
        self._u3 = request.survivors
        signature = self._signing_key.sign(consistency_payload(cfg, request.survivors))
        return ConsistencySignature(cfg.round_id, me, signature)

    def _on_unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        cfg, me = self.config, self.site_id
        both = request.survivors & request.dropped
        if both:
            raise RemoteProtocolError(
                f"site {me}: refusing to unmask: sites {sorted(both)} are named both dropped and "
                "surviving (answering would reveal their inputs)"
            )
        if me not in request.survivors:
            raise RemoteProtocolError(f"site {me}: asked to unmask but not listed as a survivor")
        if not (request.survivors | request.dropped) <= frozenset(cfg.site_ids):
            raise RemoteProtocolError(f"site {me}: unmask request names sites off the roster")
        self._need(len(request.survivors), "sites survived the masked-input phase")
        if cfg.active:
            self._check_consistency(request)
        elif request.signatures:
            raise RemoteProtocolError("signatures sent in the semi-honest variant")
        survivors_mine: list[tuple[int, bytes]] = []
        dropped_mine: list[tuple[int, bytes]] = []
        for owner in sorted(self._u2):
            mshare, sshare = self._held[owner]
            if owner in request.survivors:
                survivors_mine.append((owner, sshare))
            elif owner in request.dropped:
                dropped_mine.append((owner, mshare))
            else:
                raise RemoteProtocolError(
                    f"site {me}: peer {owner} completed key sharing but is neither dropped nor "
                    "surviving in the unmask request"
                )
        self._held.clear()
        self._self_seed = None
        return UnmaskResponse(cfg.round_id, me, tuple(survivors_mine), tuple(dropped_mine))

    def _check_consistency(self, request: UnmaskRequest) -> None:
        cfg, me = self.config, self.site_id
        if self._u3 is None or request.survivors != self._u3:
            raise RemoteProtocolError(
                f"site {me}: the unmask request's survivors differ from the signed set"
            )
        assert cfg.verify_keys is not None
        payload = consistency_payload(cfg, self._u3)
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
        self._need(len(signers), "valid consistency signatures")
