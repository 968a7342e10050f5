"""A site's state in one round attempt and the steps that produce its replies (no sockets):
the round start (policy, fresh round id, model, task, metrics, the weight or the plain upload),
the SecAgg setup (:mod:`.site_secagg`) and the CKKS setup (:mod:`.site_ckks`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from secure_fl.crypto import SigningKey
from secure_fl.errors import (
    ConfigError,
    InvalidUpdateError,
    PolicyError,
    PostDecryptionError,
    RemoteProtocolError,
)
from secure_fl.he.site import check_base
from secure_fl.transport import policy, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import SiteConfig
from secure_fl.transport.replay import ContributionGuard
from secure_fl.transport.site_ckks import encrypt_upload
from secure_fl.transport.site_dp import DPRoundRecord
from secure_fl.transport.site_model import FetchModel, SiteModel
from secure_fl.transport.site_replies import Call, Reply, Upload
from secure_fl.transport.site_secagg import SecAggSiteHalf, UnmaskGuard, check_dp_round
from secure_fl.transport.tasks import SiteTask, TaskResult, run_task
from secure_fl.transport.tensors import Tensors


@dataclass
class RoundState:
    """This site's state in one round attempt: the plain update (``result``) until it is
    encoded, encrypted or sent, then the protocol half (``secagg``) until the round ends."""

    attempt: int
    round_id: int
    aggregation: str
    model_sha256: bytes = b""
    # tensors.release_key of the model this round trains on (v2 content digest first): the key
    # of the release guard.
    model_content: bytes = b""
    result: TaskResult | None = field(default=None, repr=False)
    secagg: SecAggSiteHalf | None = field(default=None, repr=False)
    failed: bool = False
    # The federation round index (from 0, the same for every attempt) once RoundStart arrived.
    round_index: int = 0

    def fail(self) -> None:
        """Leave the round: nothing more is sent in it; the update and secrets are dropped."""
        self.failed = True
        self.abort()

    def abort(self) -> None:
        """Drop the plain update and the protocol half's secrets."""
        self.result = None
        if self.secagg is not None:
            self.secagg.abort()
            self.secagg = None


def compute_result(
    task: SiteTask,
    model: Tensors,
    round_index: int,
    round_config: Mapping[str, Any] | None,
    ckks_secret: Any = None,
    *,
    decrypted: bool = False,
) -> TaskResult:
    """Run ``task`` on ``model`` for federation round ``round_index`` (``round_config`` passed as
    ``round_config=`` when the server sent one; :func:`~secure_fl.transport.tasks.run_task`) and
    check its result against the model.

    With ``ckks_secret``, first (before the task runs) the model the site was served must be
    within the CKKS preset's range (:func:`~secure_fl.he.site.check_base`): that outcome depends
    only on what the server sent, so it refuses the round (PolicyError, no marker) -- unless the
    model was ``decrypted`` here, where it depends on decrypted values (PostDecryptionError: the
    caller fails closed). The new local model (model + update) is never range-checked here:
    whether it fits depends on the site's data and on a model the server chose (a one-bit
    oracle); the CKKS setup clips it into range (:meth:`CkksSiteRound.on_setup`).

    Errors: PolicyError / PostDecryptionError as above, ConfigError (settings the task refuses),
    InvalidUpdateError (a task failure, a bad result or a non-finite metric)."""
    if ckks_secret is not None:
        check_served_model(ckks_secret, model, decrypted=decrypted)
    try:
        result = run_task(task, model, round_index, round_config)
    except (ConfigError, InvalidUpdateError):
        raise
    except Exception as exc:  # a task bug must not take the site process down
        raise InvalidUpdateError(f"the task failed: {type(exc).__name__}: {exc}") from exc
    return result


def check_served_model(secret: Any, model: Tensors, *, decrypted: bool = False) -> None:
    """Check that every value of the served ``model`` is finite and within the CKKS preset's
    ``max_abs`` (:func:`~secure_fl.he.site.check_base`; the message names the bound, never a
    value). Errors: PolicyError (the round is refused) for a model the server sent in the clear;
    PostDecryptionError (fail closed) for a model ``decrypted`` on this site."""
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in model.values()]
    vector = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float64)
    try:
        check_base(secret, vector)
    except PolicyError as exc:
        if decrypted:
            raise PostDecryptionError(
                "the decrypted global model failed the CKKS range check (values not finite or "
                f"beyond the bound {secret.preset.max_abs:g})"
            ) from exc
        raise


