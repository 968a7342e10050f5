"""The server's gRPC handlers: authentication, limits, (de)serialisation, streaming.

A mixin of :class:`secure_fl.transport.server.FederationServer`. Each handler identifies the
caller by its client certificate (:class:`.tls.Authenticator`), admits it through the per-site
limiter, parses and checks the message's form (sizes, finiteness, structure), then hands it to the
coordinator under the server's lock; the coordinator decides whether the stage takes it. A
refusal is a gRPC status (:class:`.errors.RejectedError`), logged, and the round goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from secure_fl.secagg import ServerPhase
from secure_fl.secagg.messages import ClientMessage
from secure_fl.transport import convert, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import FEDERATION_PROTOCOL, RosterEntry
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.server_uploads import UploadHandlers

if TYPE_CHECKING:
    import threading

    from secure_fl.transport.config import ServerConfig
    from secure_fl.transport.coordinator import Coordinator
    from secure_fl.transport.limits import SiteLimiter
    from secure_fl.transport.logs import EventLog
    from secure_fl.transport.tls import Authenticator

SERVICE = "secure_fl.federation.v1.Federation"
M = TypeVar("M", bound=Message)
Unary = Callable[[RosterEntry, bytes, grpc.ServicerContext], Message]
StreamIn = Callable[[RosterEntry, Iterator[bytes], grpc.ServicerContext], Message]


def _parse(cls: type[M], raw: bytes) -> M:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise RejectedError("INVALID_ARGUMENT", f"malformed {cls.__name__} message") from exc


class ServiceHandlers(UploadHandlers):
    """The handlers (see the module docstring); the server provides the attributes below."""

    config: ServerConfig
    log: EventLog
    session: bytes
    _auth: Authenticator
    _limiter: SiteLimiter
    _cond: threading.Condition
    _coord: Coordinator
    _clock: Callable[[], float]
    _ckks_public: Any
    _model: tensors.Tensors
    _blob: bytes
    _digest: bytes
    _model_chunks: list[bytes]
    _downloads: int

    def _receive(
        self, stream: Iterable[bytes], check: Callable[[pb.PayloadHeader], None]
    ) -> tuple[pb.PayloadHeader, bytearray, int]:
        raise NotImplementedError  # the server's (kept there: tests patch its receive_raw)

    def _handlers(self) -> grpc.GenericRpcHandler:
        def ser(message: Message) -> bytes:
            return message.SerializeToString()

        unary: dict[str, Unary] = {
            "Join": self._join,
            "Poll": self._poll,
            "ReportUpdateReady": self._report_ready,
            "ReportMetrics": self._report_metrics,
            "SendAdvertiseKeys": self._advertise,
            "SendRevealNonce": self._reveal,
            "SendShareKeys": self._share_keys,
            "SendConsistencySignature": self._consistency,
            "SendUnmaskResponse": self._unmask,
        }
        streams_in: dict[str, StreamIn] = {
            "UploadMaskedInput": self._upload_masked,
            "UploadUpdate": self._upload_update,
            "UploadCiphertext": self._upload_ciphertext,
        }
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for name, fn in unary.items():
            methods[name] = grpc.unary_unary_rpc_method_handler(
                self._guard_unary(name, fn), request_deserializer=None, response_serializer=ser
            )
        for name, sfn in streams_in.items():
            methods[name] = grpc.stream_unary_rpc_method_handler(
                self._guard_stream(name, sfn), request_deserializer=None, response_serializer=ser
            )
        # Model chunks are serialised by iter_chunk_bytes (one copy of the data).
        methods["DownloadModel"] = grpc.unary_stream_rpc_method_handler(
            self._download, request_deserializer=None, response_serializer=None
        )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _count(self, site: int, received: int, sent: int, *, model: bool = False) -> None:
        with self._cond:
            self._coord.count(site, received, sent, model=model)

    def _reject(
        self, context: grpc.ServicerContext, method: str, who: str, r: RejectedError
    ) -> NoReturn:
        with self._cond:
            self._coord.rejected()
        self.log.warning("rejected", method=method, site=who, code=r.code, reason=r.message)
        context.abort(getattr(grpc.StatusCode, r.code), r.message)

    def _guard_unary(
        self, method: str, fn: Unary
    ) -> Callable[[bytes, grpc.ServicerContext], Message]:
        def handler(raw: bytes, context: grpc.ServicerContext) -> Message:
            who = "?"
            try:
                entry = self._auth.identify(context)
                who = entry.name
                with self._limiter.admit(entry.name):
                    reply = fn(entry, raw, context)
                self._count(entry.site_id, len(raw), reply.ByteSize())
                return reply
            except RejectedError as r:
                self._reject(context, method, who, r)

        return handler

    def _guard_stream(
        self, method: str, fn: StreamIn
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], Message]:
        def handler(stream: Iterator[bytes], context: grpc.ServicerContext) -> Message:
            who = "?"
            try:
                entry = self._auth.identify(context)
                who = entry.name
                with self._limiter.admit(entry.name):
                    return fn(entry, stream, context)
            except RejectedError as r:
                self._reject(context, method, who, r)

        return handler

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args, now)`` under the lock, waking the driver and the long polls."""
        with self._cond:
            result = fn(*args, self._clock())
            self._cond.notify_all()
        return result

    # -- control ------------------------------------------------------------------------------

    def _join(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        request = _parse(pb.JoinRequest, raw)
        if request.protocol_version != FEDERATION_PROTOCOL:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"protocol {request.protocol_version!r} is not supported; this server speaks "
                f"{FEDERATION_PROTOCOL!r}",
            )
        rejoined = self._call(self._coord.join, entry.site_id)
        self.log.info("join", site=entry.name, rejoin=rejoined, version=request.software_version)
        lim, d = self.config.limits, self.config.deadlines
        return pb.JoinReply(
            federation=self.config.federation,
            session=self.session,
            site_id=entry.site_id,
            site_name=entry.name,
            next_round=self._coord.completed,
            rounds=self.config.rounds,
            max_chunk_bytes=lim.chunk_bytes,
            poll_wait_ms=int(d.poll_wait_s * 1000),
        )

    def _poll(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        request = _parse(pb.PollRequest, raw)
        if request.session != self.session:
            raise RejectedError("FAILED_PRECONDITION", "unknown session: join again")
        wait = min(request.wait_ms / 1000.0, self.config.deadlines.poll_wait_s)
        deadline = self._clock() + wait
        with self._cond:
            while True:
                now = self._clock()
                inst = self._coord.poll(entry.site_id, request.attempt, request.next_index, now)
                if inst is not None:
                    return inst
                remaining = deadline - now
                if remaining <= 0 or self._coord.stopping or not context.is_active():
                    return pb.Instruction(wait=pb.Wait())
                self._cond.wait(min(remaining, 1.0))

    def _download(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        who = "?"
        try:
            entry = self._auth.identify(context)
            who = entry.name
            request = _parse(pb.ModelRequest, raw)
            with self._cond:
                self._coord.touch(entry.site_id, self._clock())
                chunks, digest = self._model_chunks, self._digest
            if request.model_sha256 != digest:
                raise RejectedError(
                    "FAILED_PRECONDITION", "the requested model is not the current global model"
                )
            with self._limiter.admit(entry.name):
                with self._cond:
                    self._downloads += 1
                try:
                    for chunk in chunks:
                        self._count(entry.site_id, 0, len(chunk), model=True)
                        yield chunk
                finally:
                    with self._cond:
                        self._downloads -= 1
                        self._cond.notify_all()
        except RejectedError as r:
            self._reject(context, "DownloadModel", who, r)

    def _report_ready(
        self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext
    ) -> Message:
        request = _parse(pb.UpdateReady, raw)
        self._call(self._coord.update_ready, entry.site_id, request.round_id, request.weight)
        return pb.Ack(round_id=request.round_id, phase="update")

    def _report_metrics(
        self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext
    ) -> Message:
        request = _parse(pb.SiteMetrics, raw)
        values = dict(request.metrics)
        self._call(
            self._coord.metrics, entry.site_id, request.round_id, values, int(request.samples)
        )
        self.log.info(
            "site-metrics-received",
            site=entry.name,
            round_id=request.round_id,
            samples=int(request.samples),
            **{f"metric_{k}": v for k, v in sorted(values.items())},
        )
        return pb.Ack(round_id=request.round_id, phase="metrics")

    # -- secure aggregation phases -------------------------------------------------------------

    def _deliver(
        self, entry: RosterEntry, phase: ServerPhase, message: ClientMessage, what: str
    ) -> Message:
        self._call(self._coord.secagg_message, entry.site_id, phase, message, what)
        return pb.Ack(round_id=message.round_id, phase=phase.value)

    def _n_sites(self) -> int:
        return len(self.config.roster)

    def _advertise(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        message = convert.advert_from_pb(_parse(pb.AdvertiseKeys, raw), entry.site_id)
        return self._deliver(entry, ServerPhase.COLLECT_KEYS, message, "AdvertiseKeys")

    def _reveal(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        message = convert.reveal_from_pb(_parse(pb.RevealNonce, raw), entry.site_id)
        return self._deliver(entry, ServerPhase.COLLECT_REVEALS, message, "RevealNonce")

    def _share_keys(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        message = convert.share_keys_from_pb(
            _parse(pb.ShareKeys, raw), entry.site_id, self._n_sites()
        )
        return self._deliver(entry, ServerPhase.COLLECT_SHARES, message, "ShareKeys")

    def _consistency(
        self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext
    ) -> Message:
        message = convert.signature_from_pb(_parse(pb.ConsistencySignature, raw), entry.site_id)
        return self._deliver(entry, ServerPhase.COLLECT_SIGNATURES, message, "ConsistencySignature")

    def _unmask(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        message = convert.unmask_from_pb(
            _parse(pb.UnmaskResponse, raw), entry.site_id, 2 * self._n_sites()
        )
        return self._deliver(entry, ServerPhase.COLLECT_UNMASK, message, "UnmaskResponse")

    def _upload_masked(
        self, entry: RosterEntry, stream: Iterator[bytes], context: grpc.ServicerContext
    ) -> Message:
        def check(header: pb.PayloadHeader) -> None:
            if header.kind != pb.MASKED_INPUT:
                raise RejectedError(
                    "INVALID_ARGUMENT", "UploadMaskedInput carries MASKED_INPUT payloads"
                )
            with self._cond:
                cfg = self._coord.check_secagg(
                    entry.site_id,
                    ServerPhase.COLLECT_MASKED,
                    header.round_id,
                    "MaskedInput",
                    self._clock(),
                )
            if header.bits != cfg.bits or header.length != cfg.vector_length:
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    f"masked input must be {cfg.vector_length} values of {cfg.bits} bits, got "
                    f"{header.length} of {header.bits}",
                )
            if header.total_bytes != cfg.vector_length * cfg.bits // 8:
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    f"masked input must be {cfg.vector_length * cfg.bits // 8} bytes, got "
                    f"{header.total_bytes}",
                )

        header, data, nbytes = self._receive(stream, check)
        message = convert.masked_from_payload(header, data, entry.site_id)
        ack = self._deliver(entry, ServerPhase.COLLECT_MASKED, message, "MaskedInput")
        self._count(entry.site_id, nbytes, 0)
        return ack
