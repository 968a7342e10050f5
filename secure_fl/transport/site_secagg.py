"""A site's part in one SecAgg / SecAgg+ round over the wire (no sockets): protobuf in, replies out.

Guarantees (against a malicious server), all before the site sends anything of the round:

* the setup passes the site's own policy (:mod:`.policy`), every participant is on the
  provisioned roster (itself included) and, in the active variant, the verification keys are the
  provisioned ones;
* the site's normalised weight is computed here from the listed weights
  (:func:`secure_fl.transport.rounds.own_weight`), bound into every key of the round;
* with distributed DP, the noise configuration passes the site's privacy floor
  (:class:`secure_fl.transport.privacy.SitePrivacy`) and the noise is added to the encoded
  integers before masking; a DP round must fit the site's own budget (``policy.max_dp_rounds``)
  and is recorded in ``state_dir/dp_rounds.jsonl`` before its masked input is built (the other
  sites' shares rebuild its self-mask, so the server needs no unmask answer from it), checked
  again before the unmask answer (:mod:`.site_dp`);
* it answers at most one unmask request per round id unless the survivor set is the same
  (``state_dir/unmasked.json``, written before the answer leaves: it holds across restarts), and
  answers unmask requests for one model under one round id only (:mod:`.replay`; why not at the
  masked input: :meth:`SecAggSiteHalf._claim_contribution`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.crypto import SigningKey
from secure_fl.encoding import flatten
from secure_fl.errors import ConfigError, PolicyError, RemoteProtocolError
from secure_fl.rounds import protobuf
from secure_fl.rounds.base import NoiseHook
from secure_fl.rounds.secagg import SecAggSiteRound
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    RevealNonce,
    ShareKeys,
    UnmaskResponse,
)
from secure_fl.transport import rounds
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import SiteConfig
from secure_fl.transport.policy import dp_required
from secure_fl.transport.replay import ContributionGuard
from secure_fl.transport.site_dp import DPRoundRecord, describe_dp
from secure_fl.transport.site_replies import Call, Reply, Upload
from secure_fl.transport.tasks import TaskResult

SECAGG_INSTRUCTIONS = (
    "key_roster",
    "reveal_set",
    "share_delivery",
    "consistency_request",
    "unmask_request",
)


class UnmaskGuard:
    """One survivor set per round id, recorded in ``path`` (JSON, per federation)."""

    def __init__(self, path: Path, federation: str) -> None:
        self._path = path
        self._federation = federation

    def check_and_record(self, round_id: int, survivors: frozenset[int]) -> None:
        """Refuse a second unmasking of ``round_id`` with another survivor set; record the set
        (atomically) before the caller answers. Errors: RemoteProtocolError, ConfigError when the
        record is unreadable."""
        record: dict[str, Any] = {}
        if self._path.exists():
            try:
                record = json.loads(self._path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{self._path} is unreadable: {exc}") from exc
        fed = record.setdefault(self._federation, {})
        previous = fed.get(str(round_id))
        if previous is not None and sorted(previous) != sorted(survivors):
            raise RemoteProtocolError(
                f"the server asks to unmask round {round_id} again with another survivor set; "
                "answering would reveal the difference of two sums"
            )
        fed[str(round_id)] = sorted(survivors)
        atomic_write(self._path, json.dumps(record))


class SiteReleaseGuard:
    """The gRPC site's :class:`~secure_fl.rounds.guards.ReleaseGuard` for one round attempt,
    backed by its durable records: the round id was checked fresh and recorded at the round
    start (``ContributionGuard``, ``state_dir/contributions.json``), so a claim for any other
    id is refused; an unmasking is recorded in ``state_dir/unmasked.json`` (:class:`UnmaskGuard`)
    and, in a DP round, in the site's DP record (:mod:`.site_dp`, within
    ``policy.max_dp_rounds``), before the answer leaves."""

    def __init__(
        self,
        round_id: int,
        unmask_guard: UnmaskGuard,
        dp_record: DPRoundRecord | None,
        dp: dict[str, Any] | None,
    ) -> None:
        self._round_id = round_id
        self._unmask_guard = unmask_guard
        self._dp_record = dp_record
        self._dp = dp

    def contribute(self, round_id: int) -> None:
        """See :meth:`secure_fl.rounds.guards.ReleaseGuard.contribute`: the transport recorded
        the DP round and the release before the masked input was built
        (:meth:`SecAggSiteHalf._claim_contribution`); this re-checks the round id and, in a DP
        round, that it is recorded within the budget. Errors: PolicyError, ConfigError."""
        self.claim(round_id, None)

    def claim(self, round_id: int, survivors: frozenset[int] | None) -> None:
        """See :meth:`secure_fl.rounds.guards.ReleaseGuard.claim`. Errors: PolicyError (another
        round id than this attempt's, or over the DP budget), RemoteProtocolError (a second
        unmasking with another survivor set), ConfigError (an unreadable record)."""
        if round_id != self._round_id:
            raise PolicyError(
                f"the round half claims round id {round_id}; this attempt's round id is "
                f"{self._round_id} (checked fresh and recorded at its start)"
            )
        if survivors is None:
            if self._dp is not None and self._dp_record is not None:
                self._dp_record.check_room(round_id)
            return
        self._unmask_guard.check_and_record(round_id, survivors)
        if self._dp is not None and self._dp_record is not None:
            self._dp_record.claim(round_id, survivors, self._dp)


class SecAggSiteHalf:
    """This site's :class:`~secure_fl.rounds.secagg.SecAggSiteRound` for one round attempt,
    driven by protobuf instructions: the setup checks and the recipe live in the round half
    (once); this class adds the wire conversion and the durable guards of the transport."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        round_id: int,
        round_number: int,
        aggregation: str,
        model_content: bytes,
        contributions: ContributionGuard,
        unmask_guard: UnmaskGuard,
        signing_key: SigningKey | None,
        log: Any,
        crash_point: Callable[[str, int], None],
        dp_record: DPRoundRecord | None = None,
    ) -> None:
        self._config = config
        self._dp_record = dp_record
        self._dp: dict[str, Any] | None = None
        self.round_id = round_id
        self.round_number = round_number
        self._aggregation = aggregation
        self._model_content = model_content
        self._contributions = contributions
        self._unmask_guard = unmask_guard
        self._signing_key = signing_key
        self._log = log
        self._crash_point = crash_point
        self._round: SecAggSiteRound | None = None
        self._bits = 32
        self.two_sites = False

    def on_setup(
        self,
        setup: pb.SecAggSetup,
        *,
        result: TaskResult,
        noise: NoiseHook | None = None,
        l2_clip: float | None = None,
        dp: dict[str, Any] | None = None,
    ) -> list[Reply]:
        """Check ``setup`` (module docstring; :meth:`SecAggSiteRound.on_setup`), clip (to
        ``l2_clip``, the distributed-DP bound), encode, noise and mask this site's update;
        returns the key advertisement. ``dp`` (:func:`~.site_dp.describe_dp`) marks a DP round:
        it must fit the site's budget (``policy.max_dp_rounds``) now and is recorded before the
        unmask answer. Errors: PolicyError / RemoteProtocolError / ConfigError, nothing
        sent."""
        cfg = self._config
        if dp is not None and self._dp_record is not None:
            self._dp_record.check_room(self.round_id)
        self._dp = dp
        seed = cfg.insecure_test_seed
        site_id = cfg.site_id
        message = protobuf.setup_from_pb(setup, self.round_id, l2_clip=l2_clip)
        half = SecAggSiteRound(
            site_id,
            policy=cfg.policy,
            signing_key=self._signing_key,
            randbytes=rounds.site_randbytes(seed, site_id, self.round_id),
            rng=rounds.encoding_rng(seed, site_id, self.round_id),
            noise=noise,
            roster={e.site_id: e.verify_key for e in cfg.roster},
            max_vector_length=cfg.limits.max_vector_length,
            announced=self._aggregation,
            release_guard=SiteReleaseGuard(
                self.round_id, self._unmask_guard, self._dp_record, self._dp
            ),
        )
        vector, _ = flatten(dict(result.update))
        advert = half.on_setup(message, update=vector, reported_weight=float(result.weight))
        del vector  # the plain update is not kept past encoding
        self._round = half
        self._bits = message.bits
        self.two_sites = len(message.site_ids) == 2
        self._log.info(
            "secagg-setup",
            round=self.round_number,
            round_id=self.round_id,
            protocol=message.protocol,
            sites=len(message.site_ids),
            threshold=message.threshold,
            bits=message.bits,
            clipped=half.clipped,
            l2_clipped=half.l2_clipped,
            distributed_dp=noise is not None,
        )
        if not isinstance(advert, AdvertiseKeys):
            raise RemoteProtocolError("the round half produced no key advertisement")
        self._crash_point("advertise", self.round_id)
        return [Call("SendAdvertiseKeys", protobuf.advert_to_pb(advert))]

    def on_instruction(self, kind: str, inst: pb.Instruction) -> list[Reply]:
        """Answer one SecAgg phase instruction. Errors: ProtocolError (the client erases its
        secrets), RemoteProtocolError from the unmask guard."""
        half = self._round
        if half is None:
            raise RemoteProtocolError(f"{kind} before the secure-aggregation setup")
        if kind in ("key_roster", "reveal_set"):
            message = (
                protobuf.roster_from_pb(inst.key_roster)
                if kind == "key_roster"
                else protobuf.reveal_set_from_pb(inst.reveal_set)
            )
            reply = half.handle(message)
            if isinstance(reply, RevealNonce):  # a sparse graph: reveal before sharing keys
                return [Call("SendRevealNonce", protobuf.reveal_to_pb(reply))]
            if not isinstance(reply, ShareKeys):
                raise RemoteProtocolError(f"{kind} gave no share keys")
            self._crash_point("share_keys", self.round_id)
            return [Call("SendShareKeys", protobuf.share_keys_to_pb(reply))]
        if kind == "share_delivery":
            delivery = protobuf.delivery_from_pb(inst.share_delivery)
            self._claim_contribution(half)
            masked = half.handle(delivery)
            if not isinstance(masked, MaskedInput):
                raise RemoteProtocolError("share_delivery gave no masked input")
            self._crash_point("masked_input", self.round_id)
            header = pb.PayloadHeader(
                kind=pb.MASKED_INPUT,
                round_id=self.round_id,
                length=int(masked.vector.shape[0]),
                bits=self._bits,
            )
            data = protobuf.masked_to_bytes(masked, self._bits)
            return [Upload("UploadMaskedInput", header, data)]
        if kind == "consistency_request":
            signed = half.handle(protobuf.consistency_from_pb(inst.consistency_request))
            if not isinstance(signed, ConsistencySignature):
                raise RemoteProtocolError("consistency_request gave no signature")
            return [Call("SendConsistencySignature", protobuf.signature_to_pb(signed))]
        if kind != "unmask_request":
            raise RemoteProtocolError(f"{kind} is not a secure-aggregation instruction")
        request = protobuf.unmask_request_from_pb(inst.unmask_request)
        self._unmask_guard.check_and_record(self.round_id, request.survivors)
        if self._dp is not None and self._dp_record is not None:
            self._dp_record.claim(self.round_id, request.survivors, self._dp)
        self._contributions.record_release(self.round_id, self._model_content)
        self._crash_point("unmask", self.round_id)
        answer = half.handle(request)
        self._round = None
        if not isinstance(answer, UnmaskResponse):
            raise RemoteProtocolError("unmask_request gave no unmask response")
        return [Call("SendUnmaskResponse", protobuf.unmask_to_pb(answer))]

    def _claim_contribution(self, half: SecAggSiteRound) -> None:
        """Record, before the masked input is built, that this site is about to put its update
        into a sum: the other sites' shares rebuild its self-mask, so the server needs no
        unmask answer from it. In a DP round the round enters the site's DP record (refused
        past ``policy.max_dp_rounds``, nothing sent). Errors: PolicyError, ConfigError,
        OSError.

        The one-release-per-model record stays at the unmask answer: recording it here would
        refuse every honest retry of an attempt that aborted after the masked inputs (a site
        dying below the threshold), on the same model, forever; and a server that skips this
        site's unmask still needs >= t other answerers, whose own records then keep them out
        of a second round on the model, so any difference of two sums holds >= t - c honest
        updates besides this site's (the threshold's own bound)."""
        if self._dp is not None and self._dp_record is not None:
            client = half.client
            participants = client.config.site_ids if client is not None else ()
            self._dp_record.claim(self.round_id, participants, self._dp, stage="masked_input")

    def abort(self) -> None:
        """Forget the round half (its client's secrets go with it)."""
        self._round = None


