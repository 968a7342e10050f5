"""The federation server: gRPC over mutual TLS, a round driver with deadlines, checkpoints.

Guarantees:

* **Identity.** Every call is authenticated by the client certificate (:mod:`.tls`): the TLS
  handshake needs a certificate from the federation's CA, and the certificate's name must be on
  the roster (and match its pinned fingerprint). Message fields never name the sender.
* **Rounds.** The driver thread runs the rounds one after the other: it invites the live sites,
  collects their updates (or, for secure aggregation, their weights) until the update deadline,
  then runs SecAgg / SecAgg+ (:class:`secure_fl.secagg.SecAggServer`) phase by phase. A phase
  closes when every expected site answered or at its deadline; a site that misses it is a dropout
  for the protocol, which recovers the sum of the others while at least the threshold remain.
* **CKKS.** With ``ckks`` the server holds only the public context (it refuses to start with the
  secret one) and never receives anything decrypted: it collects each site's complete, checked
  ciphertext upload (its encrypted, weight-scaled new local model), adds the uploads of the sites
  that completed theirs chunk by chunk (a partial upload is discarded, never added), and the sum
  *is* the new global model, encrypted. Every site downloads and decrypts it itself
  (:mod:`.ckks`); the server's checkpoint and final model are ciphertexts.
* **Bad messages do not disturb a round.** A malformed, oversized, out-of-phase, duplicate or
  wrongly addressed message is refused with a gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
  FAILED_PRECONDITION, PERMISSION_DENIED) and the round goes on.
* **Nothing finished is lost.** After each completed round the model, the round number, the
  history and the ledger state are checkpointed atomically (:mod:`.checkpoint`); a restarted
  server resumes with the next round; sites rejoin by themselves. A round interrupted by a crash
  is run again from its start, with fresh keys.
* **Bounded resources.** Message size, HTTP/2 streams per connection, concurrent calls in total and
  per site, and a per-site call rate are limited (:class:`~secure_fl.transport.config.Limits`).

* **Fresh round ids.** Every attempt runs under a round id never used before by this federation
  (``state_dir/round_ids.json``, written before any site hears of it): sites refuse a round id
  that is not fresh. A round record is named by the federation round index and holds both.

The server also serves the standard gRPC health service (``grpc.health.v1.Health``) on the same
port, to rostered, authenticated sites only (:class:`.tls.RosterHealthServicer`), and writes
JSON-lines logs (:mod:`.logs`). A federation that stopped after 0 rounds exits 1 with an ERROR
event ``federation-not-trained``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_fl import __version__
from secure_fl.atomic import atomic_write
from secure_fl.errors import (
    ConfigError,
    CryptoError,
    InvalidUpdateError,
    ProtocolError,
    RemoteProtocolError,
)
from secure_fl.secagg import (
    ConsistencyRequest,
    KeyRoster,
    RevealSet,
    SecAggServer,
    ServerPhase,
    ShareDelivery,
    UnmaskRequest,
)
from secure_fl.secagg.messages import ClientMessage, ServerMessage
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import convert, logs, rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes, receive_raw
from secure_fl.transport.config import FEDERATION_PROTOCOL, RosterEntry, ServerConfig
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.limits import SiteLimiter
from secure_fl.transport.tls import Authenticator, RosterHealthServicer, server_credentials

SERVICE = "secure_fl.federation.v1.Federation"
M = TypeVar("M", bound=Message)


@dataclass
class _Site:
    entry: RosterEntry
    joined: bool = False
    last_seen: float = -math.inf
    attempt: int = 0
    queue: list[pb.Instruction] = field(default_factory=list)
    told_finished: bool = False


@dataclass
class _CkksRound:
    """The CKKS part of one attempt. Mutated only under the server's condition lock."""

    layout: Any  # secure_fl.he.Layout
    factors: dict[int, float]
    frames: dict[int, list[bytes]] = field(default_factory=dict)


@dataclass
class _Attempt:
    """One attempt at a round. Mutated only under the server's condition lock."""

    attempt: int
    round_id: int  # the protocol's round id: fresh for every attempt (sites refuse reuse)
    participants: dict[int, str]
    index: int = 0  # the federation round this attempt tries to complete
    stage: str = "update"  # update -> secagg -> done
    weights: dict[int, float] = field(default_factory=dict)
    plain_updates: dict[int, tensors.Tensors] = field(default_factory=dict)
    secagg: SecAggServer | None = None
    ckks: _CkksRound | None = None
    closing: bool = False
    excluded: set[int] = field(default_factory=set)
    bytes_in: dict[int, int] = field(default_factory=dict)
    bytes_out: dict[int, int] = field(default_factory=dict)
    rejected: int = 0
    model_bytes_out: int = 0


class _RoundFailedError(Exception):
    """A round attempt ended without a result (too few sites, a protocol abort)."""


def _parse(cls: type[M], raw: bytes) -> M:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise RejectedError("INVALID_ARGUMENT", f"malformed {cls.__name__} message") from exc


