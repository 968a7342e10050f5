"""The server's gRPC handlers for the plain and CKKS uploads (a mixin of the service handlers).

A plain update is parsed and checked against the model's structure and for finiteness before the
coordinator takes it. A CKKS upload's header is checked (kind, round, fingerprint, layout, weight,
size bound) before any data is taken; then the stream is fed once, frame by frame, into the
round's running homomorphic sum
(:func:`secure_fl.transport.ckks.receive_upload` over the round's open_upload / feed /
finish_upload, under the round's own lock): every frame is checked completely (digest,
fingerprint, round, chunk, sizes, scale, level of every ciphertext) before it is added, and the
server keeps the sum and at most one partial frame per open upload, never a whole upload. An
upload refused at its first frame adds nothing; one that fails after frames were added taints the
sum (:class:`~secure_fl.he.stream.TaintedSumError`: the attempt fails and is run again).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf.message import Message

from secure_fl.errors import InvalidUpdateError
from secure_fl.he.stream import TaintedSumError
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import server_rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import RosterEntry
from secure_fl.transport.errors import RejectedError

if TYPE_CHECKING:
    from secure_fl.transport.config import ServerConfig
    from secure_fl.transport.coordinator import Coordinator


class UploadHandlers:
    """The upload handlers; the server provides the attributes below."""

    config: ServerConfig
    _cond: threading.Condition
    _coord: Coordinator
    _clock: Callable[[], float]
    _ckks_public: Any
    _model: tensors.Tensors
    _blob: bytes

    def _receive(
        self, stream: Iterable[bytes], check: Callable[[pb.PayloadHeader], None]
    ) -> tuple[pb.PayloadHeader, bytearray, int]:
        raise NotImplementedError  # the server's (kept there: tests patch its receive_raw)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError  # the service handlers'

    def _count(self, site: int, received: int, sent: int, *, model: bool = False) -> None:
        raise NotImplementedError  # the service handlers'

    def _upload_update(
        self, entry: RosterEntry, stream: Iterator[bytes], context: grpc.ServicerContext
    ) -> Message:
        expected = len(self._blob)

        def check(header: pb.PayloadHeader) -> None:
            if header.kind != pb.PLAIN_UPDATE:
                raise RejectedError(
                    "INVALID_ARGUMENT", "UploadUpdate carries PLAIN_UPDATE payloads"
                )
            if not (math.isfinite(header.weight) and header.weight > 0):
                raise RejectedError("INVALID_ARGUMENT", "weight must be finite and > 0")
            with self._cond:
                if self.config.aggregation.protocol != "plain":
                    self._coord.touch(entry.site_id, self._clock())
                    raise RejectedError(
                        "FAILED_PRECONDITION", "this federation does not take plain updates"
                    )
                self._coord.check_update(entry.site_id, header.round_id, self._clock())
            if header.total_bytes != expected:
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    f"a plain update must be {expected} bytes, got {header.total_bytes}",
                )

        header, data, nbytes = self._receive(stream, check)
        try:
            update = tensors.loads(data)
        except InvalidUpdateError as exc:
            raise RejectedError("INVALID_ARGUMENT", str(exc)) from exc
        if not tensors.same_structure(update, self._model):
            raise RejectedError(
                "INVALID_ARGUMENT", "the update does not match the model's structure"
            )
        if not all(np.isfinite(v).all() for v in update.values()):
            raise RejectedError("INVALID_ARGUMENT", "the update holds NaN or Inf")
        self._call(
            self._coord.plain_update, entry.site_id, header.round_id, float(header.weight), update
        )
        self._count(entry.site_id, nbytes, 0)
        return pb.Ack(round_id=header.round_id, phase="update")

    def _upload_ciphertext(
        self, entry: RosterEntry, stream: Iterator[bytes], context: grpc.ServicerContext
    ) -> Message:
        public = self._ckks_public
        if public is None:
            raise RejectedError("UNIMPLEMENTED", "this federation does not aggregate with CKKS")
        fp = ckks_wire.fingerprint_bytes(public.fingerprint)
        lim = self.config.limits
        taken: list[server_rounds.CkksRound] = []

        def check(header: pb.PayloadHeader) -> None:
            if header.total_bytes > lim.max_payload_bytes:
                raise RejectedError(
                    "RESOURCE_EXHAUSTED",
                    f"payload of {header.total_bytes} bytes exceeds the limit of "
                    f"{lim.max_payload_bytes} bytes",
                )
            if header.kind != pb.CKKS_CIPHERTEXT:
                raise RejectedError(
                    "INVALID_ARGUMENT", "UploadCiphertext carries CKKS_CIPHERTEXT payloads"
                )
            with self._cond:
                ck = self._coord.check_ckks(entry.site_id, header.round_id, self._clock())
            layout, factor = ck.layout, ck.factors[entry.site_id]
            if header.ckks.context_sha256 != fp:
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    "the ciphertexts are not under the federation's CKKS context (fingerprint "
                    f"{header.ckks.context_sha256.hex()[:16]}..., expected {fp.hex()[:16]}...)",
                )
            if header.length != layout.chunks or header.ckks.ciphertexts != layout.ciphertexts:
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    f"expected {layout.ciphertexts} ciphertexts in {layout.chunks} frames, got "
                    f"{header.ckks.ciphertexts} in {header.length}",
                )
            if header.ckks.weight != factor:
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    f"the update must be scaled by {factor!r}, got {header.ckks.weight!r}",
                )
            bound = ckks_wire.max_payload_bytes(
                layout,
                public.preset.poly_modulus_degree,
                len(public.preset.coeff_mod_bit_sizes) - 1,
            )
            if header.total_bytes > bound:
                raise RejectedError(
                    "RESOURCE_EXHAUSTED",
                    f"{header.total_bytes} bytes of ciphertexts, at most {bound} expected",
                )
            taken.append(ck)

        # Each frame is checked completely, then added into the round's running sum as it
        # arrives (the round's own streaming API, under its lock): the upload is never buffered.
        try:
            header, nbytes = ckks_wire.receive_upload(
                stream,
                lambda _: (taken[0].round, taken[0].lock),
                entry.site_id,
                max_chunk=lim.chunk_bytes,
                check_header=check,
            )
        except RejectedError as exc:
            if taken and taken[0].closed:
                raise RejectedError(
                    "FAILED_PRECONDITION",
                    f"the upload stage closed before the upload was added ({exc.message})",
                ) from exc
            raise
        except TaintedSumError as exc:
            # Frames of this upload are in the sum: the attempt fails at close and is run again.
            raise RejectedError("INVALID_ARGUMENT", str(exc)) from exc
        # A refusal now means the stage closed right after the upload was added: it is in the sum.
        with contextlib.suppress(RejectedError):
            self._call(self._coord.ckks_upload, entry.site_id, header.round_id)
        self._count(entry.site_id, nbytes, 0)
        return pb.Ack(round_id=header.round_id, phase="ckks_upload")
