"""The CKKS round: the one recipe every driver runs (``protocols/ckks.md``).

* :class:`CkksServerRound` (public context only): :meth:`~CkksServerRound.setup` sends each site
  a :class:`~secure_fl.rounds.messages.CkksSetup` (fingerprint, parameters, its normalised weight,
  every reported weight, layout); each upload is checked and added **as it streams in**
  (:class:`~secure_fl.he.stream.StreamingSum`: memory of one model of ciphertexts plus one frame
  per open upload); :meth:`~CkksServerRound.outcome` is the encrypted weighted sum and its share
  (a ``CKKS_MODEL`` payload). Nothing is ever decrypted for the server.
* :class:`CkksSiteRound` (the secret context): checks the setup against its context and policy
  before anything is sent, scales its vector by its normalised weight and encrypts it freshly,
  chunk by chunk; it decrypts the encrypted sum **for itself** (fail closed on every check after
  the first decryption).

The vector is whatever the caller decides: the in-process aggregator carries updates (the mean
is the mean update), the gRPC site carries its new local model ``global + update`` (the
encrypted sum *is* the next global model; pass ``base=``). Dropouts need no recovery: the share
``sum of the contributors' normalised weights`` renormalises the mean.

Messages: :class:`~secure_fl.rounds.messages.CkksSetup`, :class:`~secure_fl.rounds.messages.CkksUpload`
(a whole ``CKKS_CIPHERTEXT`` payload), :class:`CkksFrame` (one frame, for transports that carry
frames as messages) and :class:`~secure_fl.rounds.messages.CkksResult` (the ``CKKS_MODEL``
payload). A transport that streams raw bytes calls :meth:`CkksServerRound.open_upload`,
:meth:`~CkksServerRound.feed`, :meth:`~CkksServerRound.finish_upload` and
:meth:`~CkksServerRound.abort_upload` instead of :meth:`~CkksServerRound.receive`
(:func:`secure_fl.transport.ckks.receive_upload` does this for a gRPC chunk stream).

Modules: the site half is :mod:`secure_fl.rounds.ckks_site`, the server half
:mod:`secure_fl.rounds.ckks_server`, the chunk-major in-process driver
:mod:`secure_fl.rounds.ckks_local` (split to keep each under 400 lines); this module names them
and registers :class:`CkksFrame` with :mod:`secure_fl.rounds.codec` (tag 64), so import it before
decoding a CkksFrame. :func:`ckks_setup_to_pb` / :func:`ckks_setup_from_pb` are the one
conversion of :class:`~secure_fl.rounds.messages.CkksSetup` to and from the protobuf CkksSetup of
``protocols/federation.proto`` (the gRPC server and site both use them).
"""

from __future__ import annotations

import struct

from secure_fl.he.stream import TaintedSumError
from secure_fl.rounds import codec
from secure_fl.rounds.ckks_server import CkksServerRound
from secure_fl.rounds.ckks_site import CkksFrame, CkksSiteRound
from secure_fl.rounds.messages import CkksSetup
from secure_fl.transport._generated import federation_pb2 as pb

_FRAME_HEAD = struct.Struct("<QIIB")
#: The codec tag of :class:`CkksFrame` (:func:`secure_fl.rounds.codec.register`).
CKKS_FRAME_TAG = 64


def _encode_frame(message: CkksFrame) -> bytes:
    head = _FRAME_HEAD.pack(message.round_id, message.sender, message.chunk, int(message.last))
    return head + message.frame


def _decode_frame(body: bytes) -> CkksFrame:
    round_id, sender, chunk, last = _FRAME_HEAD.unpack_from(body)
    if last not in (0, 1):
        raise ValueError("CkksFrame.last must be 0 or 1")
    return CkksFrame(round_id, sender, chunk, bytes(body[_FRAME_HEAD.size :]), bool(last))


codec.register(CkksFrame, CKKS_FRAME_TAG, _encode_frame, _decode_frame)


def ckks_setup_to_pb(setup: CkksSetup) -> pb.CkksSetup:
    """The protobuf CkksSetup of ``setup``: every field of the proto (``l2_clip`` None is 0).
    ``round_id`` travels in the enclosing Instruction; the participants' ``weights`` and
    ``extra`` have no proto field and are not sent (the site checks its own weight, which is in
    (0, 1])."""
    return pb.CkksSetup(
        context_sha256=setup.context_sha256,
        poly_modulus_degree=setup.poly_modulus_degree,
        scale=setup.scale,
        weight=setup.weight,
        vector_length=setup.vector_length,
        chunk_ciphertexts=setup.chunk_ciphertexts,
        phase_deadline_s=setup.phase_deadline_s,
        l2_clip=setup.l2_clip or 0.0,
    )


def ckks_setup_from_pb(msg: pb.CkksSetup, round_id: int) -> CkksSetup:
    """The :class:`CkksSetup` of a protobuf CkksSetup for round ``round_id`` (the inverse of
    :func:`ckks_setup_to_pb`; ``l2_clip`` 0 is None, ``weights`` empty). No check here: the site
    half checks every field against its context and policy
    (:meth:`CkksSiteRound.on_setup`) before anything is sent."""
    return CkksSetup(
        round_id=int(round_id),
        context_sha256=bytes(msg.context_sha256),
        poly_modulus_degree=int(msg.poly_modulus_degree),
        scale=float(msg.scale),
        weight=float(msg.weight),
        vector_length=int(msg.vector_length),
        chunk_ciphertexts=int(msg.chunk_ciphertexts),
        phase_deadline_s=float(msg.phase_deadline_s),
        l2_clip=float(msg.l2_clip) or None,
    )


__all__ = [
    "CKKS_FRAME_TAG",
    "CkksFrame",
    "CkksServerRound",
    "CkksSiteRound",
    "TaintedSumError",
    "ckks_setup_from_pb",
    "ckks_setup_to_pb",
]
