"""The federation server's coordinator: every round and attempt decision, sans-IO.

No sockets, no threads, no clock: every call takes ``now`` (seconds, any monotonic origin) and the
caller (the gRPC shell :mod:`.server`, or a test with a fake clock) serialises the calls under one
lock. What the coordinator says to a site is an instruction queued for that site (a poll returns
the next one); what it needs done outside the lock (close a SecAgg phase, sum, decode,
checkpoint) it hands to the driver as a :class:`Job`. Its stages and their transitions are the one
table of :mod:`.stages`; the table's handlers are the mixins of :mod:`.coordinator_steps` (site
events), :mod:`.coordinator_tick` (the driver's events) and the jobs of :mod:`.coordinator_finish`.

Durable state goes through the :class:`Host` (the shell: round ids, the model, checkpoints, round
records), so a restarted server resumes from its checkpoint and never reuses a round id.

Use::

    coord = Coordinator(config, host, log)
    coord.resume(completed, history, model_round_id)      # after loading a checkpoint, if any
    coord.join(site, now); coord.poll(site, attempt, index, now); ...   # site events
    job = coord.tick(now)                                 # the driver, every <= wakeup(now) s
    if job: coord.job_done(job, *run_job(job), now)       # outside the lock, then back under it
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message

from secure_fl.secagg import ServerPhase
from secure_fl.secagg.messages import ClientMessage
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import logs, server_rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import RosterEntry, ServerConfig
from secure_fl.transport.coordinator_steps import Attempt, Job, _Handlers
from secure_fl.transport.coordinator_tick import _DriverSteps
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.stages import SITE_EVENTS, Event, Stage, StageError, lookup

__all__ = ["Attempt", "Coordinator", "Host", "Job", "ModelView", "SiteState"]


@dataclass(frozen=True)
class ModelView:
    """What the coordinator needs to know of the current global model."""

    tensors: tensors.Tensors
    sha256: bytes
    nbytes: int
    encrypted: bool
    structure: ckks_wire.Structure


class Host(Protocol):
    """The coordinator's durable side (the gRPC shell implements it; tests use a fake)."""

    def new_round_id(self) -> int:
        """A round id never used before by this federation (persisted before it is returned)."""

    def post(self, attempt: Attempt, site: int, kind: str, message: Message) -> None:
        """Queue ``message`` for ``site`` (normally: ``Coordinator.queue``)."""

    def model_view(self) -> ModelView:
        """The current global model."""

    def set_model(self, model: tensors.Tensors) -> None:
        """Make ``model`` the global model (serialise it for download)."""

    def set_encrypted_model(self, blob: bytes) -> None:
        """Make the CKKS_MODEL payload ``blob`` the global model."""

    def save_checkpoint(self, checkpoint: ckpt.Checkpoint, blob: bytes | None) -> None:
        """Write the checkpoint durably."""

    def save_round_record(self, name: str, record: Mapping[str, Any]) -> None:
        """Write the record of one attempt."""

    def clock(self) -> float:
        """The ``now`` the host passes in (used by jobs to time a round for its record)."""


@dataclass
class SiteState:
    """One roster site as the coordinator sees it."""

    entry: RosterEntry
    joined: bool = False
    last_seen: float = -math.inf
    attempt: int = 0
    queue: list[pb.Instruction] = field(default_factory=list)
    told_finished: bool = False


