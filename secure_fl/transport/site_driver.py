"""The sans-IO site: turns the server's instructions into replies, with no sockets.

:class:`SiteDriver` holds everything a site decides: its poll cursor, its round state, its policy
checks, its task, its secure-aggregation client and CKKS encryption, its durable guards. The
transport (the gRPC shell :class:`secure_fl.transport.site.SiteRunner`, or a test) polls, passes
each :class:`~secure_fl.transport._generated.federation_pb2.Instruction` to :meth:`handle` with
a ``fetch(digest) -> bytes`` that downloads a model, and sends the returned replies in order
(:mod:`.site_replies`). The guarantees of :mod:`secure_fl.transport.site` are kept here:

* a refusal (:class:`~secure_fl.errors.PolicyError`: an aggregation, a round configuration or a
  privacy floor this site's policy does not accept) returns no reply, logs ``policy-refused`` at
  WARNING and marks the round failed: nothing more is sent in it;
* any other error of a round (protocol, task, configuration) fails that round only; the next
  ``RoundStart`` starts afresh;
* CKKS fails closed: a failed check on secret values writes the marker and raises
  :class:`~secure_fl.transport.site_model.FailClosedError` (never caught per round);
* an instruction of a kind this site does not know is refused and never acted on;
* any other exception while acting on an instruction (hostile JSON, a bug) refuses only that
  round (``round-error`` at ERROR with its type): the site process does not die of it.

This module stays whole (a little over 400 lines): it is one class, the site's instruction
dispatcher, whose round steps already live in :mod:`.site_round`, :mod:`.site_secagg`,
:mod:`.site_ckks` and :mod:`.site_dp`; splitting the dispatcher would scatter one state machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from secure_fl.crypto import SigningKey
from secure_fl.errors import (
    ConfigError,
    CryptoError,
    InvalidUpdateError,
    PolicyError,
    ProtocolError,
    RemoteProtocolError,
)
from secure_fl.transport import tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import FEDERATION_PROTOCOL, SiteConfig
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.replay import ContributionGuard
from secure_fl.transport.site_dp import DP_RECORD, DPRoundRecord, site_privacy
from secure_fl.transport.site_model import (
    FAIL_CLOSED_MARKER,
    FailClosedError,
    FetchModel,
    SiteModel,
    write_fail_closed_marker,
)
from secure_fl.transport.site_replies import Reply
from secure_fl.transport.site_round import RoundState, RoundSteps
from secure_fl.transport.site_secagg import (
    SECAGG_INSTRUCTIONS,
    UnmaskGuard,
)
from secure_fl.transport.tasks import SiteTask

EXIT_FINISHED = 0
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_TRAINED = 5
EXIT_FAIL_CLOSED = 6
EXIT_TLS = 7

__all__ = [
    "EXIT_FAIL_CLOSED",
    "EXIT_FINISHED",
    "EXIT_NOT_TRAINED",
    "EXIT_REFUSED",
    "EXIT_TLS",
    "EXIT_UNREACHABLE",
    "FAIL_CLOSED_MARKER",
    "FailClosedError",
    "SiteDriver",
    "Step",
]


@dataclass(frozen=True)
class Step:
    """What to do after one instruction: send ``replies`` in order; ``exit_status`` is set when
    the federation is over (the transport stops and returns it)."""

    replies: tuple[Reply, ...] = ()
    exit_status: int | None = None


@dataclass
class _Cursor:
    attempt: int = 0
    next_index: int = 0
    session: bytes = field(default=b"", repr=False)
    poll_wait_ms: int = 10_000
    planned_rounds: int = 0


class SiteDriver(RoundSteps):
    """One site, without a transport (module docstring).

    ``task``: what the site computes; ``log``: an :class:`~secure_fl.transport.logs.EventLog`;
    ``crash_hook`` (tests only): called with a step name and the round id just before the step;
    ``privacy``: the site's :class:`secure_fl.transport.privacy.SitePrivacy` (built from the
    config when None and the module exists); ``fetch_errors``: the transport's exception types
    that a failed final-model download may raise (logged, not fatal).
    """

    def __init__(
        self,
        config: SiteConfig,
        *,
        task: SiteTask,
        log: Any,
        signing_key: SigningKey | None = None,
        crash_hook: Callable[[str, int], None] | None = None,
        privacy: Any = None,
        fetch_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.config = config
        self.task = task
        self.log = log
        self.site_id = config.site_id
        self.signing_key = signing_key
        self._crash_hook = crash_hook
        self._privacy = privacy if privacy is not None else site_privacy(config)
        self._fetch_errors = fetch_errors
        self.cursor = _Cursor()
        self.models = SiteModel(config, log, self._fail_closed)
        self.round: RoundState | None = None
        self._contributions = ContributionGuard(
            config.state_dir / "contributions.json", config.federation
        )
        self.unmask_guard = UnmaskGuard(config.state_dir / "unmasked.json", config.federation)
        self.dp_record = DPRoundRecord(
            config.state_dir / DP_RECORD, config.federation, config.policy.max_dp_rounds
        )
        self._warned_two_sites = False

    # -- lifecycle ----------------------------------------------------------------------------

    def may_start(self) -> bool:
        """False (logged at ERROR) while the fail-closed marker exists: the site must not
        contact the server until an operator removed it."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        marker = self.config.state_dir / FAIL_CLOSED_MARKER
        if marker.exists():
            self.log.error(
                "fail-closed-marker",
                marker=str(marker),
                reason="this site stopped for good after a failed check on secret values; it "
                "does not rejoin until an operator has found out why and removed the marker",
            )
            return False
        return True

    def join_request(self, software_version: str) -> pb.JoinRequest:
        """The Join message of this site."""
        return pb.JoinRequest(
            protocol_version=FEDERATION_PROTOCOL, software_version=software_version
        )

    def joined(self, reply: pb.JoinReply) -> None:
        """Take the server's JoinReply: the session, poll wait and planned rounds; the poll
        cursor restarts. Errors: ConfigError when the server knows this site by another name."""
        if reply.site_id != self.site_id or reply.site_name != self.config.name:
            raise ConfigError(
                f"the server knows this site as {reply.site_name!r} (id {reply.site_id}), the "
                f"config says {self.config.name!r} (id {self.site_id})"
            )
        self.cursor = _Cursor(
            session=reply.session,
            poll_wait_ms=max(100, reply.poll_wait_ms),
            planned_rounds=int(reply.rounds),
        )
        self.log.info("joined", federation=reply.federation, next_round=reply.next_round + 1)

    def poll_request(self) -> pb.PollRequest:
        """The next Poll message (session and cursor)."""
        c = self.cursor
        return pb.PollRequest(
            session=c.session, attempt=c.attempt, next_index=c.next_index, wait_ms=c.poll_wait_ms
        )

    def drop_round(self, reason: str) -> None:
        """Leave the current round (the connection was lost, the site joins again)."""
        if self.round is not None:
            self.round.abort()
            self.log.info(
                "left-round",
                round=self.round.round_index + 1,
                round_id=self.round.round_id,
                reason=reason,
            )
        self.round = None

    def server_refused(self, code: str, reason: str) -> None:
        """The server refused one of this round's replies: the round is over for this site."""
        rs = self.round
        if rs is None:
            return
        rs.fail()
        self.log.warning(
            "refused-by-server",
            round=rs.round_index + 1,
            round_id=rs.round_id,
            code=code,
            reason=reason,
        )

    # -- instructions -------------------------------------------------------------------------

    def handle(self, inst: pb.Instruction, fetch: FetchModel) -> Step:
        """Act on one instruction; returns the replies to send (in order). Errors:
        FailClosedError (stop for good); a transport error raised by ``fetch`` propagates
        (the round is kept: the transport decides). Every per-round error is handled here."""
        kind = inst.WhichOneof("kind")
        if kind is None:
            if self._refuse_unknown(inst):
                self._advance(inst)
            return Step()
        if kind == "wait":
            return Step()
        if kind == "finished":
            return Step(exit_status=self._finish(inst.finished, fetch))
        self._advance(inst)
        rs = self.round
        if rs is None or rs.attempt != inst.attempt:
            if rs is not None:
                self.drop_round("a new attempt started")
            if kind != "round_start":
                if kind == "outcome":
                    self._on_outcome(inst)
                else:
                    self.log.info("skipping", instruction=kind, attempt=inst.attempt)
                return Step()
            rs = self.round = RoundState(
                inst.attempt,
                inst.round_id,
                inst.round_start.aggregation,
                bytes(inst.round_start.model_sha256),
            )
        if kind == "outcome":
            self._on_outcome(inst)
            return Step()
        if rs.failed and kind != "round_start":
            self.log.info(
                "skipping", instruction=kind, round=rs.round_index + 1, round_id=rs.round_id
            )
            return Step()
        try:
            return Step(tuple(self._dispatch(rs, kind, inst, fetch)))
        except PolicyError as exc:
            # The server asked for something this site's own policy refuses: leave the round
            # without sending anything more.
            rs.fail()
            self._round_log("warning", "policy-refused", rs, kind, exc)
        except ProtocolError as exc:
            rs.fail()
            self._round_log("error", "protocol-error", rs, kind, exc)
        except (InvalidUpdateError, ConfigError, RejectedError, CryptoError) as exc:
            rs.fail()
            self._round_log("error", "round-error", rs, kind, exc)
        except FailClosedError:
            raise  # stop for good: never a per-round refusal
        except Exception as exc:
            if self._fetch_errors and isinstance(exc, self._fetch_errors):
                raise  # the transport's own error: the transport decides
            # Anything else raised while parsing or acting on a server instruction (a
            # RecursionError from hostile JSON, a bug) refuses the round; the site goes on.
            rs.fail()
            self.log.error(
                "round-error",
                round=rs.round_index + 1,
                round_id=rs.round_id,
                instruction=kind,
                error=type(exc).__name__,
                reason=f"unexpected {type(exc).__name__} while handling the instruction; the "
                "round is refused",
            )
        return Step()

    def _advance(self, inst: pb.Instruction) -> None:
        self.cursor.attempt, self.cursor.next_index = inst.attempt, inst.index + 1

    def _round_log(self, level: str, event: str, rs: RoundState, kind: str, exc: Exception) -> None:
        getattr(self.log, level)(
            event,
            round=rs.round_index + 1,
            round_id=rs.round_id,
            instruction=kind,
            reason=str(exc),
        )

    def _dispatch(
        self, rs: RoundState, kind: str, inst: pb.Instruction, fetch: FetchModel
    ) -> list[Reply]:
        if kind == "round_start":
            return self._on_round_start(rs, inst.round_start, fetch)
        if kind == "secagg_setup":
            return self._on_secagg_setup(rs, inst.secagg_setup)
        if kind in SECAGG_INSTRUCTIONS:
            if rs.secagg is None:
                raise RemoteProtocolError(f"{kind} before the secure-aggregation setup")
            replies = rs.secagg.on_instruction(kind, inst)
            self.log.info(
                "answered", round=rs.round_index + 1, round_id=rs.round_id, instruction=kind
            )
            return replies
        if kind == "ckks_setup":
            return self._on_ckks_setup(rs, inst.ckks_setup)
        self.log.warning("unsupported-instruction", instruction=kind)
        rs.fail()
        return []

    def _on_outcome(self, inst: pb.Instruction) -> None:
        out = inst.outcome
        rs = self.round
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
        if rs is not None:
            rs.abort()
        self.round = None

    def _refuse_unknown(self, inst: pb.Instruction) -> bool:
        """An instruction of a kind this site does not know (for example the CKKS decryption
        request that protocol versions before this one sent): refuse it, never act on it. Returns
        True when ``inst`` was such an instruction (False for an empty one, a plain wait)."""
        from google.protobuf.unknown_fields import UnknownFieldSet

        fields = UnknownFieldSet(inst)
        unknown = sorted({fields[i].field_number for i in range(len(fields))})
        if not unknown:
            return False
        rs = self.round
        if rs is not None and rs.attempt == inst.attempt:
            rs.fail()
        self.log.warning(
            "refused-unknown-instruction",
            round_id=inst.round_id,
            fields=unknown,
            reason="an instruction this site does not know is never acted on (nothing decrypted "
            "is ever sent to the server)",
        )
        return True

    def _finish(self, finished: pb.Finished, fetch: FetchModel) -> int:
        if finished.rounds_completed == 0:
            # Nothing was trained: do not write the initial model as if it were a result.
            self.log.error(
                "federation-not-trained",
                reason="the federation stopped after 0 rounds; no model was trained",
                planned=self.cursor.planned_rounds,
            )
            return EXIT_NOT_TRAINED
        self.log.info("federation-finished", rounds=finished.rounds_completed)
        out = self.config.output_model
        if out is not None and finished.model_sha256:
            try:
                # Decrypted for this site's own file only (nothing is sent after Finished).
                model = self.models.ensure(
                    finished.model_sha256,
                    fetch,
                    encrypted_round=finished.model_round_id,
                    allow_encrypted=self.config.policy.accepts("ckks"),
                )
            except FailClosedError:
                raise
            except (ProtocolError, CryptoError, ConfigError, *self._fetch_errors) as exc:  # type: ignore[misc]
                self.log.warning("final-model-unavailable", reason=str(exc))
            except Exception as exc:  # hostile payload or a bug: no final model, no crash
                self.log.error(
                    "final-model-unavailable",
                    error=type(exc).__name__,
                    reason=f"unexpected {type(exc).__name__} while reading the final model",
                )
            else:
                from secure_fl.atomic import atomic_write

                atomic_write(out, tensors.dumps(model))
                self.log.info("final-model-written", path=str(out))
        return EXIT_FINISHED

    # -- fail closed, crash points ------------------------------------------------------------

    def _fail_closed(self, reason: str) -> NoReturn:
        """Stop for good: write the marker (before anything else), log why, raise
        FailClosedError (nothing more is sent). ``reason`` holds no decrypted or secret value."""
        rs = self.round
        where: dict[str, Any] = (
            {"round": rs.round_index + 1, "round_id": rs.round_id} if rs is not None else {}
        )
        # Per-round details for the operator: the model's digest, its round, the contributors
        # the server states (a single malicious CKKS site can cause this stop: protocols/ckks.md).
        where.update(self.models.details)
        marker = write_fail_closed_marker(self.config, where, reason)
        self.log.error(
            "fail-closed",
            **where,
            reason=reason,
            marker=str(marker),
            exit_status=EXIT_FAIL_CLOSED,
            note="a check on secret values failed; refusing only this round would let the "
            "server probe them one bit per round, so this site stops for good",
        )
        raise FailClosedError(reason)

    def _crash_point(self, point: str, round_id: int) -> None:
        """Call the injected test hook (``crash_hook``) just before step ``point``."""
        if self._crash_hook is not None:
            self._crash_hook(point, round_id)
