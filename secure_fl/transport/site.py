"""A site process: joins the federation over mutual TLS, polls for instructions, runs its task and
the SecAgg / SecAgg+ client (:class:`secure_fl.secagg.SecAggClient`) over the network.

Guarantees:

* The site talks only to a server whose certificate chains to the federation's CA and names the
  configured ``server_name``; it presents its own certificate (its identity).
* The plain update never leaves the site in secure aggregation: only the masked vector and the
  protocol messages do. The site checks the server's round configuration against its provisioned
  roster (every participant on the roster; in the active variant, the verification keys are the
  provisioned ones).
* The site answers at most one unmasking request per round number unless the survivor set is the
  same (recorded in ``state_dir/unmasked.json`` before answering, so it holds across restarts): a
  server that re-ran a round after a crash cannot obtain two sums over different survivor sets of
  the same inputs, which would reveal the difference.
* CKKS: nothing this site decrypts ever leaves it. The site downloads the encrypted global model
  and decrypts it itself (checking fingerprint, round, tensors, layout, at least two contributors
  and the value range), trains, and uploads only a fresh encryption of its new local model scaled
  by its normalised weight. It never decrypts anything for the server: an instruction it does not
  know (such as the removed CKKS decryption request of protocol versions before this one) is
  refused and logged, never acted on.
* A protocol violation by the server ends this site's part in the round (the client erases its
  secrets); the site keeps polling and joins the next round. When the server is unreachable the
  site reconnects with back-off until ``reconnect_timeout_s`` passes.

* The site pins its own policy (``config.policy``, :mod:`.policy`): an aggregation it does not
  accept (``plain`` unless explicitly allowed), the semi-honest variant unless it opted in, a
  threshold below the minimum it derives itself, or a vector length other than the pinned one is
  refused with a WARNING, and the site leaves the round without sending anything (no update, no
  weight for a refused aggregation, no advertisement for a refused configuration).
* Round ids must be fresh and a model's update is unmasked under one round id only
  (:mod:`.replay`, ``state_dir/contributions.json``), so the per-round unmask guard above cannot
  be sidestepped by renaming rounds. "One model" is decided by the content of the tensors the
  site loaded (or decrypted), not by the bytes served, so re-serialising a model does not help.
* CKKS fails closed: when a check whose outcome depends on secret values fails (the decrypted
  global model out of range, non-finite or not decrypting; this site's own new model beyond
  ``max_abs``; the task failing on a decrypted model), the site writes the marker
  ``state_dir/FAIL-CLOSED.json``, logs an ERROR that says why (no decrypted value), sends
  nothing more and exits with :data:`EXIT_FAIL_CLOSED`; while the marker exists it refuses to
  start. A per-round refusal would be a decryption oracle the server can steer; this way the
  server learns at most the round at which the site stopped, once.

Exit status of :meth:`SiteRunner.run`: 0 when the federation finished, 3 when the server refuses
this site's identity, 4 when the server stayed unreachable too long, 5 when the federation
stopped after 0 rounds (nothing trained; no final model is written), 6 when the site failed
closed (above) or refuses to start because the marker exists.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from secure_fl import __version__
from secure_fl.atomic import atomic_write
from secure_fl.crypto import SigningKey
from secure_fl.errors import (
    ConfigError,
    CryptoError,
    InvalidUpdateError,
    PolicyError,
    PostDecryptionError,
    ProtocolError,
    RemoteProtocolError,
)
from secure_fl.secagg import RevealNonce, SecAggClient
from secure_fl.secagg import SitePolicy as SecAggPolicy
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import convert, logs, policy, rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport._generated.federation_pb2_grpc import FederationStub
from secure_fl.transport.chunks import PayloadReceiver, iter_chunk_bytes
from secure_fl.transport.config import FEDERATION_PROTOCOL, SiteConfig
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.provision import load_signing_key
from secure_fl.transport.replay import ContributionGuard
from secure_fl.transport.tasks import SiteTask, TaskResult, check_result, load_task
from secure_fl.transport.tls import channel_credentials

EXIT_FINISHED = 0
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_TRAINED = 5
EXIT_FAIL_CLOSED = 6
#: In ``state_dir``: written when the site fails closed; the site refuses to start while it exists.
FAIL_CLOSED_MARKER = "FAIL-CLOSED.json"
_CALL_TIMEOUT_S = 60.0


class _RejoinError(Exception):
    """The server restarted or forgot this site: join again."""


class _FailClosedError(Exception):
    """Stop for good (the marker is written): nothing more is sent. Not a SecureFLError, so that
    no per-round handler can catch it."""


@dataclass
class _Round:
    """This site's state in one round attempt."""

    attempt: int
    round_id: int
    aggregation: str
    model_sha256: bytes = b""
    # tensors.content_digest of the model this round trains on: the key of the release guard.
    model_content: bytes = b""
    result: TaskResult | None = None
    client: SecAggClient | None = field(default=None, repr=False)
    bits: int = 32
    failed: bool = False
    # The federation round index (from 0, the same for every attempt) once RoundStart arrived.
    round_index: int = 0


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


