"""Conversions between the protocol core's messages (:mod:`secure_fl.secagg.messages`) and the
wire messages of ``protocols/federation.proto``.

Site -> server conversions take the sender from the authenticated certificate, never from the
message: a non-zero ``sender`` field that differs is refused with PERMISSION_DENIED, and structural
faults (wrong key, signature or share length, too many entries, a vector of the wrong size) with
INVALID_ARGUMENT, before the protocol core sees the message. Server -> site conversions raise
:class:`RemoteProtocolError` on anything malformed: the site treats it as a protocol violation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from secure_fl.crypto import OVERHEAD, SHARE_SIZE
from secure_fl.encoding import FixedPointCodec
from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.secagg import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    RevealNonce,
    RevealSet,
    SecAggConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_fl.secagg.commit import COMMITMENT_SIZE, NONCE_SIZE, SALT_SIZE
from secure_fl.secagg.config import encoding_binding
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.errors import RejectedError

KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_CIPHERTEXT = 1024


def _le(bits: int) -> np.dtype[Any]:
    return np.dtype("<u4") if bits == 32 else np.dtype("<u8")


def _native(bits: int) -> type[np.unsignedinteger[Any]]:
    return np.uint32 if bits == 32 else np.uint64


def _sender(claimed: int, authenticated: int) -> int:
    if claimed not in (0, authenticated):
        raise RejectedError(
            "PERMISSION_DENIED",
            f"message claims sender {claimed} but the certificate identifies site {authenticated}",
        )
    return authenticated


def _invalid(message: str) -> RejectedError:
    return RejectedError("INVALID_ARGUMENT", message)


# -- site -> server (parsed by the server) ------------------------------------------------------


def advert_from_pb(msg: pb.AdvertiseKeys, sender: int) -> AdvertiseKeys:
    """An AdvertiseKeys from ``sender`` (the authenticated site id)."""
    who = _sender(msg.sender, sender)
    if len(msg.enc_public) != KEY_SIZE or len(msg.mask_public) != KEY_SIZE:
        raise _invalid(f"public keys must be {KEY_SIZE} bytes")
    if len(msg.signature) not in (0, SIGNATURE_SIZE):
        raise _invalid(f"signature must be empty or {SIGNATURE_SIZE} bytes")
    if len(msg.graph_commitment) not in (0, COMMITMENT_SIZE):
        raise _invalid(f"graph_commitment must be empty or {COMMITMENT_SIZE} bytes")
    return AdvertiseKeys(
        msg.round_id,
        who,
        bytes(msg.enc_public),
        bytes(msg.mask_public),
        msg.signature or None,
        bytes(msg.graph_commitment),
    )


def reveal_from_pb(msg: pb.RevealNonce, sender: int) -> RevealNonce:
    """A RevealNonce from ``sender``: a nonce of exactly NONCE_SIZE bytes."""
    who = _sender(msg.sender, sender)
    if len(msg.nonce) != NONCE_SIZE:
        raise _invalid(f"nonce must be {NONCE_SIZE} bytes")
    return RevealNonce(msg.round_id, who, bytes(msg.nonce))


def _commitments(
    entries: Iterable[pb.ShareCommitment], max_entries: int
) -> tuple[tuple[int, bytes, bytes], ...]:
    out: list[tuple[int, bytes, bytes]] = []
    for entry in entries:
        if len(out) >= max_entries:
            raise _invalid(f"at most {max_entries} share commitments allowed")
        if (
            len(entry.mask_key_commitment) != COMMITMENT_SIZE
            or len(entry.seed_commitment) != COMMITMENT_SIZE
        ):
            raise _invalid(f"share commitments must be {COMMITMENT_SIZE} bytes")
        out.append(
            (int(entry.site), bytes(entry.mask_key_commitment), bytes(entry.seed_commitment))
        )
    return tuple(out)


def share_keys_from_pb(msg: pb.ShareKeys, sender: int, max_entries: int) -> ShareKeys:
    """A ShareKeys from ``sender`` with at most ``max_entries`` ciphertexts (and commitments,
    one more: the sender holds shares of its own secrets)."""
    who = _sender(msg.sender, sender)
    if len(msg.ciphertexts) > max_entries:
        raise _invalid(f"at most {max_entries} share ciphertexts allowed")
    out = []
    for entry in msg.ciphertexts:
        if not OVERHEAD <= len(entry.ciphertext) <= MAX_CIPHERTEXT:
            raise _invalid(f"share ciphertext must be {OVERHEAD}..{MAX_CIPHERTEXT} bytes")
        out.append((int(entry.peer), bytes(entry.ciphertext)))
    return ShareKeys(msg.round_id, who, tuple(out), _commitments(msg.commitments, max_entries + 1))


def masked_from_payload(
    header: pb.PayloadHeader, data: bytes | bytearray, sender: int
) -> MaskedInput:
    """A MaskedInput from a verified MASKED_INPUT payload (``bits`` and length already checked)."""
    vector = np.frombuffer(data, dtype=_le(header.bits)).astype(_native(header.bits), copy=False)
    if vector.shape != (header.length,):
        raise _invalid(f"masked input has {vector.shape[0]} values, header says {header.length}")
    return MaskedInput(header.round_id, sender, vector)


def masked_to_bytes(message: MaskedInput, bits: int) -> memoryview:
    """The little-endian bytes of a masked vector (no copy on little-endian hosts)."""
    vector = np.ascontiguousarray(message.vector, dtype=_le(bits))
    return vector.data.cast("B")


def signature_from_pb(msg: pb.ConsistencySignature, sender: int) -> ConsistencySignature:
    who = _sender(msg.sender, sender)
    if len(msg.signature) != SIGNATURE_SIZE:
        raise _invalid(f"consistency signature must be {SIGNATURE_SIZE} bytes")
    return ConsistencySignature(msg.round_id, who, bytes(msg.signature))


def unmask_from_pb(msg: pb.UnmaskResponse, sender: int, max_entries: int) -> UnmaskResponse:
    who = _sender(msg.sender, sender)
    if len(msg.self_mask_shares) + len(msg.mask_key_shares) > max_entries:
        raise _invalid(f"at most {max_entries} shares allowed")
    if len(msg.rejected) > max_entries:
        raise _invalid(f"at most {max_entries} rejected owners allowed")
    for entry in (*msg.self_mask_shares, *msg.mask_key_shares):
        if len(entry.share) != SHARE_SIZE:
            raise _invalid(f"shares must be {SHARE_SIZE} bytes")
        if len(entry.salt) != SALT_SIZE:
            raise _invalid(f"share salts must be {SALT_SIZE} bytes")
    return UnmaskResponse(
        msg.round_id,
        who,
        tuple((int(e.owner), bytes(e.share), bytes(e.salt)) for e in msg.self_mask_shares),
        tuple((int(e.owner), bytes(e.share), bytes(e.salt)) for e in msg.mask_key_shares),
        tuple(int(o) for o in msg.rejected),
    )


# -- site -> server (built by the site) ---------------------------------------------------------


def advert_to_pb(m: AdvertiseKeys) -> pb.AdvertiseKeys:
    return pb.AdvertiseKeys(
        round_id=m.round_id,
        sender=m.sender,
        enc_public=m.enc_public,
        mask_public=m.mask_public,
        signature=m.signature or b"",
        graph_commitment=m.graph_commitment,
    )


def reveal_to_pb(m: RevealNonce) -> pb.RevealNonce:
    return pb.RevealNonce(round_id=m.round_id, sender=m.sender, nonce=m.nonce)


def _commitments_to_pb(
    entries: Iterable[tuple[int, bytes, bytes]],
) -> list[pb.ShareCommitment]:
    return [
        pb.ShareCommitment(site=s, mask_key_commitment=a, seed_commitment=b) for s, a, b in entries
    ]


def share_keys_to_pb(m: ShareKeys) -> pb.ShareKeys:
    return pb.ShareKeys(
        round_id=m.round_id,
        sender=m.sender,
        ciphertexts=[pb.EncryptedShare(peer=r, ciphertext=c) for r, c in m.ciphertexts],
        commitments=_commitments_to_pb(m.commitments),
    )


def signature_to_pb(m: ConsistencySignature) -> pb.ConsistencySignature:
    return pb.ConsistencySignature(round_id=m.round_id, sender=m.sender, signature=m.signature)


def unmask_to_pb(m: UnmaskResponse) -> pb.UnmaskResponse:
    return pb.UnmaskResponse(
        round_id=m.round_id,
        sender=m.sender,
        self_mask_shares=[
            pb.OwnedShare(owner=o, share=s, salt=salt) for o, s, salt in m.self_mask_shares
        ],
        mask_key_shares=[
            pb.OwnedShare(owner=o, share=s, salt=salt) for o, s, salt in m.mask_key_shares
        ],
        rejected=sorted(m.rejected),
    )


# -- server -> site -----------------------------------------------------------------------------


def roster_to_pb(m: KeyRoster) -> pb.KeyRoster:
    return pb.KeyRoster(round_id=m.round_id, adverts=[advert_to_pb(a) for a in m.adverts])


def reveal_set_to_pb(m: RevealSet) -> pb.RevealSet:
    return pb.RevealSet(
        round_id=m.round_id, reveals=[pb.SiteNonce(site=s, nonce=n) for s, n in m.reveals]
    )


def delivery_to_pb(m: ShareDelivery) -> pb.ShareDelivery:
    return pb.ShareDelivery(
        round_id=m.round_id,
        ciphertexts=[pb.EncryptedShare(peer=s, ciphertext=c) for s, c in m.ciphertexts],
        commitments=_commitments_to_pb(m.commitments),
    )


def consistency_to_pb(m: ConsistencyRequest) -> pb.ConsistencyRequest:
    return pb.ConsistencyRequest(round_id=m.round_id, survivors=sorted(m.survivors))


def unmask_request_to_pb(m: UnmaskRequest) -> pb.UnmaskRequest:
    return pb.UnmaskRequest(
        round_id=m.round_id,
        survivors=sorted(m.survivors),
        dropped=sorted(m.dropped),
        signatures=[pb.SiteSignature(site=s, signature=g) for s, g in m.signatures],
    )


def _ids(values: Iterable[int], what: str) -> frozenset[int]:
    ids = list(values)
    if len(set(ids)) != len(ids):
        raise RemoteProtocolError(f"{what} lists a site twice")
    return frozenset(int(v) for v in ids)


def roster_from_pb(m: pb.KeyRoster) -> KeyRoster:
    adverts = tuple(
        AdvertiseKeys(
            a.round_id,
            a.sender,
            bytes(a.enc_public),
            bytes(a.mask_public),
            bytes(a.signature) or None,
            bytes(a.graph_commitment),
        )
        for a in m.adverts
    )
    return KeyRoster(m.round_id, adverts)


def reveal_set_from_pb(m: pb.RevealSet) -> RevealSet:
    sites = [int(r.site) for r in m.reveals]
    if len(set(sites)) != len(sites):
        raise RemoteProtocolError("the reveal set lists a site twice")
    return RevealSet(m.round_id, tuple((int(r.site), bytes(r.nonce)) for r in m.reveals))


def delivery_from_pb(m: pb.ShareDelivery) -> ShareDelivery:
    return ShareDelivery(
        m.round_id,
        tuple((int(c.peer), bytes(c.ciphertext)) for c in m.ciphertexts),
        tuple(
            (int(c.site), bytes(c.mask_key_commitment), bytes(c.seed_commitment))
            for c in m.commitments
        ),
    )


def consistency_from_pb(m: pb.ConsistencyRequest) -> ConsistencyRequest:
    return ConsistencyRequest(m.round_id, _ids(m.survivors, "consistency request"))


def unmask_request_from_pb(m: pb.UnmaskRequest) -> UnmaskRequest:
    return UnmaskRequest(
        m.round_id,
        _ids(m.survivors, "unmask request survivors"),
        _ids(m.dropped, "unmask request dropped"),
        tuple((int(s.site), bytes(s.signature)) for s in m.signatures),
    )


# -- round configuration ------------------------------------------------------------------------


def setup_to_pb(
    config: SecAggConfig,
    codec: FixedPointCodec,
    weight: float,
    phase_deadline_s: float,
    weights: Mapping[int, float],
) -> pb.SecAggSetup:
    """The SecAggSetup a site needs to rebuild ``config`` and encode with ``codec`` and ``weight``
    (its normalised weight); ``weights`` are every participant's reported weight, sent aligned
    with the ascending site ids (``config.binding`` must be :func:`setup_binding` of them)."""
    ids = sorted(config.site_ids)
    return pb.SecAggSetup(
        protocol=config.protocol,
        threshold=config.threshold,
        vector_length=config.vector_length,
        bits=config.bits,
        active=config.active,
        site_ids=ids,
        k=config.degree,
        verify_keys=[
            pb.VerifyKey(site=s, public_key=k)
            for s, k in sorted((config.verify_keys or {}).items())
        ],
        frac_bits=codec.frac_bits,
        clip_range=codec.clip_range,
        weight=weight,
        weights=[float(weights[s]) for s in ids],
        phase_deadline_s=phase_deadline_s,
    )


def setup_binding(
    weights: Mapping[int, float], codec: FixedPointCodec, vector_length: int
) -> bytes:
    """:attr:`SecAggConfig.binding` of a transport round: every participant's reported weight,
    the codec and the vector length (:func:`~secure_fl.secagg.config.encoding_binding`).
    Errors: ConfigError on a weight that is not finite > 0."""
    ids = sorted(weights)
    return encoding_binding(
        ids,
        [weights[s] for s in ids],
        bits=codec.bits,
        frac_bits=codec.frac_bits,
        clip_range=codec.clip_range,
        vector_length=vector_length,
    )


def setup_weights(setup: pb.SecAggSetup) -> dict[int, float]:
    """Every participant's listed weight (site id -> reported weight) from a SecAggSetup.
    Errors: RemoteProtocolError unless there is exactly one finite weight > 0 per site id."""
    if len(setup.weights) != len(setup.site_ids):
        raise RemoteProtocolError(
            f"setup lists {len(setup.weights)} weights for {len(setup.site_ids)} sites"
        )
    weights = {int(s): float(w) for s, w in zip(setup.site_ids, setup.weights, strict=True)}
    if len(weights) != len(setup.site_ids):
        raise RemoteProtocolError("setup lists a site twice")
    for s, w in weights.items():
        if not (math.isfinite(w) and w > 0):
            raise RemoteProtocolError(f"setup weight of site {s} must be finite and > 0, got {w!r}")
    return weights


def setup_from_pb(
    setup: pb.SecAggSetup, round_id: int, *, max_length: int
) -> tuple[SecAggConfig, FixedPointCodec]:
    """Rebuild the round's SecAggConfig (bound to every listed weight and the codec: see
    :func:`setup_binding`) and codec from a SecAggSetup.

    Errors: RemoteProtocolError when the setup is malformed (including a weights list not aligned
    with the site ids) or its vector is longer than ``max_length`` (the site's own bound on what
    it will allocate).
    """
    if setup.vector_length > max_length:
        raise RemoteProtocolError(
            f"setup asks for vectors of {setup.vector_length} values, the limit is {max_length}"
        )
    site_ids = [int(s) for s in setup.site_ids]
    if len(set(site_ids)) != len(site_ids):
        raise RemoteProtocolError("setup lists a site twice")
    weights = setup_weights(setup)
    verify_keys = {int(k.site): bytes(k.public_key) for k in setup.verify_keys} or None
    try:
        codec = FixedPointCodec(
            bits=int(setup.bits), frac_bits=int(setup.frac_bits), clip_range=setup.clip_range
        )
        config = SecAggConfig(
            round_id=round_id,
            site_ids=tuple(sorted(site_ids)),
            threshold=int(setup.threshold),
            vector_length=int(setup.vector_length),
            bits=int(setup.bits),
            protocol=setup.protocol,
            k=int(setup.k),
            active=setup.active,
            verify_keys=verify_keys,
            binding=setup_binding(weights, codec, int(setup.vector_length)),
        )
    except ConfigError as exc:
        raise RemoteProtocolError(f"invalid round configuration from the server: {exc}") from exc
    if not 0.0 < setup.weight <= 1.0:
        raise RemoteProtocolError(f"setup weight must be in (0, 1], got {setup.weight!r}")
    return config, codec
