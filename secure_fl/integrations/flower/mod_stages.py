"""The ``setup``, ``step`` and ``result`` stages of :mod:`.mod` (split from it to keep each module
under 400 lines): build, restore and export this node's round half, with its own policy,
roster, keys, DP floor and durable guards.

The user's metrics (sealed with the pending update) are returned only after this node recorded
the release of its update for the round's model (one round id per model,
:class:`~.node.NodeReleaseGuard`): with the site's unmask answer (SecAgg: ``UnmaskResponse``,
after ``claim(round_id, survivors)`` wrote the record) or with its upload (``PlainUpload``,
after :meth:`~.node.NodeReleaseGuard.upload` wrote it); never in a CKKS round. A server that
aborts a round after the masked inputs gets no metrics, so it cannot query the site's metrics
on one model round after round. The train cap (:func:`~.node.charge_train`) is cleared only
when an input actually leaves (the masked input, the plain or CKKS upload), never by a setup
the policy refuses.

Every function raises on refusal (the mod turns it into a ``left`` reply): PolicyError (the
round breaks this site's policy, or, CKKS, the model the server sent is beyond the preset's
range; the site's own new local model is never refused for its values, it is clipped into the
range and the count logged on the node only, so no refusal answers a question about the data),
RemoteProtocolError (a malformed or unexpected message), DecryptionError (a stale, replayed or
altered state), PostDecryptionError (a check after decrypting a CKKS result: fail closed),
ConfigError (the node's own files).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from secure_fl.errors import PolicyError, PostDecryptionError, RemoteProtocolError
from secure_fl.integrations.flower import mod as m
from secure_fl.integrations.flower.node import FlowerSite, NodeReleaseGuard, NodeSealer
from secure_fl.integrations.flower.records import Envelope
from secure_fl.rounds import codec
from secure_fl.rounds.messages import (
    CkksResult,
    CkksSetup,
    PlainSetup,
    SecAggSetup,
    UnmaskResponse,
)
from secure_fl.rounds.plain import PlainSiteRound
from secure_fl.rounds.secagg import SecAggSiteRound

DP_RECORD = "dp_rounds.jsonl"
#: (reply frame or None, the user's metrics to release with it or None).
StageReply = tuple[bytes | None, dict[str, Any] | None]


def run_stage(env: Envelope, frame: bytes, context: Context, site: FlowerSite) -> StageReply:
    """The reply of stage ``env.stage`` (``setup``, ``step``, ``result``) for ``frame``: the
    reply frame (None: reply without a frame) and the user's metrics when this reply carries
    the site's unmask answer or plain upload (else None). Errors: see the module docstring."""
    message = codec.decode(frame)
    if getattr(message, "round_id", env.round_id) != env.round_id:
        raise RemoteProtocolError(
            f"the frame is for round {getattr(message, 'round_id', None)}, the message for "
            f"round {env.round_id}"
        )
    sealer = NodeSealer(site.state_dir)
    if env.stage == "setup":
        return _setup(message, env.round_id, context, site, sealer)
    if env.stage == "step":
        return _step(message, env.round_id, context, site, sealer)
    return _result(message, env.round_id, context, site, sealer)


def _signing_key(site: FlowerSite) -> Any:
    if site.signing_key is None:
        return None
    from secure_fl.transport.provision_files import load_signing_key

    return load_signing_key(site.signing_key)


def _secret(site: FlowerSite) -> Any:
    if site.ckks is None:
        raise PolicyError("this node has no CKKS context (ckks in its site JSON)")
    from secure_fl.he.context import SecretContext

    return SecretContext.load(site.ckks.context, expected_fingerprint=site.ckks.fingerprint)


def _dp(site: FlowerSite, dp_json: str) -> tuple[Any, Any, dict[str, Any] | None]:
    """(noise hook, DP record, record fields) of a round's ``distributed_dp_json`` after this
    site's floor accepted it; (None, None, None) without DP. Errors: PolicyError (below the
    floor, DP required but absent, or a configuration that adds no noise), nothing sent."""
    from secure_fl.transport.privacy_site import SitePrivacy
    from secure_fl.transport.site_dp import DPRoundRecord, describe_dp

    privacy = SitePrivacy(site.policy, roster_size=len(site.roster))
    cfg = privacy.check(dp_json)  # PolicyError: below the floor, or required and absent
    if cfg is None:
        if dp_json:
            raise PolicyError("the setup's distributed DP configuration gives no noise to add")
        return None, None, None
    record = DPRoundRecord(site.node_dir / DP_RECORD, site.federation, site.policy.max_dp_rounds)
    return privacy.noise_hook(cfg), record, describe_dp(cfg)


def _meta(context: Context, site: FlowerSite, sealer: NodeSealer, round_id: int) -> Any:
    raw = m.open_sealed(context, m.ROUND, sealer, site.site_id, round_id)
    return json.loads(raw)


