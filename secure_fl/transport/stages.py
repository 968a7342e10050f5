"""The server's stage machine: ONE table ``(stage, event) -> (handler, next stage)``.

The coordinator (:mod:`.coordinator`) is in exactly one :class:`Stage`. Everything that happens to
it is an :class:`Event`: a site's message (a join, a poll, an update, a protocol message) or a
decision of the driver (the sites are ready, a deadline passed, a computation finished). The
table :data:`TABLE` names, for every pair that is allowed, the coordinator method that handles it
and the stage that follows (``None``: the stage does not change). A pair that is not in the table
is refused: a site's message in the wrong stage gets ``FAILED_PRECONDITION`` (and the round goes
on); an internal event in the wrong stage is a bug (:class:`StageError`).

Stages of one federation::

    WAITING --sites_ready--> UPDATE --updates_closed--> CLOSING --secagg_opened--> SECAGG
       ^  |                                               |  ^ --ckks_opened--> CKKS_UPLOAD
       |  all_done / stop -> FINISHED                     |  +--phase_due / uploads_due--+
       +-------------- round_ended / round_failed -------+

``CLOSING`` is the stage in which the driver runs a computation outside the lock (close a SecAgg
phase, sum, decode, checkpoint); site messages for the round are refused meanwhile.
"""

from __future__ import annotations

import enum

from secure_fl.errors import ProtocolError


class Stage(enum.Enum):
    """Where the federation is (see the module docstring)."""

    WAITING = "waiting"  # between rounds: waiting for the sites to be live
    UPDATE = "update"  # collecting updates (plain) or weights (secagg, ckks)
    SECAGG = "secagg"  # a SecAgg / SecAgg+ phase is open
    CKKS_UPLOAD = "ckks_upload"  # collecting encrypted uploads
    CLOSING = "closing"  # the driver computes (no site message of the round is taken)
    FINISHED = "finished"  # the federation is over: polls get Finished


class Event(enum.Enum):
    """What can happen to the coordinator. Site events first, then the driver's."""

    JOIN = "join"
    POLL = "poll"
    METRICS = "metrics"
    UPDATE_READY = "update_ready"
    PLAIN_UPDATE = "plain_update"
    SECAGG_MESSAGE = "secagg_message"
    CKKS_UPLOAD = "ckks_upload"
    # -- the driver's events
    SITES_READY = "sites_ready"
    UPDATES_CLOSED = "updates_closed"
    SECAGG_OPENED = "secagg_opened"
    CKKS_OPENED = "ckks_opened"
    PHASE_DUE = "phase_due"
    UPLOADS_DUE = "uploads_due"
    ROUND_ENDED = "round_ended"
    ROUND_FAILED = "round_failed"
    ALL_DONE = "all_done"
    STOP = "stop"


SITE_EVENTS = frozenset(
    {
        Event.JOIN,
        Event.POLL,
        Event.METRICS,
        Event.UPDATE_READY,
        Event.PLAIN_UPDATE,
        Event.SECAGG_MESSAGE,
        Event.CKKS_UPLOAD,
    }
)

_ALL = tuple(Stage)
_RUNNING = (Stage.UPDATE, Stage.SECAGG, Stage.CKKS_UPLOAD, Stage.CLOSING)

# (stage, event) -> (Coordinator method name, next stage or None for "unchanged").
TABLE: dict[tuple[Stage, Event], tuple[str, Stage | None]] = {
    **{(s, Event.JOIN): ("_on_join", None) for s in _ALL},
    **{(s, Event.POLL): ("_on_poll", None) for s in _ALL},
    **{(s, Event.METRICS): ("_on_metrics", None) for s in _RUNNING},
    (Stage.UPDATE, Event.UPDATE_READY): ("_on_update_ready", None),
    (Stage.UPDATE, Event.PLAIN_UPDATE): ("_on_plain_update", None),
    (Stage.SECAGG, Event.SECAGG_MESSAGE): ("_on_secagg_message", None),
    (Stage.CKKS_UPLOAD, Event.CKKS_UPLOAD): ("_on_ckks_upload", None),
    (Stage.WAITING, Event.SITES_READY): ("_on_sites_ready", Stage.UPDATE),
    (Stage.UPDATE, Event.UPDATES_CLOSED): ("_on_updates_closed", Stage.CLOSING),
    (Stage.CLOSING, Event.SECAGG_OPENED): ("_on_secagg_opened", Stage.SECAGG),
    (Stage.CLOSING, Event.CKKS_OPENED): ("_on_ckks_opened", Stage.CKKS_UPLOAD),
    (Stage.SECAGG, Event.PHASE_DUE): ("_on_phase_due", Stage.CLOSING),
    (Stage.CKKS_UPLOAD, Event.UPLOADS_DUE): ("_on_uploads_due", Stage.CLOSING),
    (Stage.CLOSING, Event.ROUND_ENDED): ("_on_round_ended", Stage.WAITING),
    **{(s, Event.ROUND_FAILED): ("_on_round_failed", Stage.WAITING) for s in _RUNNING},
    (Stage.WAITING, Event.ALL_DONE): ("_on_all_done", Stage.FINISHED),
    **{(s, Event.STOP): ("_on_stop", Stage.FINISHED) for s in _ALL},
}


class StageError(ProtocolError):
    """An event that the table does not allow in the current stage."""


def lookup(stage: Stage, event: Event) -> tuple[str, Stage | None]:
    """The handler name and next stage for ``event`` in ``stage``.

    Errors: StageError when the table has no such pair (the caller turns a site's event into a
    FAILED_PRECONDITION refusal)."""
    try:
        return TABLE[(stage, event)]
    except KeyError:
        raise StageError(f"{event.value} is not allowed in stage {stage.value}") from None
