"""The coordinator's jobs (open a protocol, close a phase, sum, finish) and the end of an attempt.

Each ``*_job`` function is called under the coordinator's lock and returns a
:class:`~secure_fl.transport.coordinator_steps.Job`: ``run`` is the expensive part (pure
computation, plus the host's durable writes when a round completes) that the driver runs outside
the lock; ``then`` applies its result under the lock (posts instructions, fires the next event).

A completed round is checkpointed durably (model, history, ledger, optimiser state) *before* any
site hears of its outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_fl.secagg import ServerPhase
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport import rounds, server_rounds
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.coordinator_steps import Attempt, Job, RoundFailedError
from secure_fl.transport.stages import Event

if TYPE_CHECKING:
    from secure_fl.transport.coordinator import Coordinator


def open_job(coord: Coordinator, rs: Attempt, reported: dict[int, float]) -> Job:
    """The update stage closed with ``reported`` weights: aggregate (plain) or open the secure
    protocol (secagg, ckks)."""
    cfg = coord.config
    protocol = cfg.aggregation.protocol
    view = coord.host.model_view()
    if protocol == "plain":
        updates = {s: rs.plain_updates[s] for s in reported}
        survivors = frozenset(reported)
        rs.record.update(survivors=sorted(survivors), dropped=[])
        snapshot = _snapshot(coord, rs)

        def run_plain() -> dict[str, Any]:
            mean, fields = server_rounds.plain_mean(cfg, updates, reported, round_id=rs.round_id)
            snapshot.update(fields)
            return complete(coord, rs, snapshot, mean=mean, survivors=survivors, weights=reported)

        return Job("aggregate", run_plain, lambda record, now: _ended(coord, record, now))
    if protocol == "ckks":
        names = {s: rs.participants[s] for s in reported}

        def run_ckks() -> server_rounds.CkksRound:
            return server_rounds.ckks_open(
                cfg, coord.public, reported, view.structure, round_id=rs.round_id, names=names
            )

        def then_ckks(ck: server_rounds.CkksRound, now: float) -> None:
            rs.ckks = ck
            preset = coord.public.preset
            rs.record.update(ckks_fingerprint=coord.public.fingerprint, ckks_preset=preset.name)
            out = {s: ("ckks_setup", m) for s, m in ck.setups.items()}
            coord._fire(Event.CKKS_OPENED, out, now)

        return Job("open", run_ckks, then_ckks)
    vector_length = rounds.model_size(view.tensors)

    def run_secagg() -> server_rounds.SecAggRound:
        return server_rounds.secagg_open(
            cfg,
            reported,
            round_id=rs.round_id,
            vector_length=vector_length,
            distributed_dp_json=rs.dp_json,
            l2_clip=coord.privacy.l2_clip() if coord.privacy is not None else None,
        )

    def then_secagg(sa: server_rounds.SecAggRound, now: float) -> None:
        rs.secagg = sa
        rs.record.update(sa.record)
        if len(reported) == 2 and not coord.warned_two_sites:
            coord.warned_two_sites = True
            coord.log.warning(
                "two-site-round",
                note="with two parties each can derive the other's update from the mean",
            )
        out = {s: ("secagg_setup", m) for s, m in sa.setups.items()}
        coord._fire(Event.SECAGG_OPENED, out, now)

    return Job("open", run_secagg, then_secagg)


def close_phase_job(coord: Coordinator) -> Job:
    """Close the open SecAgg phase (everyone answered or its deadline passed)."""
    rs = coord.current
    if rs is None or rs.secagg is None:
        raise RoundFailedError("no secure aggregation is running")
    sa = rs.secagg
    closing = sa.server.phase.value
    missing = sorted(sa.server.expected)

    def then(out: Mapping[int, Any], now: float) -> None:
        coord.log.info(
            "phase-closed", round=rs.index + 1, round_id=rs.round_id, phase=closing, missing=missing
        )
        if sa.server.phase in (ServerPhase.DONE, ServerPhase.ABORTED):
            coord._pending = _secagg_finish_job(coord, rs, sa)
            return
        messages = {s: server_rounds.instruction(m) for s, m in out.items()}
        coord._fire(Event.SECAGG_OPENED, messages, now)

    return Job("close-phase", sa.round.close, then)


def _secagg_finish_job(coord: Coordinator, rs: Attempt, sa: server_rounds.SecAggRound) -> Job:
    snapshot = _snapshot(coord, rs)

    def run() -> dict[str, Any]:
        mean, survivors, fields = server_rounds.secagg_mean(sa)  # ProtocolError when aborted
        snapshot.update(fields)
        return complete(coord, rs, snapshot, mean=mean, survivors=survivors, weights=rs.weights)

    return Job("aggregate", run, lambda record, now: _ended(coord, record, now))


def ckks_sum_job(coord: Coordinator) -> Job:
    """Close the CKKS uploads: the running homomorphic sum of the complete ones is the new
    (encrypted) global model."""
    rs = coord.current
    if rs is None or rs.ckks is None:
        raise RoundFailedError("no CKKS round is running")
    ck = rs.ckks
    missing = sorted(set(ck.factors) - ck.accepted)
    coord.log.info("ckks-uploads-closed", round=rs.index + 1, round_id=rs.round_id, missing=missing)
    snapshot = _snapshot(coord, rs)

    def run() -> dict[str, Any]:
        blob, fields = server_rounds.ckks_close(ck)  # ThresholdError below min_sites
        snapshot.update(fields)
        coord.log.info(
            "ckks-sum",
            round=rs.index + 1,
            round_id=rs.round_id,
            contributors=len(fields["survivors"]),
            share=fields["ckks_share"],
            note="the new global model is encrypted; every site decrypts it itself",
        )
        return complete(coord, rs, snapshot, blob=blob)

    return Job("aggregate", run, lambda record, now: _ended(coord, record, now))


def _snapshot(coord: Coordinator, rs: Attempt) -> dict[str, Any]:
    """The attempt's record as of now (taken under the lock: handlers keep counting)."""
    record = dict(rs.record)
    record.update(
        bytes_in=sum(rs.bytes_in.values()),
        bytes_out=sum(rs.bytes_out.values()),
        model_bytes_out=rs.model_bytes_out,
        bytes_in_per_site={str(k): v for k, v in sorted(rs.bytes_in.items())},
        bytes_out_per_site={str(k): v for k, v in sorted(rs.bytes_out.items())},
        rejected_calls=rs.rejected,
    )
    if rs.metrics:
        reports = {rs.participants[s]: m for s, m in rs.metrics.items()}
        record["metrics"] = server_rounds.pooled_metrics(reports)
    return record


