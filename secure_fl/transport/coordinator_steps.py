"""The site events' handlers of the coordinator's stage table (:mod:`.stages`), and the
attempt's state.

A mixin of :class:`secure_fl.transport.coordinator.Coordinator` (split out to keep each module
short): every ``_on_<event>`` method here is named in :data:`secure_fl.transport.stages.TABLE`
(the driver events' handlers are in :mod:`.coordinator_tick`). Sans-IO like the coordinator: time
is the ``now`` argument; durable writes go through the host; expensive work is a :class:`Job`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from secure_fl.errors import (
    ConfigError,
    CryptoError,
    InvalidUpdateError,
    ProtocolError,
    RemoteProtocolError,
)
from secure_fl.secagg import ServerPhase
from secure_fl.secagg.messages import ClientMessage
from secure_fl.transport import server_rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.stages import Event, Stage

if TYPE_CHECKING:
    from secure_fl.transport.config import ServerConfig
    from secure_fl.transport.coordinator import Host, SiteState
    from secure_fl.transport.logs import EventLog

ROUND_ERRORS = (ProtocolError, ConfigError, InvalidUpdateError, CryptoError)


class RoundFailedError(Exception):
    """A round attempt ended without a result (too few sites, a protocol abort)."""


@dataclass(frozen=True)
class Job:
    """Work the driver runs outside the lock; ``kind`` names the step ("open", "close-phase",
    "finish"), ``then`` is applied to the result under the lock again."""

    kind: str
    run: Callable[[], Any]
    then: Callable[[Any, float], None]


@dataclass
class Attempt:
    """One attempt at a round (its own fresh round id)."""

    attempt: int
    round_id: int
    participants: dict[int, str]
    index: int = 0  # the federation round this attempt tries to complete (0-based)
    started: float = 0.0
    weights: dict[int, float] = field(default_factory=dict)
    plain_updates: dict[int, tensors.Tensors] = field(default_factory=dict)
    secagg: server_rounds.SecAggRound | None = None
    ckks: server_rounds.CkksRound | None = None
    excluded: set[int] = field(default_factory=set)
    metrics: dict[int, tuple[dict[str, float], int]] = field(default_factory=dict)
    bytes_in: dict[int, int] = field(default_factory=dict)
    bytes_out: dict[int, int] = field(default_factory=dict)
    rejected: int = 0
    model_bytes_out: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    dp_json: str = ""


class _Handlers:
    """Mixin: see the module docstring (``self`` is a Coordinator)."""

    if TYPE_CHECKING:  # provided by Coordinator
        config: ServerConfig
        host: Host
        log: EventLog
        public: Any
        privacy: Any
        optimizer: Any
        stage: Stage
        sites: dict[int, SiteState]
        current: Attempt | None
        completed: int
        attempts: int
        model_round_id: int
        failed: bool
        stopping: bool
        gave_up: bool
        budget_stop: str
        failures: int
        _wait_deadline: float | None
        _deadline: float
        _heartbeat_at: float
        _pending: Job | None

        def _fire(self, event: Event, *args: Any) -> Any: ...
        def _touch(self, site: int, now: float) -> SiteState: ...
        def live(self, now: float) -> dict[int, str]: ...

    # -- site events (stage unchanged) --------------------------------------------------------

    def _on_join(self, site: int, now: float) -> bool:
        s = self.sites[site]
        rejoined = s.joined
        s.joined, s.last_seen, s.told_finished = True, now, False
        rs = self.current
        if rs is None or site not in rs.participants:
            s.queue = []  # whatever was queued for an earlier process of this site is stale
        elif self.stage is Stage.UPDATE:
            rs.weights.pop(site, None)  # a restarted site redoes its update in this attempt
            rs.plain_updates.pop(site, None)
        elif site not in rs.excluded:
            rs.excluded.add(site)  # its protocol state is gone: a dropout of this attempt
            s.attempt, s.queue = rs.attempt, []
        return rejoined

    def _on_poll(self, site: int, attempt: int, index: int, now: float) -> Any:
        s = self._touch(site, now)
        if self.stage is Stage.FINISHED:
            s.told_finished = True
            view = self.host.model_view()
            return pb.Instruction(
                round_id=self.completed,
                finished=pb.Finished(
                    rounds_completed=self.completed,
                    model_sha256=view.sha256,
                    model_round_id=self.model_round_id,
                ),
            )
        if not s.queue:
            return None
        if attempt == s.attempt:
            return s.queue[index] if index < len(s.queue) else None
        return s.queue[0]

    def _update_attempt(self, site: int, round_id: int) -> Attempt:
        rs = self.current
        if rs is None:
            raise RejectedError("FAILED_PRECONDITION", "no round is collecting updates now")
        if round_id != rs.round_id:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"update for round {round_id}, the current round is {rs.round_id}",
            )
        if site not in rs.participants:
            raise RejectedError(
                "FAILED_PRECONDITION", "this site is not a participant of this round"
            )
        if site in rs.weights:
            raise RejectedError("FAILED_PRECONDITION", "update already reported for this round")
        return rs

    def _on_update_ready(self, site: int, round_id: int, weight: float, now: float) -> None:
        self._touch(site, now)
        protocol = self.config.aggregation.protocol
        if protocol not in ("secagg", "secagg+", "ckks"):
            raise RejectedError(
                "FAILED_PRECONDITION", f"this federation aggregates with {protocol}"
            )
        _check_weight(weight)
        self._update_attempt(site, round_id).weights[site] = float(weight)

    def _on_plain_update(
        self,
        site: int,
        round_id: int,
        weight: float,
        update: tensors.Tensors,
        now: float,
    ) -> None:
        self._touch(site, now)
        if self.config.aggregation.protocol != "plain":
            raise RejectedError(
                "FAILED_PRECONDITION", "this federation does not take plain updates"
            )
        _check_weight(weight)
        rs = self._update_attempt(site, round_id)
        rs.plain_updates[site] = update
        rs.weights[site] = float(weight)

    def _secagg_for(
        self, site: int, phase: ServerPhase, round_id: int, what: str
    ) -> server_rounds.SecAggRound:
        rs = self.current
        sa = rs.secagg if rs is not None else None
        if rs is None or sa is None:
            raise RejectedError(
                "FAILED_PRECONDITION", f"{what} refused: no secure aggregation is running"
            )
        if round_id != rs.round_id:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} for round {round_id} refused: the current round is {rs.round_id}",
            )
        if sa.server.phase is not phase:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} refused: the server is in phase {sa.server.phase.value}",
            )
        if site in rs.excluded or site not in sa.server.expected:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"{what} refused: site {self.sites[site].entry.name} is not expected in phase "
                f"{phase.value} (not a participant, a duplicate, or dropped)",
            )
        return sa

    def _on_secagg_message(
        self,
        site: int,
        phase: ServerPhase,
        message: ClientMessage,
        what: str,
        now: float,
    ) -> None:
        self._touch(site, now)
        sa = self._secagg_for(site, phase, message.round_id, what)
        try:
            sa.round.receive(site, message)
        except RemoteProtocolError as exc:
            raise RejectedError("INVALID_ARGUMENT", str(exc)) from exc

    def _ckks_for(self, site: int, round_id: int) -> server_rounds.CkksRound:
        rs = self.current
        if rs is None or rs.ckks is None:
            raise RejectedError(
                "FAILED_PRECONDITION", "UploadCiphertext refused: no CKKS round is at that step"
            )
        if round_id != rs.round_id:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"UploadCiphertext for round {round_id} refused: the current round is "
                f"{rs.round_id}",
            )
        if site in rs.excluded or site not in rs.ckks.factors:
            raise RejectedError(
                "FAILED_PRECONDITION",
                f"UploadCiphertext refused: site {self.sites[site].entry.name} is not expected",
            )
        if site in rs.ckks.accepted:
            raise RejectedError("FAILED_PRECONDITION", "ciphertexts already uploaded")
        return rs.ckks

    def _on_ckks_upload(self, site: int, round_id: int, now: float) -> None:
        self._touch(site, now)
        self._ckks_for(site, round_id).accepted.add(site)

    def _on_metrics(
        self,
        site: int,
        round_id: int,
        values: Mapping[str, float],
        samples: int,
        now: float,
    ) -> None:
        self._touch(site, now)
        rs = self.current
        if rs is None or round_id != rs.round_id or site not in rs.participants:
            raise RejectedError(
                "FAILED_PRECONDITION", f"metrics for round {round_id} refused: not this round"
            )
        if site in rs.metrics:
            raise RejectedError("FAILED_PRECONDITION", "metrics already reported for this round")
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if bad:
            raise RejectedError("INVALID_ARGUMENT", f"metrics must be finite: {bad}")
        rs.metrics[site] = ({str(k): float(v) for k, v in values.items()}, int(samples))


def _check_weight(weight: float) -> None:
    if not (math.isfinite(weight) and weight > 0):
        raise RejectedError("INVALID_ARGUMENT", f"weight must be finite and > 0, got {weight}")
