"""The federation server: a thin gRPC shell over the sans-IO coordinator (:mod:`.coordinator`).

Guarantees:

* **Identity.** Every call is authenticated by the client certificate (:mod:`.tls`): the TLS
  handshake needs a certificate from the federation's CA, and the certificate's name must be on
  the roster (and match its pinned fingerprint). Message fields never name the sender.
* **Rounds.** The coordinator runs the rounds one after the other (its stages are one table,
  :mod:`.stages`): it invites the live sites, collects their updates (or, for secure
  aggregation, their weights) until the update deadline, then runs SecAgg / SecAgg+
  (:class:`secure_fl.secagg.SecAggServer`) phase by phase. A phase closes when every expected
  site answered or at its deadline; a site that misses it is a dropout for the protocol, which
  recovers the sum of the others while at least the threshold remain. While it waits it logs a
  ``waiting`` heartbeat naming the sites it waits for (``deadlines.heartbeat_s``).
* **CKKS.** With ``ckks`` the server holds only the public context (it refuses to start with the
  secret one) and never receives anything decrypted: it collects each site's complete, checked
  ciphertext upload, adds the uploads of the sites that completed theirs (a partial upload is
  discarded, never added), and the sum *is* the new global model, encrypted. Every site
  downloads and decrypts it itself (:mod:`.ckks`); the checkpoint and final model are ciphertexts.
* **Bad messages do not disturb a round.** A malformed, oversized, out-of-stage, duplicate or
  wrongly addressed message is refused with a gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
  FAILED_PRECONDITION, PERMISSION_DENIED) and the round goes on.
* **Nothing finished is lost.** After each completed round the model, the round number, the
  history, the ledger state and the server optimiser's state are checkpointed atomically
  (:mod:`.checkpoint`) before any site hears of it; a restarted server resumes with the next
  round; sites rejoin by themselves. An interrupted round is run again from its start.
* **Fresh round ids.** Every attempt runs under a round id never used before by this federation
  (``state_dir/round_ids.json``, written before any site hears of it).
* **Bounded resources.** Message size, HTTP/2 streams per connection, concurrent calls in total and
  per site, and a per-site call rate are limited (:class:`~secure_fl.transport.config.Limits`).

The server also serves the standard gRPC health service to rostered, authenticated sites only
(:class:`.tls.RosterHealthServicer`) and writes JSON-lines logs (:mod:`.logs`). A federation that
stopped after 0 rounds exits 1 with an ERROR event ``federation-not-trained``; one stopped by
its privacy budget writes ``state_dir/stopped.json`` and exits 0.

Threads: gRPC worker threads run the handlers (:mod:`.server_service`); one driver thread ticks
the coordinator's deadlines and runs its jobs outside the lock; every coordinator call is made
under one condition lock.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from types import FrameType
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_fl import __version__
from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import logs, rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes, receive_raw
from secure_fl.transport.config import ServerConfig, make_server_optimizer_from
from secure_fl.transport.coordinator import Attempt, Coordinator, run_job
from secure_fl.transport.limits import SiteLimiter
from secure_fl.transport.server_host import ShellHost, server_privacy
from secure_fl.transport.server_service import SERVICE, ServiceHandlers
from secure_fl.transport.stages import Event
from secure_fl.transport.tls import Authenticator, RosterHealthServicer, server_credentials

__all__ = ["SERVICE", "FederationServer", "run_server"]


class FederationServer(ServiceHandlers):
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
        self._clock: Callable[[], float] = time.monotonic
        self._auth = Authenticator(config.roster)
        lim = config.limits
        self._limiter = SiteLimiter(
            rate_per_s=lim.rate_per_s, burst=lim.burst, concurrency=lim.per_site_concurrency
        )
        self._cond = threading.Condition()
        optimizer = (
            make_server_optimizer_from(config.server_optimizer)
            if config.server_optimizer is not None
            else None
        )
        self._coord = Coordinator(
            config, ShellHost(self), self.log, public=self._ckks_public, optimizer=optimizer
        )
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

    # The coordinator's state, as earlier versions (and tests) named it.
    @property
    def _completed(self) -> int:
        return self._coord.completed

    @_completed.setter
    def _completed(self, value: int) -> None:
        self._coord.completed = value

    @property
    def _history(self) -> list[dict[str, Any]]:
        return self._coord.history

    @_history.setter
    def _history(self, value: list[dict[str, Any]]) -> None:
        self._coord.history = value

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the checkpoint (or the initial model), bind, serve, start the driver."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._coord.privacy = server_privacy(cfg)
        restored = ckpt.load(cfg.state_dir, cfg.federation)
        if restored is not None:
            self._coord.resume(
                restored.completed_rounds,
                [dict(h) for h in restored.history],
                dict(restored.ledger) if restored.ledger is not None else None,
            )
            if restored.server_optimizer is not None and self._coord.optimizer is not None:
                self._coord.optimizer.load_state_dict(restored.server_optimizer)
            if restored.encrypted_model is not None:
                self._set_encrypted_model(restored.encrypted_model)
            else:
                self._set_model(restored.model)
            self.log.info(
                "resumed", completed_rounds=self._completed, model_sha256=self._digest.hex()
            )
        else:
            self._set_model(rounds.initial_model(cfg.model))
            self.log.info("fresh-start", parameters=rounds.model_size(self._model))
        self._serve()
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

    def _serve(self) -> None:
        cfg, lim = self.config, self.config.limits
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

    def stop(self) -> None:
        """Stop serving (idempotent): refuse new calls, end long polls, stop the driver."""
        with self._cond:
            self._coord.stop(self._clock())
            self._cond.notify_all()
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait(5.0)
        self._done.set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the federation is over; returns 0 when it finished (every round, or a
        privacy-budget stop after at least one round), else 1."""
        self._done.wait(timeout)
        return 0 if self._coord.finished and not self._coord.failed else 1

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT stop the server gracefully (the checkpoint is already on disk)."""

        def handle(signum: int, frame: FrameType | None) -> None:
            self.log.info("signal", signal=signum)
            self._coord.failed = True
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # -- the host's hooks (a test's malicious server overrides these) ---------------------------

    def _new_round_id(self) -> int:
        """A fresh round id (:func:`checkpoint.allocate_round_id`)."""
        return ckpt.allocate_round_id(
            self.config.state_dir, self.config.federation, self._history, self._completed
        )

    def _post(self, rs: Attempt, site: int, kind: str, message: Message) -> None:
        """Queue instruction ``kind`` for ``site`` (called with the lock held)."""
        self._coord.queue(rs, site, kind, message)

    def _set_model(self, model: tensors.Tensors) -> None:
        blob, digest = ckpt.model_blob(model)
        # Every site downloads the same chunk stream: serialise (and hash) it once per model.
        header = pb.PayloadHeader(kind=pb.MODEL, length=len(model))
        chunks = list(
            iter_chunk_bytes(
                header, blob, self.config.limits.chunk_bytes, sha256=bytes.fromhex(digest)
            )
        )
        with self._cond:
            self._model, self._blob, self._digest = model, blob, bytes.fromhex(digest)
            self._encrypted, self._structure = False, ckks_wire.structure_of(model)
            self._model_chunks = chunks

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
        header = pb.PayloadHeader(
            kind=pb.CKKS_MODEL,
            length=len(encrypted.frames),
            ckks=pb.CkksPayloadInfo(
                context_sha256=ckks_wire.fingerprint_bytes(encrypted.fingerprint)
            ),
        )
        chunks = list(iter_chunk_bytes(header, blob, self.config.limits.chunk_bytes))
        with self._cond:
            self._model, self._blob, self._digest = {}, blob, rounds.sha256(blob)
            self._encrypted, self._structure = True, encrypted.structure
            self._model_chunks = chunks

    # -- the driver ---------------------------------------------------------------------------

    def _drive(self) -> None:
        coord = self._coord
        try:
            while True:
                with self._cond:
                    now = self._clock()
                    before = (coord.stage, coord.posted)
                    job = coord.tick(now)
                    if (coord.stage, coord.posted) != before:
                        self._cond.notify_all()
                    if job is None:
                        if coord.finished:
                            break
                        self._cond.wait(coord.wakeup(now))
                        continue
                result, error = run_job(job)
                with self._cond:
                    coord.job_done(job, result, error, self._clock())
                    self._cond.notify_all()
        except Exception:
            self.log.error("driver-crashed", exc=True)
            with self._cond:
                coord.failed = True
                if not coord.finished:
                    coord._fire(Event.STOP, self._clock())
                self._cond.notify_all()
        self._finish()

    def _finish(self) -> None:
        coord = self._coord
        if coord.privacy is not None:
            coord.privacy.finish(coord.completed)
        if coord.budget_stop:
            path = self.config.state_dir / "stopped.json"
            if not path.exists():
                stopped = {"reason": "privacy-budget", "detail": coord.budget_stop}
                atomic_write(path, json.dumps({**stopped, "rounds": coord.completed}) + "\n")
            self.log.info("privacy-budget-stop", completed_rounds=coord.completed)
        if coord.completed == 0:
            self.log.error(
                "federation-not-trained",
                reason="the federation stopped after 0 rounds; no model was trained",
            )
        self.log.info(
            "federation-finished" if not coord.failed else "federation-stopped",
            completed_rounds=coord.completed,
            model_sha256=self._digest.hex(),
            # CKKS: the server's final artefact is a ciphertext; the sites write the model.
            model_encrypted=self._encrypted,
        )
        deadline = self._clock() + self.config.deadlines.linger_s
        quiet_since: float | None = None
        with self._cond:
            while not coord.stopping and self._clock() < deadline:
                now = self._clock()
                if coord.unfinished_sites(now) or self._downloads:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now  # everyone knows; leave time for a final model download
                elif now - quiet_since >= 0.5:
                    break
                self._cond.wait(0.1)
        self.stop()

    def _receive(
        self, stream: Iterable[bytes], check: Callable[[pb.PayloadHeader], None]
    ) -> tuple[pb.PayloadHeader, bytearray, int]:
        lim = self.config.limits
        return receive_raw(
            stream, max_chunk=lim.chunk_bytes, max_total=lim.max_payload_bytes, check_header=check
        )


def run_server(config: ServerConfig) -> int:
    """Run the server until the federation is over; returns the process exit status."""
    log = logs.setup("server", config.log_file)
    server = FederationServer(config, log)
    server.start()
    server.install_signal_handlers()
    log.info("started", version=__version__, pid=os.getpid())
    return server.wait()