class SiteRunner:
    """Runs one site until the federation is over (see the module docstring)."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        task: SiteTask | None = None,
        log: logs.EventLog | None = None,
        crash_hook: Callable[[str, int], None] | None = None,
    ) -> None:
        """``crash_hook`` (tests only) is called with a step name of
        :data:`~secure_fl.transport.config.CRASH_POINTS` and the round id just before that step,
        e.g. to kill the process there."""
        self.config = config
        self._crash_hook = crash_hook
        self.log = log or logs.setup(f"site:{config.name}", config.log_file)
        self.site_id = config.site_id
        self.task = task if task is not None else load_task(config.task, config.name)
        self.signing_key: SigningKey | None = (
            load_signing_key(config.signing_key) if config.signing_key is not None else None
        )
        self._roster = {e.site_id: e for e in config.roster}
        self._model: tensors.Tensors | None = None
        self._model_digest = b""
        self._model_content = b""
        self._model_decrypted = False
        self._round: _Round | None = None
        self._guard_path = config.state_dir / "unmasked.json"
        self._contributions = ContributionGuard(
            config.state_dir / "contributions.json", config.federation
        )
        self._planned_rounds = 0
        self._warned_two_sites = False
        self._ckks_secret: Any = None  # secure_fl.he.SecretContext, loaded on first use
        self._last_ok = time.monotonic()
        self._channel: grpc.Channel | None = None
        self._stub: FederationStub | None = None
        self._raw: _RawCalls | None = None
        self._session = b""
        self._poll_wait_ms = 10_000
        self._max_chunk = config.limits.chunk_bytes
        if config.insecure_test_seed is not None:
            self.log.warning("insecure-test-seed", note="this site's randomness is reproducible")
        self.log.info("site-policy", **policy.describe(config.policy))

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> FederationStub:
        if self._stub is None:
            self._channel = grpc.secure_channel(
                self.config.server,
                channel_credentials(self.config.tls),
                options=channel_options(self.config),
            )
            self._stub = FederationStub(self._channel)
            self._raw = _RawCalls(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None
            self._raw = None

    def run(self) -> int:
        """Join, poll and work until the federation is over (exit status in the module doc)."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        marker = self.config.state_dir / FAIL_CLOSED_MARKER
        if marker.exists():
            self.log.error(
                "fail-closed-marker",
                marker=str(marker),
                reason="this site stopped for good after a failed check on secret values; it "
                "does not rejoin until an operator has found out why and removed the marker",
            )
            return EXIT_FAIL_CLOSED
        backoff = 0.2
        try:
            while True:
                began = self._last_ok
                try:
                    return self._session_loop()
                except _FailClosedError:
                    return EXIT_FAIL_CLOSED
                except _RejoinError as exc:
                    self.log.info("rejoin", reason=str(exc))
                    self._drop_round("rejoin")
                    time.sleep(0.05)
                    continue
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                        self.log.error("refused", code=str(code), reason=detail)
                        return EXIT_REFUSED
                    self._drop_round("connection lost")
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
        reply = stub.Join(
            pb.JoinRequest(protocol_version=FEDERATION_PROTOCOL, software_version=__version__),
            timeout=_CALL_TIMEOUT_S,
        )
        self._ok()
        if reply.site_id != self.site_id or reply.site_name != self.config.name:
            raise ConfigError(
                f"the server knows this site as {reply.site_name!r} (id {reply.site_id}), the "
                f"config says {self.config.name!r} (id {self.site_id})"
            )
        self._session = reply.session
        self._poll_wait_ms = max(100, reply.poll_wait_ms)
        self._max_chunk = min(self.config.limits.chunk_bytes, reply.max_chunk_bytes or 1 << 20)
        self._planned_rounds = int(reply.rounds)
        self.log.info("joined", federation=reply.federation, next_round=reply.next_round)
        attempt, index = 0, 0
        while True:
            try:
                inst = stub.Poll(
                    pb.PollRequest(
                        session=self._session,
                        attempt=attempt,
                        next_index=index,
                        wait_ms=self._poll_wait_ms,
                    ),
                    timeout=self._poll_wait_ms / 1000 + _CALL_TIMEOUT_S,
                )
            except grpc.RpcError as exc:
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise _RejoinError(exc.details() or "session expired") from exc
                raise
            self._ok()
            kind = inst.WhichOneof("kind")
            if kind is None and self._refuse_unknown(inst):
                attempt, index = inst.attempt, inst.index + 1
                continue
            if kind == "wait" or kind is None:
                continue
            if kind == "finished":
                return self._finish(inst.finished)
            attempt, index = inst.attempt, inst.index + 1
            self._dispatch(kind, inst)

    # -- instructions -------------------------------------------------------------------------

    def _dispatch(self, kind: str, inst: pb.Instruction) -> None:
        rs = self._round
        if rs is None or rs.attempt != inst.attempt:
            if rs is not None:
                self._drop_round("a new attempt started")
            if kind != "round_start":
                if kind == "outcome":
                    self._on_outcome(inst)
                else:
                    self.log.info("skipping", instruction=kind, attempt=inst.attempt)
                return
            rs = self._round = _Round(
                inst.attempt,
                inst.round_id,
                inst.round_start.aggregation,
                bytes(inst.round_start.model_sha256),
            )
        try:
            if kind == "round_start":
                self._on_round_start(rs, inst.round_start)
            elif kind == "outcome":
                self._on_outcome(inst)
            elif rs.failed:
                self.log.info(
                    "skipping", instruction=kind, round=rs.round_index + 1, round_id=rs.round_id
                )
            elif kind == "secagg_setup":
                self._on_setup(rs, inst.secagg_setup)
            elif kind in (
                "key_roster",
                "reveal_set",
                "share_delivery",
                "consistency_request",
                "unmask_request",
            ):
                self._on_secagg(rs, kind, inst)
            elif kind == "ckks_setup":
                self._on_ckks_setup(rs, inst.ckks_setup)
            else:
                self.log.warning("unsupported-instruction", instruction=kind)
                rs.failed = True
        except PolicyError as exc:
            # The server asked for something this site's own policy refuses: leave the round
            # without sending anything more.
            rs.failed = True
            rs.client = None
            rs.result = None
            self.log.warning(
                "policy-refused",
                round=rs.round_index + 1,
                round_id=rs.round_id,
                instruction=kind,
                reason=str(exc),
            )
        except ProtocolError as exc:
            rs.failed = True
            rs.client = None
            self.log.error(
                "protocol-error",
                round=rs.round_index + 1,
                round_id=rs.round_id,
                instruction=kind,
                reason=str(exc),
            )
        except (InvalidUpdateError, ConfigError, RejectedError, CryptoError) as exc:
            rs.failed = True
            rs.client = None
            self.log.error(
                "round-error",
                round=rs.round_index + 1,
                round_id=rs.round_id,
                instruction=kind,
                reason=str(exc),
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
                raise
            rs.failed = True
            rs.client = None
            detail = exc.details() if isinstance(exc, grpc.Call) else ""
            self.log.warning(
                "refused-by-server",
                round=rs.round_index + 1,
                round_id=rs.round_id,
                code=str(code),
                reason=detail,
            )

    def _drop_round(self, reason: str) -> None:
        if self._round is not None:
            self.log.info("left-round", round=self._round.round_id, reason=reason)
        self._round = None

    def _fail_closed(self, reason: str) -> NoReturn:
        """Stop for good: write the marker (before anything else), log why, raise
        _FailClosedError (the caller sends nothing more; :meth:`run` returns
        :data:`EXIT_FAIL_CLOSED`). ``reason`` must hold no decrypted or secret value."""
        rs = self._round
        where: dict[str, Any] = (
            {"round": rs.round_index + 1, "round_id": rs.round_id} if rs is not None else {}
        )
        marker = self.config.state_dir / FAIL_CLOSED_MARKER
        atomic_write(
            marker,
            json.dumps(
                {
                    "federation": self.config.federation,
                    **where,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "reason": reason,
                    "to_resume": "find out why (a tampered or corrupted model from the server, or "
                    "a diverging local model), then remove this file",
                },
                indent=2,
            ),
        )
        self.log.error(
            "fail-closed",
            **where,
            reason=reason,
            marker=str(marker),
            exit_status=EXIT_FAIL_CLOSED,
            note="a check on secret values failed; refusing only this round would let the "
            "server probe them one bit per round, so this site stops for good",
        )
        raise _FailClosedError(reason)

    def _crash_point(self, point: str, round_id: int) -> None:
        """Call the injected test hook (``crash_hook``) just before step ``point``."""
        if self._crash_hook is not None:
            self._crash_hook(point, round_id)

    def _refuse_unknown(self, inst: pb.Instruction) -> bool:
        """An instruction of a kind this site does not know (for example the CKKS decryption
        request that protocol versions before this one sent): refuse it, never act on it. Returns
        True when ``inst`` was such an instruction (False for an empty one, a plain wait)."""
        from google.protobuf.unknown_fields import UnknownFieldSet

        fields = UnknownFieldSet(inst)
        unknown = sorted({fields[i].field_number for i in range(len(fields))})
        if not unknown:
            return False
        rs = self._round
        if rs is not None and rs.attempt == inst.attempt:
            rs.failed = True
            rs.result = None
        self.log.warning(
            "refused-unknown-instruction",
            round_id=inst.round_id,
            fields=unknown,
            reason="an instruction this site does not know is never acted on (nothing decrypted "
            "is ever sent to the server)",
        )
        return True

    def _ensure_model(
        self, digest: bytes, *, encrypted_round: int | None = None
    ) -> tensors.Tensors:
        """The global model named by ``digest``: downloaded, and decrypted here when it is the
        encrypted CKKS model (which must be the result of round ``encrypted_round``). A decrypted
        model stays at this site."""
        if self._model is not None and self._model_digest == digest:
            return self._model
        lim = self.config.limits

        def check(header: pb.PayloadHeader) -> None:
            if header.kind not in (pb.MODEL, pb.CKKS_MODEL):
                raise RemoteProtocolError("the model download is not a MODEL payload")

        self._connect()
        assert self._raw is not None
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
        # The receiver checked the data against the trailer's SHA-256; it must be the one asked.
        if receiver.digest != digest:
            raise RemoteProtocolError("the downloaded model does not match its SHA-256")
        if bytes(data[: len(ckks_wire.MODEL_MAGIC)]) == ckks_wire.MODEL_MAGIC:
            # The encrypted global model: decrypted here, for this site only.
            try:
                model = ckks_wire.decrypt_model(
                    self._secret(),
                    data,
                    expected_round=encrypted_round,
                    expected_structure=(
                        ckks_wire.structure_of(self._model) if self._model is not None else None
                    ),
                    expected_size=self.config.policy.vector_length,
                )
                content = tensors.content_digest(model)
            except (PostDecryptionError, InvalidUpdateError) as exc:
                self._fail_closed(str(exc))
            decrypted = True
            self.log.info(
                "ckks-model-decrypted", round_id=encrypted_round, note="kept at this site"
            )
        else:
            model = tensors.loads(data)
            try:
                content = tensors.content_digest(model)
            except InvalidUpdateError as exc:
                raise RemoteProtocolError(f"the global model is refused: {exc}") from None
            decrypted = False
        self._model, self._model_content, self._model_decrypted = model, content, decrypted
        self._model_digest = digest
        self._ok()
        return self._model

    def _on_round_start(self, rs: _Round, start: pb.RoundStart) -> None:
        rs.round_index = int(start.round_index)
        self.log.info(
            "round-start",
            round=rs.round_index + 1,
            round_id=rs.round_id,
            attempt=rs.attempt,
            aggregation=start.aggregation,
        )
        # Before anything is computed or sent: the aggregation must be one this site accepts,
        # the round id fresh and the model not already released under another round id.
        policy.check_aggregation(self.config.policy, start.aggregation)
        self._contributions.check_fresh(rs.round_id)
        self._crash_point("update", rs.round_id)
        if start.aggregation == "ckks":
            self._secret()  # no context, or the wrong one: do not report a weight at all
        if start.model_round_id >= rs.round_id > 0:
            raise RemoteProtocolError(
                f"the model is announced as the result of round {start.model_round_id}, not of "
                f"a round before {rs.round_id}"
            )
        # Round ids are fresh per attempt: the model's round is announced, not round_id - 1.
        model = self._ensure_model(start.model_sha256, encrypted_round=start.model_round_id)
        # "The same model" by content, not by the bytes served (replay.py): still before anything
        # is computed or sent.
        rs.model_content = self._model_content
        self._contributions.check_fresh(rs.round_id, rs.model_content)
        t0 = time.perf_counter()
        try:
            try:
                raw_result = self.task.compute_update(model, rs.round_index)
            except Exception as exc:  # a task bug must not take the site process down
                raise InvalidUpdateError(f"the task failed: {type(exc).__name__}: {exc}") from exc
            result = check_result(raw_result, model)
            if start.aggregation == "ckks":
                ckks_wire.check_local_model(
                    self._secret(), ckks_wire.local_model_vector(model, result.update)
                )
        except PostDecryptionError as exc:
            self._fail_closed(str(exc))
        except InvalidUpdateError as exc:
            if start.aggregation == "ckks" and self._model_decrypted:
                # Whether training on a decrypted model fails depends on the decrypted values.
                self._fail_closed(
                    "the task or its result check failed on the decrypted global model "
                    f"({type(exc.__cause__ or exc).__name__}; details are not logged)"
                )
            raise
        rs.result = result
        self.log.info(
            "update-computed",
            round=rs.round_index + 1,
            round_id=rs.round_id,
            seconds=round(time.perf_counter() - t0, 3),
            weight=result.weight,
            **{f"metric_{k}": v for k, v in result.metrics.items()},
        )
        stub = self._connect()
        self._contributions.record_round(rs.round_id)
        if start.aggregation in ("secagg", "secagg+", "ckks"):
            stub.ReportUpdateReady(
                pb.UpdateReady(round_id=rs.round_id, weight=float(result.weight)),
                timeout=_CALL_TIMEOUT_S,
            )
        elif start.aggregation == "plain":
            header = pb.PayloadHeader(
                kind=pb.PLAIN_UPDATE,
                round_id=rs.round_id,
                length=len(result.update),
                weight=float(result.weight),
            )
            assert self._raw is not None
            self._raw.upload_update(
                iter_chunk_bytes(header, tensors.dumps(result.update), self._max_chunk),
                timeout=_CALL_TIMEOUT_S * 10,
            )
        else:
            raise ConfigError(f"aggregation {start.aggregation!r} is not supported by this site")
        self._ok()

    def _check_setup_against_roster(self, config: Any) -> None:
        for sid in config.site_ids:
            if sid not in self._roster:
                raise RemoteProtocolError(f"the round names site {sid}, which is not on the roster")
        if self.site_id not in config.site_ids:
            raise RemoteProtocolError("this site is not in the round configuration")
        if config.active:
            for sid, key in (config.verify_keys or {}).items():
                if self._roster[sid].verify_key != key:
                    raise RemoteProtocolError(
                        f"the verification key of site {sid} differs from the provisioned one"
                    )

    def _on_setup(self, rs: _Round, setup: pb.SecAggSetup) -> None:
        if rs.result is None or self._model is None:
            raise RemoteProtocolError("secure-aggregation setup before this site's update")
        config, codec = convert.setup_from_pb(
            setup, rs.round_id, max_length=self.config.limits.max_vector_length
        )
        self._check_setup_against_roster(config)
        # Our weight is our share of the listed (reported) weights, computed here; the list and
        # the codec are bound into every key and signature of the round (config.binding), so a
        # server cannot scale our update up and the others' down to isolate it.
        weight = rounds.own_weight(
            convert.setup_weights(setup), self.site_id, float(rs.result.weight), setup.weight
        )
        policy.check_secagg_round(
            self.config.policy,
            announced=rs.aggregation,
            protocol=config.protocol,
            active=config.active,
            num_sites=len(config.site_ids),
            k=config.degree,
            threshold=config.threshold,
            vector_length=config.vector_length,
            model_length=rounds.model_size(self._model),
            roster_size=len(self._roster),
        )
        if config.active and self.signing_key is None:
            raise ConfigError("the active variant needs signing_key in the site config")
        if len(config.site_ids) == 2 and not self._warned_two_sites:
            self._warned_two_sites = True
            self.log.warning(
                "two-site-round",
                note="with two parties each can derive the other's update from the mean",
            )
        seed = self.config.insecure_test_seed
        values, clipped = rounds.encode_update(
            rs.result.update,
            self._model,
            codec,
            weight,
            rounds.encoding_rng(seed, self.site_id, rs.round_id),
        )
        rs.result = None  # the plain update is not kept past encoding
        rs.bits = config.bits
        rs.client = SecAggClient(
            self.site_id,
            config,
            # The core enforces the same threshold / variant policy (defence in depth).
            policy=SecAggPolicy(
                corrupt_fraction=policy.round_corrupt_fraction(
                    self.config.policy.corrupt_fraction, len(config.site_ids), len(self._roster)
                ),
                require_active=self.config.policy.require_active,
            ),
            input_vector=values,
            signing_key=self.signing_key,
            randbytes=rounds.site_randbytes(seed, self.site_id, rs.round_id),
        )
        self.log.info(
            "secagg-setup",
            round=rs.round_index + 1,
            round_id=rs.round_id,
            protocol=config.protocol,
            sites=len(config.site_ids),
            threshold=config.threshold,
            bits=config.bits,
            clipped=clipped,
        )
        self._crash_point("advertise", rs.round_id)
        advert = rs.client.start()
        self._connect().SendAdvertiseKeys(convert.advert_to_pb(advert), timeout=_CALL_TIMEOUT_S)
        self._ok()

    def _on_secagg(self, rs: _Round, kind: str, inst: pb.Instruction) -> None:
        client = rs.client
        if client is None:
            raise RemoteProtocolError(f"{kind} before the secure-aggregation setup")
        stub = self._connect()
        if kind in ("key_roster", "reveal_set"):
            message = (
                convert.roster_from_pb(inst.key_roster)
                if kind == "key_roster"
                else convert.reveal_set_from_pb(inst.reveal_set)
            )
            reply = client.handle(message)
            if isinstance(reply, RevealNonce):  # a sparse graph: reveal before sharing keys
                stub.SendRevealNonce(convert.reveal_to_pb(reply), timeout=_CALL_TIMEOUT_S)
            else:
                self._crash_point("share_keys", rs.round_id)
                stub.SendShareKeys(convert.share_keys_to_pb(reply), timeout=_CALL_TIMEOUT_S)
        elif kind == "share_delivery":
            masked = client.handle(convert.delivery_from_pb(inst.share_delivery))
            self._crash_point("masked_input", rs.round_id)
            header = pb.PayloadHeader(
                kind=pb.MASKED_INPUT,
                round_id=rs.round_id,
                length=int(masked.vector.shape[0]),
                bits=rs.bits,
            )
            data = convert.masked_to_bytes(masked, rs.bits)
            assert self._raw is not None
            self._raw.upload_masked(
                iter_chunk_bytes(header, data, self._max_chunk), timeout=_CALL_TIMEOUT_S * 10
            )
        elif kind == "consistency_request":
            reply = client.handle(convert.consistency_from_pb(inst.consistency_request))
            stub.SendConsistencySignature(convert.signature_to_pb(reply), timeout=_CALL_TIMEOUT_S)
        else:
            request = convert.unmask_request_from_pb(inst.unmask_request)
            self._guard_unmask(rs.round_id, request.survivors)
            self._contributions.record_release(rs.round_id, rs.model_content)
            self._crash_point("unmask", rs.round_id)
            reply = client.handle(request)
            stub.SendUnmaskResponse(convert.unmask_to_pb(reply), timeout=_CALL_TIMEOUT_S)
            rs.client = None
        self._ok()
        self.log.info("answered", round=rs.round_index + 1, round_id=rs.round_id, instruction=kind)

    def _guard_unmask(self, round_id: int, survivors: frozenset[int]) -> None:
        """Refuse a second unmasking of ``round_id`` with another survivor set (module doc)."""
        path = self._guard_path
        what = "unmask"
        record: dict[str, Any] = {}
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path} is unreadable: {exc}") from exc
        fed = record.setdefault(self.config.federation, {})
        previous = fed.get(str(round_id))
        if previous is not None and sorted(previous) != sorted(survivors):
            raise RemoteProtocolError(
                f"the server asks to {what} round {round_id} again with another survivor set; "
                "answering would reveal the difference of two sums"
            )
        fed[str(round_id)] = sorted(survivors)
        atomic_write(path, json.dumps(record))

    # -- CKKS ---------------------------------------------------------------------------------

    def _secret(self) -> Any:
        """The federation's secret context (loaded once; fingerprint checked). ConfigError."""
        if self._ckks_secret is None:
            self._ckks_secret = ckks_wire.load_secret(self.config.ckks)
        return self._ckks_secret

    def _check_ckks_round(self, context_sha256: bytes, vector_length: int, what: str) -> Any:
        secret = self._secret()
        if context_sha256 != ckks_wire.fingerprint_bytes(secret.fingerprint):
            raise RemoteProtocolError(
                f"{what}: the server's CKKS context {context_sha256.hex()[:16]}... is not the "
                f"federation's {secret.fingerprint[:16]}..."
            )
        if self._model is None or vector_length != rounds.model_size(self._model):
            raise RemoteProtocolError(f"{what}: the vector length is not the model's size")
        return secret

    def _on_ckks_setup(self, rs: _Round, setup: pb.CkksSetup) -> None:
        """Encrypt this site's new local model (global + update) scaled by its normalised weight,
        with fresh randomness, and upload the ciphertexts: the only CKKS data this site sends."""
        if rs.result is None or self._model is None:
            raise RemoteProtocolError("CKKS setup before this site's update")
        secret = self._check_ckks_round(setup.context_sha256, setup.vector_length, "CkksSetup")
        preset = secret.preset
        if setup.poly_modulus_degree != preset.poly_modulus_degree or setup.scale != preset.scale:
            raise RemoteProtocolError("CkksSetup: the parameters are not the federation's")
        if not 0 < setup.weight <= 1:
            raise RemoteProtocolError(f"CkksSetup: weight {setup.weight!r} is not in (0, 1]")
        if not 1 <= setup.chunk_ciphertexts <= ckks_wire.MAX_CHUNK_CIPHERTEXTS:
            raise RemoteProtocolError("CkksSetup: chunk_ciphertexts out of range")
        vector = ckks_wire.local_model_vector(self._model, rs.result.update)
        rs.result = None  # the plain update is not kept past encryption
        t0 = time.perf_counter()
        try:
            payload, layout = ckks_wire.encrypt_local_model(
                secret,
                vector,
                weight=float(setup.weight),
                round_id=rs.round_id,
                chunk_ciphertexts=int(setup.chunk_ciphertexts),
                site=self.config.name,
            )
        except InvalidUpdateError:
            # Checked before the weight was reported (check_local_model); a failure here still
            # depends on secret values.
            self._fail_closed("this site's new local model failed the CKKS range check")
        del vector
        self.log.info(
            "ckks-encrypted",
            round=rs.round_index + 1,
            round_id=rs.round_id,
            ciphertexts=layout.ciphertexts,
            frames=layout.chunks,
            bytes=len(payload),
            seconds=round(time.perf_counter() - t0, 3),
        )
        self._crash_point("ckks_upload", rs.round_id)
        header = pb.PayloadHeader(
            kind=pb.CKKS_CIPHERTEXT,
            round_id=rs.round_id,
            length=layout.chunks,
            ckks=pb.CkksPayloadInfo(
                context_sha256=setup.context_sha256,
                ciphertexts=layout.ciphertexts,
                weight=setup.weight,
            ),
        )
        self._connect()
        assert self._raw is not None
        self._raw.upload_ciphertext(
            iter_chunk_bytes(header, payload, self._max_chunk), timeout=_CALL_TIMEOUT_S * 10
        )
        self._ok()
        self.log.info(
            "answered", round=rs.round_index + 1, round_id=rs.round_id, instruction="ckks_setup"
        )

    def _on_outcome(self, inst: pb.Instruction) -> None:
        out = inst.outcome
        rs = self._round
        where = {"round": rs.round_index + 1} if rs is not None else {}
        self.log.info(
            "round-outcome",
            **where,
            round_id=inst.round_id,
            completed=out.completed,
            survivors=list(out.survivors),
            dropped=list(out.dropped),
            reason=out.reason,
        )
        self._round = None

    def _finish(self, finished: pb.Finished) -> int:
        if finished.rounds_completed == 0:
            # Nothing was trained: do not write the initial model as if it were a result.
            self.log.error(
                "federation-not-trained",
                reason="the federation stopped after 0 rounds; no model was trained",
                planned=self._planned_rounds,
            )
            return EXIT_NOT_TRAINED
        self.log.info("federation-finished", rounds=finished.rounds_completed)
        out = self.config.output_model
        if out is not None and finished.model_sha256:
            try:
                model = self._ensure_model(
                    finished.model_sha256, encrypted_round=finished.model_round_id
                )
            except (grpc.RpcError, ProtocolError, CryptoError, ConfigError) as exc:
                self.log.warning("final-model-unavailable", reason=str(exc))
            else:
                atomic_write(out, tensors.dumps(model))
                self.log.info("final-model-written", path=str(out))
        return EXIT_FINISHED


def run_site(config: SiteConfig) -> int:
    """Run a site until the federation is over; returns the process exit status.

    Before the task loads torch, idle OpenMP threads are set to sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE`` unless set): with site processes sharing cores, spinning made a
    training round about 6x slower. The thread count is the task's (``task.options.threads``).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runner = SiteRunner(config)
    return runner.run()