class FederationServer:
    """The federation server process (see the module docstring).

    Use: ``server = FederationServer(config); server.start(); status = server.wait()``.
    :meth:`start` binds the port (``listen`` may use port 0: the bound address is in
    :attr:`address` and in ``state_dir/endpoint.json``) and starts the driver thread;
    :meth:`wait` returns once the federation is finished (0) or has failed (1).

    Errors: ConfigError at construction or start (bad config, unreadable keys, a checkpoint of
    another federation, an aggregation this server does not run).
    """

    def __init__(self, config: ServerConfig, log: logs.EventLog | None = None) -> None:
        self._ckks_public: Any = None  # secure_fl.he.PublicContext
        if config.aggregation.protocol == "ckks":
            # Refuses a secret context in every form, and a fingerprint other than the config's.
            self._ckks_public = ckks_wire.load_public(config.ckks)
        if config.aggregation.active and any(e.verify_key is None for e in config.roster):
            raise ConfigError("aggregation.active needs a verify_key for every roster entry")
        self.config = config
        self.log = log or logs.setup("server", config.log_file)
        self.session = os.urandom(16)
        self.address = ""
        self._auth = Authenticator(config.roster)
        lim = config.limits
        self._limiter = SiteLimiter(
            rate_per_s=lim.rate_per_s, burst=lim.burst, concurrency=lim.per_site_concurrency
        )
        self._cond = threading.Condition()
        self._sites = {e.site_id: _Site(e) for e in config.roster}
        self._attempt_counter = 0
        self._current: _Attempt | None = None
        self._finished = False
        self._failed = False
        self._stopping = False
        self._history: list[dict[str, Any]] = []
        self._ledger: dict[str, Any] | None = None
        self._completed = 0
        self._model: tensors.Tensors = {}
        # CKKS: once a CKKS round completed, the global model is the encrypted one (self._blob is
        # its CKKS_MODEL payload and self._model is empty); its public structure is kept here.
        self._encrypted = False
        self._structure: ckks_wire.Structure = ()
        self._blob = b""
        self._model_chunks: list[bytes] = []
        self._digest = b""
        self._grpc: grpc.Server | None = None
        # Answers rostered, authenticated sites only (an off-roster identity learns nothing).
        self._health = RosterHealthServicer(self._auth)
        self._driver = threading.Thread(target=self._drive, name="round-driver", daemon=True)
        self._done = threading.Event()
        self._downloads = 0  # model downloads in flight (the server lingers for them at the end)
        self._warned_two_sites = False
        self._model_round_id = 0  # the round id whose result the current model is

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the checkpoint (or the initial model), bind, serve, start the driver."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        restored = ckpt.load(cfg.state_dir, cfg.federation)
        if restored is not None:
            self._completed = restored.completed_rounds
            self._history = [dict(h) for h in restored.history]
            last = self._history[-1].get("round_id") if self._history else None
            self._model_round_id = last if isinstance(last, int) else max(0, self._completed - 1)
            self._ledger = dict(restored.ledger) if restored.ledger is not None else None
            if restored.encrypted_model is not None:
                self._set_encrypted_model(restored.encrypted_model)
            else:
                self._set_model(restored.model)
            self.log.info(
                "resumed",
                completed_rounds=self._completed,
                model_sha256=self._digest.hex(),
            )
        else:
            self._set_model(rounds.initial_model(cfg.model))
            self.log.info("fresh-start", parameters=rounds.model_size(self._model))
        lim = cfg.limits
        options = [
            ("grpc.max_receive_message_length", lim.max_message_bytes),
            ("grpc.max_send_message_length", lim.max_message_bytes),
            ("grpc.max_concurrent_streams", lim.max_streams_per_connection),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=lim.max_concurrent_rpcs),
            options=options,
            maximum_concurrent_rpcs=lim.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = server.add_secure_port(cfg.listen, server_credentials(cfg.tls))
        except RuntimeError as exc:  # grpc raises on a failed bind (older versions return 0)
            raise ConfigError(f"cannot listen on {cfg.listen}: {exc}") from exc
        if port == 0:
            raise ConfigError(f"cannot listen on {cfg.listen}")
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        server.start()
        self._grpc = server
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        endpoint = {"address": self.address, "pid": os.getpid()}
        (cfg.state_dir / "endpoint.json").write_text(json.dumps(endpoint) + "\n")
        self.log.info(
            "listening",
            address=self.address,
            federation=cfg.federation,
            aggregation=cfg.aggregation.protocol,
            roster=len(cfg.roster),
            rounds=cfg.rounds,
            test_mode=cfg.insecure_test_seed is not None,
        )
        if cfg.insecure_test_seed is not None:
            self.log.warning("insecure-test-seed", note="server randomness is reproducible")
        if cfg.aggregation.protocol == "plain":
            self.log.warning("plain-aggregation", note="updates travel and are seen in the clear")
        self._driver.start()

    def stop(self) -> None:
        """Stop serving (idempotent): refuse new calls, end long polls, stop the driver."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait(5.0)
        self._done.set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the federation is over; returns 0 when every round completed, else 1."""
        self._done.wait(timeout)
        return 1 if self._failed or not self._finished else 0

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT stop the server gracefully (the checkpoint is already on disk)."""

        def handle(signum: int, frame: FrameType | None) -> None:
            self.log.info("signal", signal=signum)
            self._failed = True
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _set_model(self, model: tensors.Tensors) -> None:
        blob, digest = ckpt.model_blob(model)
        self._model, self._blob, self._digest = model, blob, bytes.fromhex(digest)
        self._encrypted, self._structure = False, ckks_wire.structure_of(model)
        # Every site downloads the same chunk stream: serialise (and hash) it once per model.
        header = pb.PayloadHeader(kind=pb.MODEL, length=len(model))
        self._model_chunks = list(iter_chunk_bytes(header, blob, self.config.limits.chunk_bytes))

    def _set_encrypted_model(self, blob: bytes) -> None:
        """Hold the encrypted global model (a CKKS_MODEL payload); the server cannot decrypt it.

        Errors: ConfigError when it is not a CKKS_MODEL payload of this federation's CKKS context
        (for example a checkpoint written before the keys were rotated)."""
        try:
            encrypted = ckks_wire.decode_model(blob)
        except RemoteProtocolError as exc:
            raise ConfigError(f"the encrypted global model is unreadable: {exc}") from exc
        public = self._ckks_public
        if public is None or encrypted.fingerprint != public.fingerprint:
            raise ConfigError(
                "the checkpointed global model is encrypted under CKKS context "
                f"{encrypted.fingerprint[:16]}..., not this federation's (were the keys rotated?); "
                "the server cannot re-encrypt it: start from a fresh state_dir"
            )
        self._model, self._blob, self._digest = {}, blob, rounds.sha256(blob)
        self._encrypted, self._structure = True, encrypted.structure
        header = pb.PayloadHeader(
            kind=pb.CKKS_MODEL,
            length=len(encrypted.frames),
            ckks=pb.CkksPayloadInfo(
                context_sha256=ckks_wire.fingerprint_bytes(encrypted.fingerprint)
            ),
        )
        self._model_chunks = list(iter_chunk_bytes(header, blob, self.config.limits.chunk_bytes))

    # -- the round driver ---------------------------------------------------------------------

    def _drive(self) -> None:
        failures = 0
        try:
            while self._completed < self.config.rounds and not self._stopping:
                participants = self._await_sites()
                if participants is None:
                    continue
                if self._run_attempt(participants):
                    failures = 0
                else:
                    failures += 1
                    if failures >= self.config.max_attempts:
                        self.log.error("giving-up", round=self._completed + 1, attempts=failures)
                        self._failed = True
                        break
        except Exception:
            self.log.error("driver-crashed", exc=True)
            self._failed = True
        self._finish()

    def _live(self, now: float) -> dict[int, str]:
        horizon = self.config.deadlines.liveness_s
        return {
            sid: s.entry.name
            for sid, s in self._sites.items()
            if s.joined and now - s.last_seen <= horizon
        }

    def _await_sites(self) -> dict[int, str] | None:
        """Wait until every roster site is live, or ``wait_for_sites_s`` passed with at least
        ``min_sites`` live. Returns the participants, or None when stopping or still too few."""
        cfg = self.config
        deadline = time.monotonic() + cfg.deadlines.wait_for_sites_s
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                live = self._live(now)
                if len(live) == len(self._sites):
                    return live
                if now >= deadline:
                    if len(live) >= cfg.min_sites:
                        return live
                    self.log.warning(
                        "waiting-for-sites", live=sorted(live.values()), min_sites=cfg.min_sites
                    )
                    deadline = now + cfg.deadlines.wait_for_sites_s
                self._cond.wait(min(1.0, max(0.01, deadline - now)))
        return None

    def _post(self, rs: _Attempt, site: int, kind: str, message: Message) -> None:
        """Queue instruction ``kind`` (a field of the Instruction oneof) for ``site`` (caller
        holds the lock)."""
        s = self._sites[site]
        if s.attempt != rs.attempt:
            s.attempt, s.queue = rs.attempt, []
        inst = pb.Instruction(attempt=rs.attempt, index=len(s.queue), round_id=rs.round_id)
        getattr(inst, kind).CopyFrom(message)
        s.queue.append(inst)

    def _wait_for(self, predicate: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            while not predicate() and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, 1.0))

    def _new_round_id(self) -> int:
        """A round id never used before by this federation's server (persisted in
        ``state_dir/round_ids.json`` before any site hears of it): sites refuse a round id that
        is not greater than every one they contributed to, so a retried or resumed round runs
        under a new id."""
        path = self.config.state_dir / "round_ids.json"
        used = [int(h["round_id"]) for h in self._history if isinstance(h.get("round_id"), int)]
        next_id = max([self._completed, *(u + 1 for u in used)])
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("federation") == self.config.federation:
                    next_id = max(next_id, int(saved["next"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path} is unreadable: {exc}") from exc
        atomic_write(path, json.dumps({"federation": self.config.federation, "next": next_id + 1}))
        return next_id

    def _run_attempt(self, participants: dict[int, str]) -> bool:
        cfg = self.config
        start = time.perf_counter()
        round_id = self._new_round_id()
        with self._cond:
            self._attempt_counter += 1
            rs = _Attempt(
                self._attempt_counter, round_id, dict(participants), index=self._completed
            )
            self._current = rs
            for site in sorted(participants):
                self._post(
                    rs,
                    site,
                    "round_start",
                    pb.RoundStart(
                        aggregation=cfg.aggregation.protocol,
                        model_sha256=self._digest,
                        model_bytes=len(self._blob),
                        deadline_s=cfg.deadlines.update_s,
                        model_round_id=self._model_round_id,
                        round_index=rs.index,
                    ),
                )
            self._cond.notify_all()
        self.log.info(
            "round-start",
            round=rs.index + 1,
            round_id=rs.round_id,
            attempt=rs.attempt,
            participants=sorted(participants.values()),
        )
        record: dict[str, Any] = {
            "round": rs.index,
            "round_id": rs.round_id,
            "attempt": rs.attempt,
            "aggregation": cfg.aggregation.protocol,
            "participants": {str(k): v for k, v in sorted(participants.items())},
        }
        try:
            self._wait_for(
                lambda: set(rs.weights) | rs.excluded >= set(rs.participants),
                cfg.deadlines.update_s,
            )
            with self._cond:
                reported = dict(rs.weights)
                rs.stage = "aggregate"
            record["reported"] = sorted(reported)
            if self._stopping:
                raise _RoundFailedError("server stopping")
            if len(reported) < cfg.min_sites:
                raise _RoundFailedError(
                    f"only {len(reported)} sites reported an update, min_sites is {cfg.min_sites}"
                )
            encrypted: bytes | None = None
            if cfg.aggregation.protocol == "plain":
                mean, survivors = self._aggregate_plain(rs, reported)
                record.update(survivors=sorted(survivors), dropped=[])
            elif cfg.aggregation.protocol == "ckks":
                encrypted = self._aggregate_ckks(rs, reported, record)
            else:
                mean, survivors = self._aggregate_secagg(rs, reported, record)
        except (
            _RoundFailedError,
            ProtocolError,
            ConfigError,
            InvalidUpdateError,
            CryptoError,
        ) as exc:
            return self._end_attempt(rs, record, start, completed=False, reason=str(exc))
        if encrypted is not None:
            # CKKS: the new global model is the encrypted sum; the server cannot read it.
            with self._cond:
                self._set_encrypted_model(encrypted)
                self._completed += 1
                self._model_round_id = rs.round_id
            return self._end_attempt(rs, record, start, completed=True, reason="")
        new_model = rounds.apply_mean(self._model, mean)
        with self._cond:
            self._set_model(new_model)
            self._completed += 1
            self._model_round_id = rs.round_id
        return self._end_attempt(rs, record, start, completed=True, reason="")

    def _end_attempt(
        self, rs: _Attempt, record: dict[str, Any], start: float, *, completed: bool, reason: str
    ) -> bool:
        """Record the attempt, checkpoint a completed round (durably, before any site hears of
        it), then tell the participants."""
        seconds = time.perf_counter() - start
        with self._cond:
            rs.stage = "done"
            record.update(
                completed=completed,
                reason=reason,
                seconds=round(seconds, 4),
                model_sha256=self._digest.hex(),
                bytes_in=sum(rs.bytes_in.values()),
                bytes_out=sum(rs.bytes_out.values()),
                model_bytes_out=rs.model_bytes_out,
                bytes_in_per_site={str(k): v for k, v in sorted(rs.bytes_in.items())},
                bytes_out_per_site={str(k): v for k, v in sorted(rs.bytes_out.items())},
                rejected_calls=rs.rejected,
            )
            model, blob, digest, completed_rounds, encrypted = (
                self._model,
                self._blob,
                self._digest,
                self._completed,
                self._encrypted,
            )
        # Only the driver changes the model and the history: no lock needed for the disk writes.
        state = self.config.state_dir
        if completed:
            self._history.append(record)
            ckpt.save(
                state,
                ckpt.Checkpoint(
                    federation=self.config.federation,
                    completed_rounds=completed_rounds,
                    model=model,
                    model_sha256=digest.hex(),
                    history=tuple(self._history),
                    ledger=self._ledger,
                    encrypted_model=blob if encrypted else None,
                ),
                blob=blob,
            )
            ckpt.save_round_record(state, f"round-{rs.index:06d}", record)
        else:
            ckpt.save_round_record(state, f"round-{rs.index:06d}-failed-{rs.attempt}", record)
        survivors = record.get("survivors", [])
        dropped = record.get("dropped", [])
        with self._cond:
            for site in sorted(rs.participants):
                self._post(
                    rs,
                    site,
                    "outcome",
                    pb.RoundOutcome(
                        completed=completed,
                        survivors=survivors,
                        dropped=dropped,
                        reason=reason,
                        model_sha256=digest,
                        next_round=completed_rounds,
                    ),
                )
            self._current = None
            self._cond.notify_all()
        if completed:
            self.log.info(
                "round-completed",
                round=rs.index + 1,
                round_id=rs.round_id,
                attempt=rs.attempt,
                survivors=survivors,
                dropped=dropped,
                seconds=round(seconds, 3),
                bytes_in=record["bytes_in"],
                bytes_out=record["bytes_out"],
            )
        else:
            self.log.warning(
                "round-failed",
                round=rs.index + 1,
                round_id=rs.round_id,
                attempt=rs.attempt,
                reason=reason,
            )
        return completed

    def _aggregate_plain(
        self, rs: _Attempt, reported: dict[int, float]
    ) -> tuple[np.ndarray, frozenset[int]]:
        with self._cond:
            updates = {s: rs.plain_updates[s] for s in reported}
        mean = rounds.weighted_mean(updates, reported)
        return np.asarray(mean, dtype=np.float64), frozenset(reported)

    def _aggregate_secagg(
        self, rs: _Attempt, reported: dict[int, float], record: dict[str, Any]
    ) -> tuple[np.ndarray, frozenset[int]]:
        cfg = self.config
        ids = sorted(reported)
        plan = rounds.plan_round(cfg.aggregation, [reported[s] for s in ids])
        codec = plan.codec()
        norm = dict(zip(ids, plan.weights, strict=True))
        verify_keys = {
            e.site_id: e.verify_key
            for e in cfg.roster
            if e.site_id in reported and e.verify_key is not None
        }
        listed = {s: reported[s] for s in ids}
        vector_length = rounds.model_size(self._model)
        config = rounds.round_config(
            cfg.aggregation,
            ids,
            vector_length=vector_length,
            bits=plan.bits,
            round_id=rs.round_id,
            verify_keys=verify_keys,
            # Every site's weight and the codec, bound into every key and signature of the round.
            binding=convert.setup_binding(listed, codec, vector_length),
        )
        secagg = SecAggServer(config)
        if len(ids) == 2 and not self._warned_two_sites:
            self._warned_two_sites = True
            self.log.warning(
                "two-site-round",
                note="with two parties each can derive the other's update from the mean",
            )
        record.update(
            threshold=config.threshold,
            k=config.degree,
            bits=plan.bits,
            frac_bits=plan.frac_bits,
        )
        phase_s = cfg.deadlines.phase_s
        secagg_start = time.perf_counter()
        with self._cond:
            rs.secagg = secagg
            rs.stage = "secagg"
            for site in ids:
                if site in rs.excluded:
                    continue
                self._post(
                    rs,
                    site,
                    "secagg_setup",
                    convert.setup_to_pb(config, codec, norm[site], phase_s, listed),
                )
            self._cond.notify_all()
        while secagg.phase not in (ServerPhase.DONE, ServerPhase.ABORTED):
            self._wait_for(lambda: not (secagg.expected - rs.excluded), phase_s)
            if self._stopping:
                raise _RoundFailedError("server stopping")
            with self._cond:
                rs.closing = True
                closing_phase = secagg.phase.value
                missing = sorted(secagg.expected)
            try:
                out = secagg.close_phase()
            finally:
                with self._cond:
                    rs.closing = False
            self.log.info(
                "phase-closed",
                round=rs.index + 1,
                round_id=rs.round_id,
                phase=closing_phase,
                missing=missing,
            )
            with self._cond:
                for site, message in sorted(out.items()):
                    if site not in rs.excluded:
                        self._post(rs, site, *self._instruction(message))
                self._cond.notify_all()
        total = secagg.result()
        survivors = secagg.u3
        record.update(
            survivors=sorted(survivors),
            dropped=sorted(secagg.dropped),
            excluded=sorted(secagg.excluded),
            sum_sha256=rounds.vector_sha256(total),
            secagg_seconds=round(time.perf_counter() - secagg_start, 4),
        )
        mean = codec.decode(total) / sum(norm[s] for s in survivors)
        return mean, survivors

    def _aggregate_ckks(
        self, rs: _Attempt, reported: dict[int, float], record: dict[str, Any]
    ) -> bytes:
        """CKKS: setup -> uploads (phase_s) -> homomorphic sum = the new encrypted global model.

        Nothing is decrypted and no site is asked to decrypt anything for the server: the sum of
        the contributors' encrypted, weight-scaled new local models, with their public share of
        the weight, is the next global model (a CKKS_MODEL payload); every site decrypts it
        itself. Returns that payload."""
        from secure_fl.he import Layout

        cfg = self.config
        public = self._ckks_public
        preset = public.preset
        fp = ckks_wire.fingerprint_bytes(public.fingerprint)
        ids = sorted(reported)
        total = math.fsum(reported.values())
        factors = {s: reported[s] / total for s in ids}
        size = ckks_wire.structure_size(self._structure)
        layout = Layout(size, preset.slots, cfg.aggregation.chunk_ciphertexts)
        phase_s = cfg.deadlines.phase_s
        ck = _CkksRound(layout=layout, factors=factors)
        record.update(ckks_fingerprint=public.fingerprint, ckks_preset=preset.name)
        with self._cond:
            rs.ckks = ck
            rs.stage = "ckks_upload"
            for site in ids:
                if site in rs.excluded:
                    continue
                self._post(
                    rs,
                    site,
                    "ckks_setup",
                    pb.CkksSetup(
                        context_sha256=fp,
                        poly_modulus_degree=preset.poly_modulus_degree,
                        scale=float(preset.scale),
                        weight=factors[site],
                        vector_length=size,
                        chunk_ciphertexts=layout.chunk_ciphertexts,
                        phase_deadline_s=phase_s,
                    ),
                )
            self._cond.notify_all()
        self._wait_for(lambda: set(ck.frames) | rs.excluded >= set(ids), phase_s)
        with self._cond:
            rs.stage = "ckks_sum"  # uploads still streaming are refused from now on
            uploads = dict(ck.frames)
            ck.frames.clear()
        if self._stopping:
            raise _RoundFailedError("server stopping")
        contributors = sorted(uploads)
        dropped = sorted(set(ids) - set(contributors))
        record.update(survivors=contributors, dropped=dropped)
        self.log.info(
            "ckks-uploads-closed", round=rs.index + 1, round_id=rs.round_id, missing=dropped
        )
        if len(contributors) < max(2, cfg.min_sites):
            raise _RoundFailedError(
                f"only {len(contributors)} sites uploaded ciphertexts, min_sites is {cfg.min_sites}"
            )
        t0 = time.perf_counter()
        names = {s: rs.participants[s] for s in contributors}
        # Every upload was checked completely on arrival; the sum uses the public context only.
        sums = ckks_wire.sum_uploads(
            public, layout, rs.round_id, {names[s]: uploads[s] for s in contributors}
        )
        del uploads
        share = math.fsum(factors[s] for s in contributors)
        blob = ckks_wire.encode_model(
            ckks_wire.EncryptedModel(
                fingerprint=public.fingerprint,
                round_id=rs.round_id,
                share=share,
                contributors=len(contributors),
                chunk_ciphertexts=layout.chunk_ciphertexts,
                structure=self._structure,
                frames=tuple(sums),
            )
        )
        del sums
        record.update(
            ckks_model_sha256=rounds.sha256(blob).hex(),
            ckks_model_bytes=len(blob),
            ckks_share=share,
            ckks_sum_seconds=round(time.perf_counter() - t0, 4),
            ckks_model_encrypted=True,
        )
        self.log.info(
            "ckks-sum",
            round=rs.index + 1,
            round_id=rs.round_id,
            contributors=len(contributors),
            share=share,
            note="the new global model is encrypted; every site decrypts it itself",
        )
        return blob

    @staticmethod
    def _instruction(message: ServerMessage) -> tuple[str, Message]:
        if isinstance(message, KeyRoster):
            return "key_roster", convert.roster_to_pb(message)
        if isinstance(message, RevealSet):
            return "reveal_set", convert.reveal_set_to_pb(message)
        if isinstance(message, ShareDelivery):
            return "share_delivery", convert.delivery_to_pb(message)
        if isinstance(message, ConsistencyRequest):
            return "consistency_request", convert.consistency_to_pb(message)
        if isinstance(message, UnmaskRequest):
            return "unmask_request", convert.unmask_request_to_pb(message)
        raise TypeError(f"unknown server message {type(message).__name__}")

    def _finish(self) -> None:
        with self._cond:
            if self._completed == 0:
                self._failed = True  # nothing trained: every party exits non-zero
            self._finished = True
            self._cond.notify_all()
        if self._completed == 0:
            self.log.error(
                "federation-not-trained",
                reason="the federation stopped after 0 rounds; no model was trained",
            )
        self.log.info(
            "federation-finished" if not self._failed else "federation-stopped",
            completed_rounds=self._completed,
            model_sha256=self._digest.hex(),
            # CKKS: the server's final artefact is a ciphertext; the sites write the model.
            model_encrypted=self._encrypted,
        )
        deadline = time.monotonic() + self.config.deadlines.linger_s
        quiet_since: float | None = None
        with self._cond:
            while not self._stopping and time.monotonic() < deadline:
                now = time.monotonic()
                waiting = [s for s in self._live(now) if not self._sites[s].told_finished]
                if waiting or self._downloads:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now  # everyone knows; leave time for a final model download
                elif now - quiet_since >= 0.5:
                    break
                self._cond.wait(0.1)
        self.stop()

    # -- gRPC handlers ------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        def ser(message: Message) -> bytes:
            return message.SerializeToString()

        unary: dict[str, Callable[[RosterEntry, bytes, grpc.ServicerContext], Message]] = {
            "Join": self._join,
            "Poll": self._poll,
            "ReportUpdateReady": self._report_ready,
            "SendAdvertiseKeys": self._advertise,
            "SendRevealNonce": self._reveal,
            "SendShareKeys": self._share_keys,
            "SendConsistencySignature": self._consistency,
            "SendUnmaskResponse": self._unmask,
        }
        streams_in: dict[
            str, Callable[[RosterEntry, Iterator[bytes], grpc.ServicerContext], Message]
        ] = {
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
            rs = self._current
            if rs is not None:
                rs.bytes_in[site] = rs.bytes_in.get(site, 0) + received
                rs.bytes_out[site] = rs.bytes_out.get(site, 0) + sent
                if model:
                    rs.model_bytes_out += sent

    def _reject(
        self, context: grpc.ServicerContext, method: str, who: str, r: RejectedError
    ) -> NoReturn:
        with self._cond:
            if self._current is not None:
                self._current.rejected += 1
        self.log.warning("rejected", method=method, site=who, code=r.code, reason=r.message)
        context.abort(getattr(grpc.StatusCode, r.code), r.message)

    def _guard_unary(
        self, method: str, fn: Callable[[RosterEntry, bytes, grpc.ServicerContext], Message]
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
        self,
        method: str,
        fn: Callable[[RosterEntry, Iterator[bytes], grpc.ServicerContext], Message],
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

    def _touch(self, entry: RosterEntry) -> _Site:
        """Record contact from a joined site (caller holds the lock)."""
        s = self._sites[entry.site_id]
        if not s.joined:
            raise RejectedError("FAILED_PRECONDITION", "join first")
        s.last_seen = time.monotonic()
        return s

    # -- control ------------------------------------------------------------------------------

    def _join(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        request = _parse(pb.JoinRequest, raw)
        if request.protocol_version != FEDERATION_PROTOCOL:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"protocol {request.protocol_version!r} is not supported; this server speaks "
                f"{FEDERATION_PROTOCOL!r}",
            )
        sid = entry.site_id
        with self._cond:
            s = self._sites[sid]
            rejoined = s.joined
            s.joined = True
            s.last_seen = time.monotonic()
            s.told_finished = False
            rs = self._current
            if rs is None or sid not in rs.participants:
                # Whatever was queued for an earlier process of this site is stale.
                s.queue = []
            else:
                if rs.stage == "update":
                    # A restarted site redoes its update within the same attempt.
                    rs.weights.pop(sid, None)
                    rs.plain_updates.pop(sid, None)
                elif sid not in rs.excluded:
                    # Its protocol state is gone: it is a dropout of this attempt.
                    rs.excluded.add(sid)
                    s.attempt, s.queue = rs.attempt, []
            self._cond.notify_all()
        self.log.info("join", site=entry.name, rejoin=rejoined, version=request.software_version)
        lim = self.config.limits
        return pb.JoinReply(
            federation=self.config.federation,
            session=self.session,
            site_id=sid,
            site_name=entry.name,
            next_round=self._completed,
            rounds=self.config.rounds,
            max_chunk_bytes=lim.chunk_bytes,
            poll_wait_ms=int(self.config.deadlines.poll_wait_s * 1000),
        )

    def _next_instruction(self, s: _Site, attempt: int, index: int) -> pb.Instruction | None:
        if self._finished:
            s.told_finished = True
            return pb.Instruction(
                round_id=self._completed,
                finished=pb.Finished(
                    rounds_completed=self._completed,
                    model_sha256=self._digest,
                    model_round_id=self._model_round_id,
                ),
            )
        if not s.queue:
            return None
        if attempt == s.attempt:
            return s.queue[index] if index < len(s.queue) else None
        return s.queue[0]

    def _poll(self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Message:
        request = _parse(pb.PollRequest, raw)
        if request.session != self.session:
            raise RejectedError("FAILED_PRECONDITION", "unknown session: join again")
        wait = min(request.wait_ms / 1000.0, self.config.deadlines.poll_wait_s)
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                s = self._touch(entry)
                inst = self._next_instruction(s, request.attempt, request.next_index)
                if inst is not None:
                    return inst
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping or not context.is_active():
                    return pb.Instruction(wait=pb.Wait())
                self._cond.wait(min(remaining, 1.0))

    def _download(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        who = "?"
        try:
            entry = self._auth.identify(context)
            who = entry.name
            request = _parse(pb.ModelRequest, raw)
            with self._cond:
                self._touch(entry)
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

    def _update_stage(self, entry: RosterEntry, round_id: int) -> _Attempt:
        """The current attempt, if it accepts an update from ``entry`` (caller holds the lock)."""
        rs = self._current
        if rs is None or rs.stage != "update":
            raise RejectedError("FAILED_PRECONDITION", "no round is collecting updates now")
        if round_id != rs.round_id:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"update for round {round_id}, the current round is {rs.round_id}",
            )
        if entry.site_id not in rs.participants:
            raise RejectedError(
                "FAILED_PRECONDITION", "this site is not a participant of this round"
            )
        if entry.site_id in rs.weights:
            raise RejectedError("FAILED_PRECONDITION", "update already reported for this round")
        return rs

    def _report_ready(
        self, entry: RosterEntry, raw: bytes, context: grpc.ServicerContext
    ) -> Message:
        request = _parse(pb.UpdateReady, raw)
        if not (math.isfinite(request.weight) and request.weight > 0):
            raise RejectedError(
                "INVALID_ARGUMENT", f"weight must be finite and > 0, got {request.weight}"
            )
        with self._cond:
            self._touch(entry)
            if self.config.aggregation.protocol not in ("secagg", "secagg+", "ckks"):
                raise RejectedError(
                    "FAILED_PRECONDITION",
                    f"this federation aggregates with {self.config.aggregation.protocol}",
                )
            rs = self._update_stage(entry, request.round_id)
            rs.weights[entry.site_id] = float(request.weight)
            self._cond.notify_all()
        return pb.Ack(round_id=request.round_id, phase="update")

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
                self._touch(entry)
                if self.config.aggregation.protocol != "plain":
                    raise RejectedError(
                        "FAILED_PRECONDITION", "this federation does not take plain updates"
                    )
                self._update_stage(entry, header.round_id)
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
        with self._cond:
            rs = self._update_stage(entry, header.round_id)
            rs.plain_updates[entry.site_id] = update
            rs.weights[entry.site_id] = float(header.weight)
            self._cond.notify_all()
        self._count(entry.site_id, nbytes, 0)
        return pb.Ack(round_id=header.round_id, phase="update")

    # -- CKKS ---------------------------------------------------------------------------------

    def _ckks_stage(self, entry: RosterEntry, stage: str, round_id: int, what: str) -> _Attempt:
        """The current attempt, if its CKKS ``stage`` accepts ``what`` from ``entry`` (lock held)."""
        if self.config.aggregation.protocol != "ckks":
            raise RejectedError("UNIMPLEMENTED", "this federation does not aggregate with CKKS")
        self._touch(entry)
        rs = self._current
        if rs is None or rs.ckks is None or rs.stage != stage:
            raise RejectedError(
                "FAILED_PRECONDITION", f"{what} refused: no CKKS round is at that step now"
            )
        if round_id != rs.round_id:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} for round {round_id} refused: the current round is {rs.round_id}",
            )
        if entry.site_id in rs.excluded or entry.site_id not in rs.ckks.factors:
            raise RejectedError(
                "FAILED_PRECONDITION", f"{what} refused: site {entry.name} is not expected"
            )
        return rs

    def _upload_ciphertext(
        self, entry: RosterEntry, stream: Iterator[bytes], context: grpc.ServicerContext
    ) -> Message:
        from secure_fl.he import CiphertextSummer

        public = self._ckks_public
        fp = ckks_wire.fingerprint_bytes(public.fingerprint) if public is not None else b""
        found: dict[str, Any] = {}

        def check(header: pb.PayloadHeader) -> None:
            if header.kind != pb.CKKS_CIPHERTEXT:
                raise RejectedError(
                    "INVALID_ARGUMENT", "UploadCiphertext carries CKKS_CIPHERTEXT payloads"
                )
            with self._cond:
                rs = self._ckks_stage(entry, "ckks_upload", header.round_id, "UploadCiphertext")
                assert rs.ckks is not None
                if entry.site_id in rs.ckks.frames:
                    raise RejectedError("FAILED_PRECONDITION", "ciphertexts already uploaded")
                layout, factor = rs.ckks.layout, rs.ckks.factors[entry.site_id]
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
            found["layout"] = layout

        header, data, nbytes = self._receive(stream, check)
        layout = found["layout"]
        # Check every frame and ciphertext now, completely (digest, fingerprint, round, chunk,
        # sizes, scale, level), so that adding the upload later cannot fail half-way.
        scratch = CiphertextSummer(public, layout, round_id=header.round_id)
        try:
            frames = ckks_wire.unpack_frames(data, layout.chunks)
            del data
            for chunk, frame in enumerate(frames):
                scratch.add(entry.name, frame)
                if scratch.contributors(chunk) != (entry.name,):
                    raise RemoteProtocolError(f"frame {chunk} is not the frame of chunk {chunk}")
        except RemoteProtocolError as exc:
            raise RejectedError("INVALID_ARGUMENT", str(exc)) from exc
        del scratch
        with self._cond:
            rs = self._ckks_stage(entry, "ckks_upload", header.round_id, "UploadCiphertext")
            assert rs.ckks is not None
            if entry.site_id in rs.ckks.frames:
                raise RejectedError("FAILED_PRECONDITION", "ciphertexts already uploaded")
            rs.ckks.frames[entry.site_id] = frames
            self._cond.notify_all()
        self._count(entry.site_id, nbytes, 0)
        return pb.Ack(round_id=header.round_id, phase="ckks_upload")

    def _receive(
        self, stream: Iterable[bytes], check: Callable[[pb.PayloadHeader], None]
    ) -> tuple[pb.PayloadHeader, bytearray, int]:
        lim = self.config.limits
        return receive_raw(
            stream, max_chunk=lim.chunk_bytes, max_total=lim.max_payload_bytes, check_header=check
        )

    # -- secure aggregation phases -------------------------------------------------------------

    def _secagg_stage(
        self, entry: RosterEntry, phase: ServerPhase, round_id: int, what: str
    ) -> SecAggServer:
        """The running SecAggServer, if it accepts ``what`` from ``entry`` now (lock held)."""
        self._touch(entry)
        rs = self._current
        secagg = rs.secagg if rs is not None else None
        if rs is None or secagg is None or rs.stage != "secagg":
            raise RejectedError(
                "FAILED_PRECONDITION", f"{what} refused: no secure aggregation is running"
            )
        if round_id != rs.round_id:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} for round {round_id} refused: the current round is {rs.round_id}",
            )
        if rs.closing or secagg.phase is not phase:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} refused: the server is in phase {secagg.phase.value}"
                + (" (closing)" if rs.closing else ""),
            )
        if entry.site_id in rs.excluded or entry.site_id not in secagg.expected:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} refused: site {entry.name} is not expected in phase {phase.value} "
                "(not a participant, a duplicate, or dropped)",
            )
        return secagg

    def _deliver(
        self, entry: RosterEntry, phase: ServerPhase, message: ClientMessage, what: str
    ) -> Message:
        with self._cond:
            secagg = self._secagg_stage(entry, phase, message.round_id, what)
            try:
                secagg.receive(message)
            except RemoteProtocolError as exc:
                raise RejectedError("INVALID_ARGUMENT", str(exc)) from exc
            self._cond.notify_all()
        return pb.Ack(round_id=message.round_id, phase=phase.value)

    def _n_sites(self) -> int:
        return len(self._sites)

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
                secagg = self._secagg_stage(
                    entry, ServerPhase.COLLECT_MASKED, header.round_id, "MaskedInput"
                )
                cfg = secagg.config
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


def run_server(config: ServerConfig) -> int:
    """Run the server until the federation is over; returns the process exit status."""
    log = logs.setup("server", config.log_file)
    server = FederationServer(config, log)
    server.start()
    server.install_signal_handlers()
    log.info("started", version=__version__, pid=os.getpid())
    return server.wait()