def check_distributed_dp(
    config: SiteConfig, privacy: Any, dp_json: str
) -> tuple[NoiseHook | None, float | None]:
    """The noise hook and L2 clip of :func:`check_dp_round` (errors there)."""
    hook, clip, _ = check_dp_round(config, privacy, dp_json)
    return hook, clip


def check_dp_round(
    config: SiteConfig, privacy: Any, dp_json: str
) -> tuple[NoiseHook | None, float | None, dict[str, Any] | None]:
    """The noise hook, L2 clip and record fields (:func:`~.site_dp.describe_dp`) of a DP
    round, for a setup's ``distributed_dp_json`` after the site's privacy floor accepted it
    (``privacy``: a :class:`secure_fl.transport.privacy.SitePrivacy`, or None when that module
    is unavailable); (None, None, None) without DP. DP is required when the policy says so or
    implies it (:func:`~secure_fl.transport.policy.dp_required`). The JSON is bound into
    every key of the round (:func:`secure_fl.rounds.checks.config_from_setup`), so a server
    cannot show sites different noise. Errors: PolicyError (below the floor, DP required but
    absent, or DP asked for and this site cannot add it), nothing sent."""
    required = PolicyError(
        "the setup carries no distributed DP noise; this site's policy requires it "
        "(policy.require_dp, implied by policy.min_noise_multiplier and policy.max_dp_rounds)"
    )
    if privacy is None:
        if dp_json:
            raise PolicyError(
                "the setup asks for distributed DP noise, which this site cannot add "
                "(secure_fl.transport.privacy is unavailable)"
            )
        if dp_required(config.policy):
            raise required
        return None, None, None
    cfg = privacy.check(dp_json)
    if cfg is None:
        if dp_required(config.policy):
            raise required
        if dp_json:
            # The server would count noise that nobody added.
            raise PolicyError("the setup's distributed DP configuration gives no noise to add")
        return None, None, None
    hook: NoiseHook = privacy.noise_hook(cfg)
    clip = getattr(cfg, "clip", None)
    return hook, float(clip) if clip is not None else None, describe_dp(cfg)