def _setup(
    message: Any, round_id: int, context: Context, site: FlowerSite, sealer: NodeSealer
) -> StageReply:
    raw = m.open_sealed(context, m.PENDING, sealer, site.site_id, round_id)
    del context.state[m.PENDING]  # the pending update is used once
    head, update, base = m.unpack_pending(raw)
    del raw
    weight, digest = float(head["weight"]), str(head["digest"])
    metrics = dict(head.get("metrics") or {})
    meta: dict[str, Any] = {"digest": digest}
    if isinstance(message, SecAggSetup):
        hook, record, dp = _dp(site, message.distributed_dp_json)
        guard = NodeReleaseGuard(
            site.state_dir,
            round_id,
            digest,
            dp_record=record,
            dp=dp,
            participants=tuple(message.site_ids),
        )
        half = SecAggSiteRound(
            site.site_id,
            policy=site.policy,
            signing_key=_signing_key(site),
            noise=hook,
            roster=site.verify_keys,
            release_guard=guard,
        )
        reply = half.on_setup(message, update=update, reported_weight=weight)
        del update, base
        meta.update(
            protocol="secagg",
            dp_json=message.distributed_dp_json,
            site_ids=list(message.site_ids),
            metrics=metrics,
        )
        m.put_sealed(context, m.ROUND, sealer, site.site_id, round_id, json.dumps(meta).encode())
        blob = half.export_state(sealer)  # BEFORE the reply leaves (rounds.md, host rule 1)
        context.state[m.STATE] = ConfigRecord({"round": round_id, "blob": blob})
        return _with_metrics(reply, metrics)
    guard = NodeReleaseGuard(site.state_dir, round_id, digest)
    if isinstance(message, PlainSetup):
        plain = PlainSiteRound(site.site_id, policy=site.policy)
        guard.claim(round_id, None)  # one participation per round id
        upload = plain.on_setup(message, update=update, reported_weight=weight)
        if upload is None:
            return None, None
        guard.upload(round_id, release=True)  # the model's release, BEFORE the upload leaves
        return codec.encode(upload), metrics or None
    if isinstance(message, CkksSetup):
        from secure_fl.rounds.ckks import CkksSiteRound
        from secure_fl.rounds.messages import CkksUpload

        ckks = CkksSiteRound(
            site.site_id,
            secret=_secret(site),
            policy=site.policy,
            expected_fingerprint=site.ckks.fingerprint if site.ckks else None,
            name=site.name,
            fail_closed=True,
        )
        guard.claim(round_id, None)
        try:
            out = ckks.on_setup(message, update=update, reported_weight=weight, base=base)
            del update, base
            upload = out if isinstance(out, CkksUpload) else ckks.upload()
            guard.upload(round_id, release=False)  # clears the train cap; no model release
        except PostDecryptionError:
            # Not reached by the site's values (on_setup clips them into the preset's range and
            # refuses only a base the server sent beyond it, PolicyError): a defensive leave
            # without a fail-closed marker (nothing was decrypted in this round).
            raise PolicyError("the CKKS upload could not be prepared (nothing is sent)") from None
        meta.update(protocol="ckks", head={k: head[k] for k in ("n", "keys", "shapes", "dtypes")})
        m.put_sealed(context, m.ROUND, sealer, site.site_id, round_id, json.dumps(meta).encode())
        return codec.encode(upload), None  # CKKS: the metrics never leave
    raise RemoteProtocolError(f"{type(message).__name__} is not a setup")


def _with_metrics(reply: Any, metrics: dict[str, Any]) -> StageReply:
    """The encoded ``reply``, with ``metrics`` when it is the site's unmask answer (the round
    half wrote the release record, ``claim(round_id, survivors)``, before returning it)."""
    if reply is None:
        return None, None
    released = (metrics or None) if isinstance(reply, UnmaskResponse) else None
    return codec.encode(reply), released


def _step(
    message: Any, round_id: int, context: Context, site: FlowerSite, sealer: NodeSealer
) -> StageReply:
    rec = context.state.config_records.get(m.STATE)
    blob = None if rec is None else rec.get("blob")
    if rec is None or rec.get("round") != round_id or not isinstance(blob, bytes):
        raise RemoteProtocolError(f"this node holds no round state for round {round_id}")
    meta = _meta(context, site, sealer, round_id)
    if meta.get("protocol") != "secagg":
        raise RemoteProtocolError("a step message in a round without steps")
    hook, record, dp = _dp(site, str(meta["dp_json"]))
    guard = NodeReleaseGuard(
        site.state_dir,
        round_id,
        str(meta["digest"]),
        dp_record=record,
        dp=dp,
        participants=tuple(int(s) for s in meta["site_ids"]),
    )
    signing_key = _signing_key(site)
    try:
        half = SecAggSiteRound.restore(
            blob,
            sealer,
            site_id=site.site_id,
            round_id=round_id,
            policy=site.policy,
            signing_key=signing_key,
            noise=hook,
            release_guard=guard,
        )
        del context.state[m.STATE]  # restored once; its counter is spent
        reply = half.handle(message)
        if half.done:
            m.forget_round(context)
        else:
            fresh = half.export_state(sealer)  # BEFORE the reply leaves (durable counter)
            context.state[m.STATE] = ConfigRecord({"round": round_id, "blob": fresh})
    finally:
        # The restore's consume is written at once but fsynced with the export's counter;
        # without an export (the last step, or a refusal) it is made durable here, before
        # any reply leaves (NodeSealer.sync; a no-op after an export).
        sealer.sync()
    return _with_metrics(reply, dict(meta.get("metrics") or {}))


def _result(
    message: Any, round_id: int, context: Context, site: FlowerSite, sealer: NodeSealer
) -> StageReply:
    if not isinstance(message, CkksResult):
        raise RemoteProtocolError(f"{type(message).__name__} is not a CKKS result")
    meta = _meta(context, site, sealer, round_id)
    if meta.get("protocol") != "ckks":
        raise RemoteProtocolError("a CKKS result for a round this node did not encrypt in")
    from secure_fl.he.site import decrypt_model

    head = meta["head"]
    model = decrypt_model(
        _secret(site), message.payload, expected_round=round_id, expected_size=int(head["n"])
    )
    vector = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in model.values()])
    del model
    m.save_model(site.node_dir / f"model-{round_id}.npz", vector, m.layout_of(head))
    m.forget_round(context)
    return None, None


__all__ = ["StageReply", "run_stage"]