class RoundSteps:
    """The steps of a round that produce replies (round start, SecAgg setup, CKKS setup), mixed
    into :class:`~secure_fl.transport.site_driver.SiteDriver`, which owns the state below and
    catches every per-round error they raise."""

    config: SiteConfig
    task: SiteTask
    log: Any
    models: SiteModel
    signing_key: SigningKey | None
    unmask_guard: UnmaskGuard
    dp_record: DPRoundRecord
    _contributions: ContributionGuard
    _privacy: Any
    _warned_two_sites: bool

    def _fail_closed(self, reason: str) -> NoReturn:
        raise NotImplementedError

    def _crash_point(self, point: str, round_id: int) -> None:
        raise NotImplementedError

    def _on_round_start(
        self, rs: RoundState, start: pb.RoundStart, fetch: FetchModel
    ) -> list[Reply]:
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
        policy.check_privacy_floor(self.config.policy, start.aggregation)
        round_config = parse_round_config(start.round_config_json)
        self._contributions.check_fresh(rs.round_id)
        self._crash_point("update", rs.round_id)
        if start.aggregation == "ckks":
            self.models.secret()  # no context, or the wrong one: do not report a weight at all
        if start.model_round_id >= rs.round_id > 0:
            raise RemoteProtocolError(
                f"the model is announced as the result of round {start.model_round_id}, not of "
                f"a round before {rs.round_id}"
            )
        # Round ids are fresh per attempt: the model's round is announced, not round_id - 1.
        # The encrypted CKKS model is decrypted for a CKKS round only (its checks follow).
        model = self.models.ensure(
            start.model_sha256,
            fetch,
            encrypted_round=start.model_round_id,
            allow_encrypted=start.aggregation == "ckks",
        )
        # Every CKKS guard below keys on what was decrypted, not only on what was announced.
        decrypted = self.models.decrypted
        # "The same model" by content, not by the bytes served (replay.py): still before anything
        # is computed or sent.
        rs.model_content = self.models.content
        self._contributions.check_fresh(rs.round_id, rs.model_content)
        t0 = time.perf_counter()
        ckks_secret = self.models.secret() if start.aggregation == "ckks" or decrypted else None
        try:
            result = compute_result(
                self.task, model, rs.round_index, round_config, ckks_secret, decrypted=decrypted
            )
        except PostDecryptionError as exc:
            self._fail_closed(str(exc))
        except InvalidUpdateError as exc:
            if decrypted:
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
        replies: list[Reply] = []
        if result.metrics:
            if start.aggregation == "ckks" or decrypted:
                # Metrics of a model decrypted here would tell the server a function of values
                # it must never see (the decryption oracle of the fail-closed rule).
                self.log.info(
                    "metrics-withheld",
                    round=rs.round_index + 1,
                    round_id=rs.round_id,
                    reason="metrics computed on a decrypted CKKS model are not sent",
                )
            else:
                replies.append(
                    Call("ReportMetrics", metrics_message(rs.round_id, result), optional=True)
                )
        self._contributions.record_round(rs.round_id)
        if start.aggregation in ("secagg", "secagg+", "ckks"):
            replies.append(
                Call(
                    "ReportUpdateReady",
                    pb.UpdateReady(round_id=rs.round_id, weight=float(result.weight)),
                )
            )
        elif start.aggregation == "plain":
            header = pb.PayloadHeader(
                kind=pb.PLAIN_UPDATE,
                round_id=rs.round_id,
                length=len(result.update),
                weight=float(result.weight),
            )
            replies.append(Upload("UploadUpdate", header, tensors.dumps(result.update)))
            rs.result = None  # sent in the clear: nothing more to protect or keep
        else:
            raise ConfigError(f"aggregation {start.aggregation!r} is not supported by this site")
        return replies

    def _on_secagg_setup(self, rs: RoundState, setup: pb.SecAggSetup) -> list[Reply]:
        model = self.models.model
        if rs.result is None or model is None:
            raise RemoteProtocolError("secure-aggregation setup before this site's update")
        noise, l2_clip, dp = check_dp_round(self.config, self._privacy, setup.distributed_dp_json)
        half = SecAggSiteHalf(
            self.config,
            round_id=rs.round_id,
            round_number=rs.round_index + 1,
            aggregation=rs.aggregation,
            model_content=rs.model_content,
            contributions=self._contributions,
            unmask_guard=self.unmask_guard,
            signing_key=self.signing_key,
            log=self.log,
            crash_point=self._crash_point,
            dp_record=self.dp_record,
        )
        result, rs.result = rs.result, None  # the plain update is not kept past encoding
        replies = half.on_setup(setup, result=result, noise=noise, l2_clip=l2_clip, dp=dp)
        rs.secagg = half
        if half.two_sites and not self._warned_two_sites:
            self._warned_two_sites = True
            self.log.warning(
                "two-site-round",
                note="with two parties each can derive the other's update from the mean",
            )
        return replies

    def _on_ckks_setup(self, rs: RoundState, setup: pb.CkksSetup) -> list[Reply]:
        model = self.models.model
        if rs.result is None or model is None:
            raise RemoteProtocolError("CKKS setup before this site's update")
        result, rs.result = rs.result, None  # the plain update is not kept past encryption
        replies = encrypt_upload(
            self.models.secret(),
            setup,
            config=self.config,
            model=model,
            result=result,
            round_id=rs.round_id,
            round_number=rs.round_index + 1,
            log=self.log,
            fail_closed=self._fail_closed,
        )
        self._crash_point("ckks_upload", rs.round_id)
        self.log.info(
            "answered", round=rs.round_index + 1, round_id=rs.round_id, instruction="ckks_setup"
        )
        return replies


def parse_round_config(text: str) -> Mapping[str, Any] | None:
    """``RoundStart.round_config_json``: None when empty, else a JSON object, at most
    :data:`~secure_fl.transport.policy.MAX_INSTRUCTION_JSON_CHARS` characters and nested at
    most :data:`~secure_fl.transport.policy.MAX_INSTRUCTION_JSON_DEPTH` deep (checked before it
    is parsed). Errors: RemoteProtocolError (the round is refused) when it is too long, too
    deep, not valid JSON or not an object."""
    if not text:
        return None
    try:
        value = policy.bounded_json(text, "RoundStart.round_config_json")
    except ValueError as exc:
        raise RemoteProtocolError(
            f"RoundStart.round_config_json is not valid JSON ({exc})"
        ) from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(
            f"RoundStart.round_config_json must be a JSON object, got {type(value).__name__}"
        )
    return value


def metrics_message(round_id: int, result: Any) -> pb.SiteMetrics:
    """The SiteMetrics of a task result (``metrics``, ``metric_samples``)."""
    samples = int(getattr(result, "metric_samples", 0) or 0)
    return pb.SiteMetrics(
        round_id=round_id,
        metrics={str(k): float(v) for k, v in result.metrics.items()},
        samples=max(samples, 0),
    )