def complete(
    coord: Coordinator,
    rs: Attempt,
    record: dict[str, Any],
    *,
    mean: np.ndarray | None = None,
    survivors: frozenset[int] = frozenset(),
    weights: Mapping[int, float] | None = None,
    blob: bytes | None = None,
) -> dict[str, Any]:
    """Make the round's result the global model and checkpoint it (outside the lock; only the
    driver changes the model, the history and the checkpoint). Returns the round record.

    The decoded mean goes through the privacy layer (central noise, ledger) and the server
    optimiser (when configured) before it updates the model."""
    if mean is not None:
        if coord.privacy is not None:
            names = {s: rs.participants[s] for s in sorted(survivors)}
            mean = coord.privacy.apply(rs.index, mean, names, dict(weights or {}), record)
        step = coord.optimizer.step(mean) if coord.optimizer is not None else mean
        coord.host.set_model(rounds.apply_mean(coord.host.model_view().tensors, step))
    elif blob is not None:
        coord.host.set_encrypted_model(blob)
    view = coord.host.model_view()
    record.update(completed=True, reason="", model_sha256=view.sha256.hex())
    record["seconds"] = round(_elapsed(coord, rs), 4)
    optimizer = coord.optimizer.state_dict() if coord.optimizer is not None else None
    # The round record first, the checkpoint (the commit point) last: a crash in between re-runs
    # the round, whose record is then written again; never a checkpoint without its record.
    coord.host.save_round_record(f"round-{rs.index:06d}", record)
    coord.host.save_checkpoint(
        ckpt.Checkpoint(
            federation=coord.config.federation,
            completed_rounds=coord.completed + 1,
            model=view.tensors,
            model_sha256=view.sha256.hex(),
            history=(*coord.history, record),
            ledger=coord.ledger,
            encrypted_model=blob if view.encrypted else None,
            server_optimizer=optimizer,
        ),
        blob,
    )
    return record


def _elapsed(coord: Coordinator, rs: Attempt) -> float:
    return float(coord.host.clock() - rs.started)


def _ended(coord: Coordinator, record: dict[str, Any], now: float) -> None:
    coord._fire(Event.ROUND_ENDED, record, now)


def end_attempt(
    coord: Coordinator, record: dict[str, Any], *, completed: bool, reason: str, now: float
) -> None:
    """Record the attempt (a failed one is written here; a completed one was checkpointed by its
    job), then tell the participants and log it."""
    rs = coord.current
    if rs is None:
        return
    if completed:
        coord.completed += 1
        coord.history.append(record)
        coord.model_round_id = rs.round_id
        coord.failures = 0
    else:
        record = _snapshot(coord, rs)
        record.update(
            completed=False,
            reason=reason,
            seconds=round(now - rs.started, 4),
            model_sha256=coord.host.model_view().sha256.hex(),
        )
        coord.host.save_round_record(f"round-{rs.index:06d}-failed-{rs.attempt}", record)
        coord.failures += 1
    survivors = record.get("survivors", [])
    dropped = record.get("dropped", [])
    digest = coord.host.model_view().sha256
    for site in sorted(rs.participants):
        coord.host.post(
            rs,
            site,
            "outcome",
            pb.RoundOutcome(
                completed=completed,
                survivors=survivors,
                dropped=dropped,
                reason=reason,
                model_sha256=digest,
                next_round=coord.completed,
            ),
        )
    coord.current = None
    if completed:
        coord.log.info(
            "round-completed",
            round=rs.index + 1,
            round_id=rs.round_id,
            attempt=rs.attempt,
            survivors=survivors,
            dropped=dropped,
            seconds=record.get("seconds"),
            bytes_in=record.get("bytes_in"),
            bytes_out=record.get("bytes_out"),
        )
        if "metrics" in record:
            pooled = {k: v["pooled"] for k, v in record["metrics"].items()}
            coord.log.info("site-metrics", round=rs.index + 1, pooled=pooled)
        return
    coord.log.warning(
        "round-failed", round=rs.index + 1, round_id=rs.round_id, attempt=rs.attempt, reason=reason
    )
    if coord.failures >= coord.config.max_attempts:
        coord.log.error("giving-up", round=coord.completed + 1, attempts=coord.failures)
        coord.failed = True
        coord.gave_up = True
