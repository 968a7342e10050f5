"""CKKS rounds over the federation transport (``protocols/ckks.md``, ``protocols/federation.md``
"CKKS rounds"): context loading, and the names the gRPC server and site use.

Design (the server never holds anything decrypted):

* The server holds the **encrypted global model**: once a CKKS round has completed, the global
  model exists only as the sum ``C = sum_{u in S} Enc(w_u * m_u)`` of the contributors' encrypted,
  weight-scaled new local models ``m_u = global + update_u`` (``w_u = weight_u / W``, ``W`` the
  total weight of the sites that reported), together with the public share
  ``s = sum_{u in S} w_u`` of the contributors. The initial model is public plaintext.
* **Every site decrypts the global model itself** (:func:`decrypt_model`): global ``= Dec(C) / s``,
  the weighted mean over the contributors (a site that dropped out during the upload is simply
  not in ``S``: the division by ``s`` renormalises, so no re-upload is needed). What a site
  decrypts never leaves it: no message of the protocol carries plaintext values from a site.
* The server only checks and adds ciphertexts with the public context, **as the upload streams
  in** (:func:`receive_upload` into a :class:`~secure_fl.rounds.ckks.CkksServerRound`); its
  checkpoint and its final artefact are ciphertexts. Sites write the final model.

The round recipe is :mod:`secure_fl.rounds.ckks`; the payload formats are
:mod:`secure_fl.he.model` and the site's steps :mod:`secure_fl.he.site` (both re-exported here
under their historical names). TenSEAL is imported only when a context is loaded.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.he.model import (
    MAX_CHUNK_CIPHERTEXTS,
    MODEL_FORMAT,
    MODEL_MAGIC,
    EncryptedModel,
    Structure,
    decode_model,
    encode_model,
    fingerprint_bytes,
    fingerprint_bytes_checked,
    max_frame_bytes,
    max_payload_bytes,
    pack_frames,
    structure_of,
    structure_size,
    unpack_frames,
)
from secure_fl.he.site import check_local_model, decrypt_model, local_model_vector
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import CkksFiles
from secure_fl.transport.errors import RejectedError

if TYPE_CHECKING:
    from secure_fl.he import PublicContext, SecretContext
    from secure_fl.rounds.ckks import CkksServerRound


def load_public(files: CkksFiles | None) -> PublicContext:
    """The server's public context, checked against the federation's fingerprint.

    Errors: ConfigError when there is no ``ckks`` section, the artefact is the secret one (or holds
    a secret key), is unreadable or corrupted, or has another fingerprint.
    """
    if files is None:
        raise ConfigError(
            "aggregation.protocol 'ckks' needs a 'ckks' section (the public context artefact and "
            "the federation's fingerprint, as written by secure-fl provision)"
        )
    from secure_fl.he import PublicContext

    fingerprint_bytes(files.fingerprint)
    return PublicContext.load(files.context, expected_fingerprint=files.fingerprint)


def load_secret(files: CkksFiles | None) -> SecretContext:
    """A site's secret context, checked against the federation's fingerprint.

    Errors: ConfigError when there is no ``ckks`` section, the artefact is the public one, is
    readable by group or others, unreadable, corrupted, or has another fingerprint.
    """
    if files is None:
        raise ConfigError("this federation aggregates with CKKS but the site config has no 'ckks'")
    from secure_fl.he import SecretContext

    fingerprint_bytes(files.fingerprint)
    return SecretContext.load(files.context, expected_fingerprint=files.fingerprint)


# -- the server's step: add ciphertexts as they stream in, never decrypt --------------------------


def _data_of(raw: bytes) -> pb.Chunk:
    try:
        return pb.Chunk.FromString(raw)
    except DecodeError as exc:
        raise RejectedError("INVALID_ARGUMENT", "chunk is not a valid Chunk message") from exc


#: Given the checked header, the round an upload goes into and the lock to hold around every call
#: into it (a server that knows the round only from the header's round id).
RoundFor = Callable[
    [pb.PayloadHeader],
    "tuple[CkksServerRound, AbstractContextManager[object] | threading.Condition | None]",
]


def receive_upload(
    stream: Iterable[bytes],
    ckks_round: CkksServerRound | RoundFor,
    site: int,
    *,
    max_chunk: int,
    check_header: Callable[[pb.PayloadHeader], None],
    lock: AbstractContextManager[object] | threading.Condition | None = None,
) -> tuple[pb.PayloadHeader, int]:
    """Add one site's ``UploadCiphertext`` stream (serialised ``pb.Chunk`` messages: header,
    data pieces, trailer) into ``ckks_round`` **as it arrives**: every frame the data completes
    is checked and added at once, so the server holds one partial frame per open upload instead
    of the whole upload. Returns the header and the bytes received.

    ``check_header`` validates the header (kind, round, fingerprint, sizes, weight) before any
    data is taken; ``ckks_round`` is the round, or a :data:`RoundFor` called with the checked
    header that returns the round and its lock (then ``lock`` is not used); the lock (the
    server's, when handlers run in threads) is held around every call into the round, never
    while waiting for the network.

    Errors: RejectedError (INVALID_ARGUMENT / RESOURCE_EXHAUSTED) for a malformed stream, a
    piece over ``max_chunk``, a length other than the header's, a checksum mismatch, or an
    upload the round refuses (nothing of it added); the round's TaintedSumError (a
    ProtocolError: the attempt must be run again without this site) when the stream fails after
    some of its frames were added.
    """
    target: CkksServerRound | None = None
    guard: AbstractContextManager[object] | threading.Condition = nullcontext()
    header: pb.PayloadHeader | None = None
    digest = hashlib.sha256()
    received = filled = 0
    finished = False
    try:
        for raw in stream:
            received += len(raw)
            chunk = _data_of(raw)
            part = chunk.WhichOneof("part")
            if finished:
                raise RejectedError("INVALID_ARGUMENT", "data after the payload trailer")
            if part == "header":
                if header is not None:
                    raise RejectedError("INVALID_ARGUMENT", "second payload header in one stream")
                check_header(chunk.header)
                header = chunk.header
                if callable(ckks_round):
                    chosen, held = ckks_round(header)
                else:
                    chosen, held = ckks_round, lock
                guard = held if held is not None else nullcontext()
                with guard:
                    _refuse(chosen.open_upload, site)
                target = chosen
                continue
            if header is None or target is None:
                raise RejectedError("INVALID_ARGUMENT", "payload stream must start with a header")
            if part == "data":
                piece = chunk.data
                if len(piece) > max_chunk:
                    raise RejectedError(
                        "RESOURCE_EXHAUSTED",
                        f"chunk of {len(piece)} bytes exceeds the limit of {max_chunk} bytes",
                    )
                filled += len(piece)
                if filled > header.total_bytes:
                    raise RejectedError(
                        "INVALID_ARGUMENT",
                        f"payload longer than its declared {header.total_bytes} bytes",
                    )
                digest.update(piece)
                with guard:
                    _refuse(target.feed, site, piece)
            elif part == "trailer":
                if filled != header.total_bytes:
                    raise RejectedError(
                        "INVALID_ARGUMENT",
                        f"payload truncated: {filled} of {header.total_bytes} bytes",
                    )
                if chunk.trailer.sha256 != digest.digest():
                    raise RejectedError("INVALID_ARGUMENT", "payload checksum (SHA-256) mismatch")
                with guard:
                    _refuse(target.finish_upload, site)
                finished = True
            else:
                raise RejectedError("INVALID_ARGUMENT", "empty chunk")
        if header is None or not finished:
            raise RejectedError("INVALID_ARGUMENT", "payload stream ended before its trailer")
    except BaseException as exc:
        if target is not None and not finished:
            with guard:
                target.abort_upload(site, f"{type(exc).__name__}: {exc}")
        raise
    return header, received


def _refuse(call: Callable[..., None], *args: object) -> None:
    """Run ``call``; a RemoteProtocolError (the upload refused, nothing added) becomes
    RejectedError INVALID_ARGUMENT. TaintedSumError and other errors pass through."""
    try:
        call(*args)
    except RemoteProtocolError as exc:
        raise RejectedError("INVALID_ARGUMENT", str(exc)) from exc


__all__ = [
    "MAX_CHUNK_CIPHERTEXTS",
    "MODEL_FORMAT",
    "MODEL_MAGIC",
    "EncryptedModel",
    "RoundFor",
    "Structure",
    "check_local_model",
    "decode_model",
    "decrypt_model",
    "encode_model",
    "fingerprint_bytes",
    "fingerprint_bytes_checked",
    "load_public",
    "load_secret",
    "local_model_vector",
    "max_frame_bytes",
    "max_payload_bytes",
    "pack_frames",
    "receive_upload",
    "structure_of",
    "structure_size",
    "unpack_frames",
]
