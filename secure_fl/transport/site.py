"""A site process: joins the federation over mutual TLS, polls for instructions and sends what
its sans-IO driver (:class:`~secure_fl.transport.site_driver.SiteDriver`) answers.

This module is the thin gRPC shell: connection, Join / Poll, model download, sending replies,
reconnecting. Every decision is the driver's (:mod:`.site_driver`, :mod:`.site_secagg`,
:mod:`.site_ckks`, :mod:`.site_model`), so it is tested without sockets. Guarantees:

* The site talks only to a server whose certificate chains to the federation's CA and names the
  configured ``server_name``; it presents its own certificate (its identity). A TLS verification
  failure (the server's certificate not signed by this site's CA, or this site's certificate
  refused by the server's) is fatal: one ERROR line naming the CA file and the peer, exit
  :data:`EXIT_TLS`, never retried (:func:`secure_fl.transport.tls.diagnose_handshake`).
* The plain update never leaves the site in secure aggregation: only the masked vector and the
  protocol messages do. The site checks the server's round configuration against its provisioned
  roster and its own policy (``config.policy``, :mod:`.policy`), including its privacy floor
  (distributed DP, :mod:`.privacy`); a refused round is left without sending anything more.
* The site answers at most one unmasking request per round number unless the survivor set is the
  same (``state_dir/unmasked.json``), and releases its update for one model under one round id
  only (:mod:`.replay`, ``state_dir/contributions.json``); both hold across restarts.
* CKKS: nothing this site decrypts ever leaves it (nor do metrics computed on a decrypted
  model); an instruction it does not know is refused and logged, never acted on. A failed check
  on secret values fails closed: ``state_dir/FAIL-CLOSED.json``, exit :data:`EXIT_FAIL_CLOSED`,
  and the site refuses to start while the marker exists.
* A protocol violation by the server ends this site's part in the round; the site keeps polling
  and joins the next round. When the server is unreachable the site reconnects with back-off
  until ``reconnect_timeout_s`` passes.

Exit status of :meth:`SiteRunner.run`: 0 when the federation finished, 3 when the server refuses
this site's identity, 4 when the server stayed unreachable too long, 5 when the federation
stopped after 0 rounds (nothing trained; no final model is written), 6 when the site failed
closed or refuses to start because the marker exists, 7 on a TLS verification failure.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from secure_fl import __version__
from secure_fl.crypto import SigningKey
from secure_fl.errors import RemoteProtocolError
from secure_fl.transport import logs, policy, tls
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport._generated.federation_pb2_grpc import FederationStub
from secure_fl.transport.chunks import PayloadReceiver, iter_chunk_bytes
from secure_fl.transport.config import SiteConfig
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.provision import load_signing_key
from secure_fl.transport.site_driver import (
    EXIT_FAIL_CLOSED,
    EXIT_FINISHED,
    EXIT_NOT_TRAINED,
    EXIT_REFUSED,
    EXIT_TLS,
    EXIT_UNREACHABLE,
    FAIL_CLOSED_MARKER,
    FailClosedError,
    SiteDriver,
)
from secure_fl.transport.site_replies import Call, Reply
from secure_fl.transport.site_round import RoundState
from secure_fl.transport.tasks import SiteTask, load_task
from secure_fl.transport.tensors import Tensors

__all__ = [
    "EXIT_FAIL_CLOSED",
    "EXIT_FINISHED",
    "EXIT_NOT_TRAINED",
    "EXIT_REFUSED",
    "EXIT_TLS",
    "EXIT_UNREACHABLE",
    "FAIL_CLOSED_MARKER",
    "SiteRunner",
    "channel_options",
    "run_site",
]

_CALL_TIMEOUT_S = 60.0
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None)
_UPLOADS = {
    "UploadUpdate": "upload_update",
    "UploadMaskedInput": "upload_masked",
    "UploadCiphertext": "upload_ciphertext",
}


class _RejoinError(Exception):
    """The server restarted or forgot this site: join again."""


class _RawCalls:
    """The chunk-stream calls with pre-serialised chunks (see ``chunks.iter_chunk_bytes``): the
    same wire messages as the generated stub sends, with fewer copies of large payloads."""

    def __init__(self, channel: grpc.Channel) -> None:
        path = "/secure_fl.federation.v1.Federation/"
        self.download: grpc.UnaryStreamMultiCallable[pb.ModelRequest, bytes] = channel.unary_stream(
            path + "DownloadModel",
            request_serializer=pb.ModelRequest.SerializeToString,
            response_deserializer=None,
        )
        self.upload_masked: grpc.StreamUnaryMultiCallable[bytes, pb.Ack] = channel.stream_unary(
            path + "UploadMaskedInput",
            request_serializer=None,
            response_deserializer=pb.Ack.FromString,
        )
        self.upload_update: grpc.StreamUnaryMultiCallable[bytes, pb.Ack] = channel.stream_unary(
            path + "UploadUpdate", request_serializer=None, response_deserializer=pb.Ack.FromString
        )
        self.upload_ciphertext: grpc.StreamUnaryMultiCallable[bytes, pb.Ack] = channel.stream_unary(
            path + "UploadCiphertext",
            request_serializer=None,
            response_deserializer=pb.Ack.FromString,
        )


def channel_options(config: SiteConfig) -> list[tuple[str, Any]]:
    """gRPC channel options of a site: the server's certificate name, message limits,
    keepalive, and no transparent retries (the site decides what to resend)."""
    lim = config.limits
    return [
        ("grpc.ssl_target_name_override", config.server_name),
        ("grpc.default_authority", config.server_name),
        ("grpc.max_receive_message_length", lim.max_message_bytes),
        ("grpc.max_send_message_length", lim.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 0),
    ]


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    if isinstance(exc, grpc.Call):
        return exc.code(), exc.details() or ""
    return None, str(exc)


class SiteRunner:
    """Runs one site until the federation is over (see the module docstring)."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        task: SiteTask | None = None,
        log: logs.EventLog | None = None,
        crash_hook: Callable[[str, int], None] | None = None,
        privacy: Any = None,
    ) -> None:
        """``crash_hook`` (tests only) is called with a step name of
        :data:`~secure_fl.transport.config.CRASH_POINTS` and the round id just before that step,
        e.g. to kill the process there. ``privacy``: the site's
        :class:`~secure_fl.transport.privacy.SitePrivacy` (default: built from the config)."""
        self.config = config
        self.log = log or logs.setup(f"site:{config.name}", config.log_file)
        signing_key: SigningKey | None = (
            load_signing_key(config.signing_key) if config.signing_key is not None else None
        )
        self.driver = SiteDriver(
            config,
            task=task if task is not None else load_task(config.task, config.name),
            log=self.log,
            signing_key=signing_key,
            crash_hook=crash_hook,
            privacy=privacy,
            fetch_errors=(grpc.RpcError,),
        )
        self._last_ok = time.monotonic()
        self._channel: grpc.Channel | None = None
        self._stub: FederationStub | None = None
        self._raw: _RawCalls | None = None
        self._max_chunk = config.limits.chunk_bytes
        if config.insecure_test_seed is not None:
            self.log.warning("insecure-test-seed", note="this site's randomness is reproducible")
        self.log.info("site-policy", **policy.describe(config.policy))

    @property
    def task(self) -> SiteTask:
        """The site's task (the driver's)."""
        return self.driver.task

    @task.setter
    def task(self, task: SiteTask) -> None:
        self.driver.task = task

    @property
    def _round(self) -> RoundState | None:
        return self.driver.round

    @property
    def _model(self) -> Tensors | None:
        return self.driver.models.model

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> FederationStub:
        if self._stub is None:
            self._channel = grpc.secure_channel(
                self.config.server,
                tls.channel_credentials(self.config.tls),
                options=channel_options(self.config),
            )
            self._stub = FederationStub(self._channel)
            self._raw = _RawCalls(self._channel)
        return self._stub

    def close(self) -> None:
        """Close the channel (the site can connect again)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None
            self._raw = None

    def run(self) -> int:
        """Join, poll and work until the federation is over (exit status in the module doc)."""
        if not self.driver.may_start():
            return EXIT_FAIL_CLOSED
        backoff = 0.2
        try:
            while True:
                began = self._last_ok
                try:
                    return self._session_loop()
                except FailClosedError:
                    return EXIT_FAIL_CLOSED
                except _RejoinError as exc:
                    self.log.info("rejoin", reason=str(exc))
                    self.driver.drop_round("rejoin")
                    time.sleep(0.05)
                    continue
                except grpc.RpcError as exc:
                    code, detail = _status(exc)
                    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                        self.log.error("refused", code=str(code), reason=detail)
                        return EXIT_REFUSED
                    mismatch = tls.diagnose_handshake(
                        detail, self.config.tls, self.config.server, self.config.server_name
                    )
                    if mismatch is not None:
                        self.log.error("tls-verification-failed", reason=mismatch)
                        return EXIT_TLS
                    self.driver.drop_round("connection lost")
                    if self._last_ok > began:  # the server was reachable in between
                        backoff = 0.2
                    if time.monotonic() - self._last_ok > self.config.reconnect_timeout_s:
                        self.log.error("unreachable", code=str(code), reason=detail)
                        return EXIT_UNREACHABLE
                    self.log.info("reconnecting", code=str(code), reason=detail, backoff=backoff)
                    time.sleep(backoff * (0.5 + random.random()))  # noqa: S311 - jitter only
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.close()

    def _ok(self) -> None:
        self._last_ok = time.monotonic()

    def _session_loop(self) -> int:
        stub = self._connect()
        reply = stub.Join(self.driver.join_request(__version__), timeout=_CALL_TIMEOUT_S)
        self._ok()
        self.driver.joined(reply)
        self._max_chunk = min(self.config.limits.chunk_bytes, reply.max_chunk_bytes or 1 << 20)
        while True:
            wait_s = self.driver.cursor.poll_wait_ms / 1000
            try:
                inst = stub.Poll(self.driver.poll_request(), timeout=wait_s + _CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                code, detail = _status(exc)
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise _RejoinError(detail or "session expired") from exc
                raise
            self._ok()
            try:
                step = self.driver.handle(inst, self._download)
                for reply_ in step.replies:
                    self._send(reply_)
            except grpc.RpcError as exc:
                code, detail = _status(exc)
                if code in _TRANSIENT:
                    raise
                self.driver.server_refused(str(code), detail)
                continue
            if step.exit_status is not None:
                return step.exit_status

    # -- I/O for the driver -------------------------------------------------------------------

    def _download(self, digest: bytes) -> bytes | bytearray | memoryview:
        """The payload of the model named ``digest`` (the driver checks its SHA-256). Errors:
        RemoteProtocolError for a stream the limits refuse; grpc.RpcError."""
        lim = self.config.limits

        def check(header: pb.PayloadHeader) -> None:
            if header.kind not in (pb.MODEL, pb.CKKS_MODEL):
                raise RemoteProtocolError("the model download is not a MODEL payload")

        self._connect()
        if self._raw is None:
            raise RemoteProtocolError("no connection to download the model")
        stream = self._raw.download(
            pb.ModelRequest(model_sha256=digest), timeout=_CALL_TIMEOUT_S * 10
        )
        receiver = PayloadReceiver(
            max_chunk=lim.max_message_bytes, max_total=lim.max_payload_bytes, check_header=check
        )
        try:
            for raw in stream:
                receiver.feed_raw(raw)
            _, data = receiver.result()
        except RejectedError as exc:
            raise RemoteProtocolError(f"model download rejected: {exc}") from exc
        self._ok()
        return data

    def _send(self, reply: Reply) -> None:
        stub = self._connect()
        if isinstance(reply, Call):
            try:
                getattr(stub, reply.rpc)(reply.message, timeout=_CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                code, detail = _status(exc)
                if not reply.optional or code in _TRANSIENT:
                    raise
                self.log.warning("reply-refused", rpc=reply.rpc, code=str(code), reason=detail)
        else:
            if self._raw is None:
                raise RemoteProtocolError("no connection to upload")
            upload = getattr(self._raw, _UPLOADS[reply.rpc])
            upload(
                iter_chunk_bytes(reply.header, reply.data, self._max_chunk),
                timeout=_CALL_TIMEOUT_S * 10,
            )
        self._ok()


def run_site(config: SiteConfig) -> int:
    """Run a site until the federation is over; returns the process exit status.

    Before the task loads torch, idle OpenMP threads are set to sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE`` unless set): with site processes sharing cores, spinning made a
    training round about 6x slower. The thread count is the task's (``task.options.threads``).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runner = SiteRunner(config)
    return runner.run()
