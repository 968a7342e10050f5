"""The driver side of the coordinator's stage table: its tick and the driver events' handlers.

A mixin of :class:`secure_fl.transport.coordinator.Coordinator` (split from
:mod:`.coordinator_steps`, which holds the site events' handlers, to keep modules short): every
``_on_<event>`` method here is named in :data:`secure_fl.transport.stages.TABLE`;
:meth:`_DriverSteps._tick` decides which driver event fires now (a deadline passed, everyone
answered, the sites are ready) and logs the ``waiting`` heartbeat. Sans-IO: time is ``now``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.he.stream import TaintedSumError
from secure_fl.transport import coordinator_finish as fin
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.coordinator_steps import ROUND_ERRORS, Attempt, Job, RoundFailedError
from secure_fl.transport.stages import Event, Stage

if TYPE_CHECKING:
    from secure_fl.transport.config import ServerConfig
    from secure_fl.transport.coordinator import Coordinator, Host, SiteState
    from secure_fl.transport.logs import EventLog


class _DriverSteps:
    """Mixin: see the module docstring (``self`` is a Coordinator)."""

    if TYPE_CHECKING:  # provided by Coordinator
        config: ServerConfig
        host: Host
        log: EventLog
        public: Any
        privacy: Any
        optimizer: Any
        stage: Stage
        benched: dict[int, set[int]]
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

    def _tick(self, now: float) -> Job | None:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        stage, rs = self.stage, self.current
        if stage in (Stage.FINISHED, Stage.CLOSING):
            return None
        if self.stopping:
            if rs is not None:
                self._fire(Event.ROUND_FAILED, "server stopping", now)
            self._fire(Event.STOP, now)
            return None
        if stage is Stage.WAITING:
            if self.completed >= self.config.rounds or self.gave_up or self.budget_stop:
                self._fire(Event.ALL_DONE, now)
                return None
            return self._tick_waiting(now)
        assert rs is not None  # every running stage has an attempt
        if stage is Stage.UPDATE:
            missing = set(rs.participants) - set(rs.weights) - rs.excluded
            if not missing or now >= self._deadline:
                if len(rs.weights) < self.config.min_sites:
                    reason = (
                        f"only {len(rs.weights)} sites reported an update, min_sites is "
                        f"{self.config.min_sites}"
                    )
                    self._fire(Event.ROUND_FAILED, reason, now)
                    return None
                return self._fire(Event.UPDATES_CLOSED, now)  # type: ignore[no-any-return]
        elif stage is Stage.SECAGG and rs.secagg is not None:
            missing = set(rs.secagg.server.expected) - rs.excluded
            if not missing or now >= self._deadline:
                return self._fire(Event.PHASE_DUE, now)  # type: ignore[no-any-return]
        elif stage is Stage.CKKS_UPLOAD and rs.ckks is not None:
            missing = set(rs.ckks.factors) - rs.ckks.accepted - rs.excluded
            if not missing or now >= self._deadline:
                return self._fire(Event.UPLOADS_DUE, now)  # type: ignore[no-any-return]
        else:
            return None
        self._heartbeat(now, missing, self._deadline)
        return None

    def _heartbeat(self, now: float, missing: set[int], deadline: float) -> None:
        if now - self._heartbeat_at < self.config.deadlines.heartbeat_s:
            return
        self._heartbeat_at = now
        rs = self.current
        self.log.info(
            "waiting",
            stage=self.stage.value,
            round=(rs.index if rs is not None else self.completed) + 1,
            waiting_for=sorted(self.sites[s].entry.name for s in missing),
            seconds_left=max(0, int(deadline - now)),
        )

    def _tick_waiting(self, now: float) -> Job | None:
        cfg = self.config
        if self._wait_deadline is None:
            self._wait_deadline = now + cfg.deadlines.wait_for_sites_s
        wait_deadline = self._wait_deadline
        benched = self.benched.get(self.completed, set())
        if benched and len(self.sites) - len(benched) < cfg.min_sites:
            # Without them the round can never run: let them back in (the next taint fails the
            # attempt again, and max_attempts ends the federation) rather than wait forever.
            self.log.warning("bench-lifted", round=self.completed + 1, min_sites=cfg.min_sites)
            benched = set()
            self.benched.pop(self.completed, None)
        live = {sid: name for sid, name in self.live(now).items() if sid not in benched}
        everyone = len(self.sites) - len(benched)
        enough = len(live) >= cfg.min_sites  # benched sites can leave fewer than min_sites
        if enough and (len(live) == everyone or now >= wait_deadline):
            self._wait_deadline = None
            dp_json = ""
            if self.privacy is not None:
                try:  # the budget is checked before any site hears of the round
                    dp_json = str(self.privacy.before_round(self.completed, dict(live)) or "")
                except BudgetExceededError as exc:
                    self.budget_stop = str(exc)
                    self.log.warning("privacy-budget-exhausted", reason=str(exc))
                    return None
                except ConfigError as exc:  # e.g. fewer participants than the noise needs
                    self.log.warning("privacy-refused-round", reason=str(exc))
                    self.failures += 1
                    if self.failures >= cfg.max_attempts:
                        self.log.error(
                            "giving-up", round=self.completed + 1, attempts=self.failures
                        )
                        self.failed = self.gave_up = True
                    self._wait_deadline = now + cfg.deadlines.wait_for_sites_s
                    return None
            self._fire(Event.SITES_READY, live, dp_json, now)
            return None
        if now >= wait_deadline:
            self.log.warning(
                "waiting-for-sites", live=sorted(live.values()), min_sites=cfg.min_sites
            )
            wait_deadline = self._wait_deadline = now + cfg.deadlines.wait_for_sites_s
        self._heartbeat(now, set(self.sites) - set(live), wait_deadline)
        return None

    def _on_sites_ready(self, participants: dict[int, str], dp_json: str, now: float) -> None:
        cfg = self.config
        round_id = self.host.new_round_id()
        self.attempts += 1
        rs = Attempt(self.attempts, round_id, dict(participants), self.completed, now)
        rs.dp_json = dp_json
        self.current = rs
        view = self.host.model_view()
        round_config = json.dumps(cfg.round_config, sort_keys=True) if cfg.round_config else ""
        for site in sorted(participants):
            self.host.post(
                rs,
                site,
                "round_start",
                pb.RoundStart(
                    aggregation=cfg.aggregation.protocol,
                    model_sha256=view.sha256,
                    model_bytes=view.nbytes,
                    deadline_s=cfg.deadlines.update_s,
                    model_round_id=self.model_round_id,
                    round_index=rs.index,
                    round_config_json=round_config,
                ),
            )
        self._deadline = now + cfg.deadlines.update_s
        self.log.info(
            "round-start",
            round=rs.index + 1,
            round_id=round_id,
            attempt=rs.attempt,
            participants=sorted(participants.values()),
        )
        rs.record = {
            "round": rs.index,
            "round_id": round_id,
            "attempt": rs.attempt,
            "aggregation": cfg.aggregation.protocol,
            "participants": {str(k): v for k, v in sorted(participants.items())},
        }
        if cfg.round_config:
            rs.record["round_config"] = dict(cfg.round_config)

    def _on_updates_closed(self, now: float) -> Job:
        rs = self.current
        assert rs is not None
        reported = dict(rs.weights)
        rs.record["reported"] = sorted(reported)
        return fin.open_job(cast("Coordinator", self), rs, reported)

    def _on_secagg_opened(self, out: Mapping[int, Any], now: float) -> None:
        rs = self.current
        assert rs is not None
        for site, (kind, message) in sorted(out.items()):
            if site not in rs.excluded:
                self.host.post(rs, site, kind, message)
        self._deadline = now + self.config.deadlines.phase_s

    def _on_ckks_opened(self, out: Mapping[int, Any], now: float) -> None:
        self._on_secagg_opened(out, now)

    def _on_phase_due(self, now: float) -> Job:
        return fin.close_phase_job(cast("Coordinator", self))

    def _on_uploads_due(self, now: float) -> Job:
        return fin.ckks_sum_job(cast("Coordinator", self))

    def _on_round_ended(self, record: dict[str, Any], now: float) -> None:
        fin.end_attempt(cast("Coordinator", self), record, completed=True, reason="", now=now)

    def _on_round_failed(self, reason: str, now: float) -> None:
        rs = self.current
        if rs is None:
            return
        fin.end_attempt(
            cast("Coordinator", self), dict(rs.record), completed=False, reason=reason, now=now
        )

    def _on_all_done(self, now: float) -> None:
        if self.completed == 0:
            self.failed = True  # nothing trained: every party exits non-zero

    def _on_stop(self, now: float) -> None:
        self.current = None
        if self.completed < self.config.rounds and not self.budget_stop:
            self.failed = True  # interrupted before every round was done

    def _bench_tainting_sites(self, error: BaseException) -> None:
        """After a CKKS sum was tainted by incomplete uploads, leave their senders out of the
        round's next attempts (they would taint it again) and say so."""
        names = getattr(error, "sites", None)
        rs = self.current
        if not isinstance(error, TaintedSumError) or not names or rs is None:
            return
        ids = {sid for sid, name in rs.participants.items() if name in names}
        self.benched.setdefault(rs.index, set()).update(ids)
        self.log.warning(
            "sites-benched",
            round=rs.index + 1,
            sites=sorted(names),
            note="their incomplete CKKS uploads tainted the sum; the round runs again without them",
        )

    def _job_done(self, job: Job, result: Any, error: BaseException | None, now: float) -> None:
        if error is not None:
            if isinstance(error, (RoundFailedError, *ROUND_ERRORS)):
                self._bench_tainting_sites(error)
                self._fire(Event.ROUND_FAILED, str(error), now)
                return
            raise error
        job.then(result, now)