class Coordinator(_Handlers, _DriverSteps):
    """See the module docstring. Not thread-safe: the caller holds one lock around every call.

    ``public``: the CKKS public context (CKKS federations only); ``privacy``: a
    :class:`secure_fl.transport.privacy.ServerPrivacy` or None; ``optimizer``: a
    :class:`secure_fl.aggregators.server_opt.ServerOptimizer` or None."""

    def __init__(
        self,
        config: ServerConfig,
        host: Host,
        log: logs.EventLog,
        *,
        public: Any = None,
        privacy: Any = None,
        optimizer: Any = None,
    ) -> None:
        self.config = config
        self.host = host
        self.log = log
        self.public = public
        self.privacy = privacy
        self.optimizer = optimizer
        self.stage = Stage.WAITING
        self.sites = {e.site_id: SiteState(e) for e in config.roster}
        self.current: Attempt | None = None
        self.completed = 0
        self.history: list[dict[str, Any]] = []
        self.ledger: dict[str, Any] | None = None
        self.model_round_id = 0
        self.failed = False
        self.stopping = False
        self.gave_up = False
        self.budget_stop = ""
        self.failures = 0
        self.attempts = 0
        self.warned_two_sites = False
        # Sites whose broken CKKS upload tainted an attempt's sum: left out of the next attempts
        # of that round (round index -> site ids), so one site cannot fail every attempt.
        self.benched: dict[int, set[int]] = {}
        self._wait_deadline: float | None = None
        self._deadline = math.inf
        self._heartbeat_at = -math.inf
        self._pending: Job | None = None
        self.posted = 0  # instructions queued so far (the shell wakes its long polls on change)

    # -- set-up -------------------------------------------------------------------------------

    def resume(
        self,
        completed: int,
        history: list[dict[str, Any]],
        ledger: dict[str, Any] | None = None,
    ) -> None:
        """Continue after ``completed`` rounds (from a checkpoint): the next round is
        ``completed``; the model is the result of the last recorded round id."""
        self.completed = completed
        self.history = [dict(h) for h in history]
        self.ledger = ledger
        last = self.history[-1].get("round_id") if self.history else None
        self.model_round_id = last if isinstance(last, int) else max(0, completed - 1)

    @property
    def finished(self) -> bool:
        """The federation is over (polls get Finished)."""
        return self.stage is Stage.FINISHED

    def queue(self, attempt: Attempt, site: int, kind: str, message: Message) -> None:
        """Queue instruction ``kind`` (a field of the Instruction oneof) for ``site``: a new
        attempt replaces whatever was queued for an earlier one."""
        s = self.sites[site]
        if s.attempt != attempt.attempt:
            s.attempt, s.queue = attempt.attempt, []
        inst = pb.Instruction(
            attempt=attempt.attempt, index=len(s.queue), round_id=attempt.round_id
        )
        getattr(inst, kind).CopyFrom(message)
        s.queue.append(inst)
        self.posted += 1

    # -- dispatch -----------------------------------------------------------------------------

    def _fire(self, event: Event, *args: Any) -> Any:
        """Run the table's handler for ``event`` and move to its next stage.

        Errors: RejectedError(FAILED_PRECONDITION) for a site event the stage does not allow;
        StageError for a driver event the stage does not allow (a bug)."""
        try:
            handler, following = lookup(self.stage, event)
        except StageError as exc:
            if event in SITE_EVENTS:
                raise RejectedError("FAILED_PRECONDITION", self._refusal(event)) from exc
            raise
        before = self.stage
        result = getattr(self, handler)(*args)
        if following is not None and self.stage is before:
            self.stage = following
        return result

    def _refusal(self, event: Event) -> str:
        if event in (Event.UPDATE_READY, Event.PLAIN_UPDATE):
            return "no round is collecting updates now"
        if event is Event.SECAGG_MESSAGE:
            if self.stage is Stage.CLOSING and self.current and self.current.secagg:
                return "refused: the server is closing a phase (closing)"
            return "refused: no secure aggregation is running"
        if event is Event.CKKS_UPLOAD:
            return "UploadCiphertext refused: no CKKS round is at that step now"
        return f"{event.value} refused in stage {self.stage.value}"

    def touch(self, site: int, now: float) -> None:
        """Record contact from a joined site. Errors: RejectedError when it has not joined."""
        self._touch(site, now)

    def _touch(self, site: int, now: float) -> SiteState:
        s = self.sites[site]
        if not s.joined:
            raise RejectedError("FAILED_PRECONDITION", "join first")
        s.last_seen = now
        return s

    # -- site events --------------------------------------------------------------------------

    def join(self, site: int, now: float) -> bool:
        """A site (re)joined. Returns whether it had joined before. A site that restarts during
        the update stage redoes its update in the same attempt; later it is a dropout."""
        return bool(self._fire(Event.JOIN, site, now))

    def poll(self, site: int, attempt: int, index: int, now: float) -> pb.Instruction | None:
        """The next instruction for ``site`` after (attempt, index), or None (nothing yet).
        Errors: RejectedError when the site has not joined."""
        result: pb.Instruction | None = self._fire(Event.POLL, site, attempt, index, now)
        return result

    def update_ready(self, site: int, round_id: int, weight: float, now: float) -> None:
        """A site's weight for the current secure round. Errors: RejectedError."""
        self._fire(Event.UPDATE_READY, site, round_id, weight, now)

    def check_update(self, site: int, round_id: int, now: float) -> Attempt:
        """The current attempt, if it takes an update from ``site`` now (checked again when the
        update is delivered). Errors: RejectedError."""
        self._touch(site, now)
        if self.stage is not Stage.UPDATE:
            raise RejectedError("FAILED_PRECONDITION", "no round is collecting updates now")
        return self._update_attempt(site, round_id)

    def plain_update(
        self, site: int, round_id: int, weight: float, update: tensors.Tensors, now: float
    ) -> None:
        """A site's plain update (already parsed and checked against the model's structure).
        Errors: RejectedError."""
        self._fire(Event.PLAIN_UPDATE, site, round_id, weight, update, now)

    def check_secagg(
        self, site: int, phase: ServerPhase, round_id: int, what: str, now: float
    ) -> Any:
        """The running SecAggServer's config, if ``phase`` takes ``what`` from ``site`` now.
        Errors: RejectedError."""
        self._touch(site, now)
        if self.stage is not Stage.SECAGG:
            raise RejectedError("FAILED_PRECONDITION", self._refusal(Event.SECAGG_MESSAGE))
        return self._secagg_for(site, phase, round_id, what).server.config

    def secagg_message(
        self, site: int, phase: ServerPhase, message: ClientMessage, what: str, now: float
    ) -> None:
        """A SecAgg message for the open phase. Errors: RejectedError (the round goes on)."""
        self._fire(Event.SECAGG_MESSAGE, site, phase, message, what, now)

    def check_ckks(self, site: int, round_id: int, now: float) -> server_rounds.CkksRound:
        """The CKKS round, if an upload from ``site`` is taken now (the caller adds the checked
        upload with :func:`server_rounds.ckks_add`, then reports :meth:`ckks_upload`).
        Errors: RejectedError."""
        self._touch(site, now)
        if self.stage is not Stage.CKKS_UPLOAD:
            raise RejectedError("FAILED_PRECONDITION", self._refusal(Event.CKKS_UPLOAD))
        return self._ckks_for(site, round_id)

    def ckks_upload(self, site: int, round_id: int, now: float) -> None:
        """``site``'s upload is in the running sum. Errors: RejectedError."""
        self._fire(Event.CKKS_UPLOAD, site, round_id, now)

    def metrics(
        self, site: int, round_id: int, values: Mapping[str, float], samples: int, now: float
    ) -> None:
        """A participant's evaluation metrics for the current round. Errors: RejectedError."""
        self._fire(Event.METRICS, site, round_id, values, samples, now)

    def count(self, site: int, received: int, sent: int, *, model: bool = False) -> None:
        """Count bytes in and out for the current attempt's record."""
        rs = self.current
        if rs is not None:
            rs.bytes_in[site] = rs.bytes_in.get(site, 0) + received
            rs.bytes_out[site] = rs.bytes_out.get(site, 0) + sent
            if model:
                rs.model_bytes_out += sent

    def rejected(self) -> None:
        """Count a refused call for the current attempt's record."""
        if self.current is not None:
            self.current.rejected += 1

    # -- the driver ---------------------------------------------------------------------------

    def stop(self, now: float) -> None:
        """Stop: a running round fails ("server stopping") at the next tick; a federation stopped
        before its last round counts as failed."""
        self.stopping = True

    def tick(self, now: float) -> Job | None:
        """Advance on time: start a round, close a stage at its deadline or when everyone
        answered, finish. Returns work for the driver to run outside the lock, if any."""
        return self._tick(now)

    def job_done(self, job: Job, result: Any, error: BaseException | None, now: float) -> None:
        """Apply the result of ``job`` (or its error: a protocol, config, crypto or update error
        fails the round; anything else is re-raised: the driver crashed)."""
        self._job_done(job, result, error, now)

    def wakeup(self, now: float) -> float:
        """Seconds until the driver should tick again (at most 1 s: liveness moves with time)."""
        nxt = min(self._deadline, self._heartbeat_at + self.config.deadlines.heartbeat_s)
        return max(0.01, min(1.0, nxt - now))

    def unfinished_sites(self, now: float) -> list[int]:
        """Live sites that have not yet been told the federation is over."""
        return [s for s in self.live(now) if not self.sites[s].told_finished]

    def live(self, now: float) -> dict[int, str]:
        """Joined sites heard from within ``liveness_s``."""
        horizon = self.config.deadlines.liveness_s
        return {
            sid: s.entry.name
            for sid, s in self.sites.items()
            if s.joined and now - s.last_seen <= horizon
        }


def run_job(job: Job) -> tuple[Any, BaseException | None]:
    """Run ``job`` and return (result, None) or (None, the exception it raised)."""
    try:
        return job.run(), None
    except Exception as exc:  # handed back to the coordinator, which decides
        return None, exc


def drive(coord: Coordinator, now: float) -> None:
    """Tick ``coord`` at ``now`` and run every job it hands out until it has none (tests)."""
    job = coord.tick(now)
    while job is not None:
        result, error = run_job(job)
        coord.job_done(job, result, error, now)
        job = coord.tick(now)
