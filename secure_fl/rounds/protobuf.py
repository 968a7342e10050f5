"""Conversions between the round messages (:mod:`secure_fl.secagg.messages`,
:mod:`secure_fl.rounds.messages`) and the protobuf messages of ``protocols/federation.proto``.

One copy for every transport: the gRPC server and site use them directly (re-exported by
:mod:`secure_fl.transport.convert`), :mod:`secure_fl.rounds.codec` for bytes.

Site -> server conversions take the sender from the authenticated certificate, never from the
message: a non-zero ``sender`` field that differs is refused with PERMISSION_DENIED, and structural
faults (wrong key, signature or share length, too many entries, a vector of the wrong size) with
INVALID_ARGUMENT, before the protocol core sees the message. Server -> site conversions raise
:class:`RemoteProtocolError` on anything malformed: the site treats it as a protocol violation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from secure_fl.crypto import OVERHEAD, SHARE_SIZE
from secure_fl.errors import RemoteProtocolError
from secure_fl.rounds.messages import SecAggSetup
from secure_fl.secagg.commit import COMMITMENT_SIZE, NONCE_SIZE, SALT_SIZE
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    RevealNonce,
    RevealSet,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
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


# -- round setup --------------------------------------------------------------------------------


#: Whether ``protocols/federation.proto``'s SecAggSetup carries ``l2_clip`` (0: none). Until it
#: does, the L2 bound travels only in :mod:`secure_fl.rounds.codec` frames beside the protobuf.
SETUP_HAS_L2_CLIP = "l2_clip" in pb.SecAggSetup.DESCRIPTOR.fields_by_name


def setup_to_pb(setup: SecAggSetup) -> pb.SecAggSetup:
    """The protobuf SecAggSetup of ``setup`` (weights aligned with the ascending site ids).
    ``round_id`` travels in the enclosing Instruction; ``l2_clip`` in the protobuf only where the
    proto has the field (:data:`SETUP_HAS_L2_CLIP`; :mod:`secure_fl.rounds.codec` carries it
    beside the protobuf in any case)."""
    ids = sorted(setup.site_ids)
    extra: dict[str, Any] = {}
    if SETUP_HAS_L2_CLIP:
        extra["l2_clip"] = setup.l2_clip or 0.0
    return pb.SecAggSetup(
        protocol=setup.protocol,
        threshold=setup.threshold,
        vector_length=setup.vector_length,
        bits=setup.bits,
        active=setup.active,
        site_ids=ids,
        k=setup.k,
        verify_keys=[
            pb.VerifyKey(site=s, public_key=k) for s, k in sorted(setup.verify_keys.items())
        ],
        frac_bits=setup.frac_bits,
        clip_range=setup.clip_range,
        weight=setup.weight,
        weights=[float(setup.weights[s]) for s in ids],
        distributed_dp_json=setup.distributed_dp_json,
        phase_deadline_s=setup.phase_deadline_s,
        **extra,
    )


def setup_from_pb(
    msg: pb.SecAggSetup, round_id: int, *, l2_clip: float | None = None
) -> SecAggSetup:
    """The :class:`SecAggSetup` of a protobuf SecAggSetup for round ``round_id`` (``l2_clip``:
    the bound carried beside it; else the protobuf's own where it has the field).

    Structural checks only (the site's checks are :func:`secure_fl.rounds.checks.
    config_from_setup` and :class:`secure_fl.rounds.secagg.SecAggSiteRound`).
    Errors: RemoteProtocolError when a site is listed twice, the weights are not one finite
    value > 0 per site id, or a verify key is listed twice."""
    site_ids = [int(s) for s in msg.site_ids]
    if len(set(site_ids)) != len(site_ids):
        raise RemoteProtocolError("setup lists a site twice")
    if len(msg.weights) != len(site_ids):
        raise RemoteProtocolError(
            f"setup lists {len(msg.weights)} weights for {len(site_ids)} sites"
        )
    weights = {s: float(w) for s, w in zip(site_ids, msg.weights, strict=True)}
    for s, w in weights.items():
        if not (math.isfinite(w) and w > 0):
            raise RemoteProtocolError(f"setup weight of site {s} must be finite and > 0, got {w!r}")
    if l2_clip is None and SETUP_HAS_L2_CLIP:
        l2_clip = float(getattr(msg, "l2_clip", 0.0)) or None
    keys = {int(k.site): bytes(k.public_key) for k in msg.verify_keys}
    if len(keys) != len(msg.verify_keys):
        raise RemoteProtocolError("setup lists a verify key twice")
    return SecAggSetup(
        round_id=int(round_id),
        protocol=msg.protocol,
        site_ids=tuple(sorted(site_ids)),
        threshold=int(msg.threshold),
        k=int(msg.k),
        vector_length=int(msg.vector_length),
        bits=int(msg.bits),
        active=bool(msg.active),
        frac_bits=int(msg.frac_bits),
        clip_range=float(msg.clip_range),
        weight=float(msg.weight),
        weights=weights,
        verify_keys=keys,
        l2_clip=l2_clip,
        distributed_dp_json=msg.distributed_dp_json,
        phase_deadline_s=float(msg.phase_deadline_s),
    )
