"""The Flower ClientApp mod that makes a node a secure_fl site (the SITE column of the contract).

Put :data:`secure_fl_mod` (or :func:`make_secure_fl_mod` with a fixed site) in front of the
user's ``@app.train()`` function: ``ClientApp(mods=[secure_fl_mod])``. A message without a
``"secure_fl"`` record is refused when it is a ``train`` message (``"train"`` or
``"train.<action>"``: the user's train function never runs for it) and otherwise (evaluate,
query) passes through, unless the reply holds an ArrayRecord (then an Error replaces it): no
array leaves the node outside a secure_fl round (:mod:`.mod_gate`). For one round (:mod:`.records` for the layout):

1. ``train``: the user's train function runs; its trained arrays never leave the node. The
   update (trained minus sent arrays, or the trained arrays when none were sent) is sealed
   into ``context.state`` (AES-256-GCM under the :class:`~.node.NodeSealer`, bound to site id
   and round id) with the user's metrics; the reply is the site id, the weight
   (``num-examples``) and, with a signing key, the proof of the claim
   (:func:`~.records.claim_message`). The user's metrics leave only after the release of the
   update for this model was recorded: with the site's unmask answer (SecAgg, the
   ``UnmaskResponse`` reply) or its upload (plain), as a ``"metrics"`` MetricRecord of that
   reply, never in a CKKS round: a train stage (or a round aborted after the masked inputs)
   is no free oracle of the site's data. The training runs for at most
   :data:`~.node.MAX_TRAINS_WITHOUT_SETUP` (3) train stages in a row that no input of the
   site followed (:func:`~.node.charge_train`).
2. ``setup``: the round layer's site half is built from the frame's message type, with this
   node's OWN policy, roster, keys and guards (never the server's word), and answers; a SecAgg
   half's state is exported to ``context.state`` BEFORE the reply is returned.
3. ``step``: the half is restored from the latest blob (once), answers, is exported again.
4. ``result`` (CKKS): the node decrypts the encrypted mean for itself into
   ``state_dir/flower/model-<round_id>.npz`` and replies without a frame.

Guarantees: nothing derived from the data leaves before the site's own checks passed; the
node's durable release guard (:class:`~.node.NodeReleaseGuard`) and sealer hold across
processes; a site that leaves replies ``left`` (exception class and one line, never a
traceback, key, share or update) and never raises; distributed DP is checked against the
site's own floor (:class:`~secure_fl.transport.privacy_site.SitePrivacy`) and charged to its
own DP record (``state_dir/flower/dp_rounds.jsonl``); a check after decrypting a CKKS result
fails closed (``state_dir/flower/FAIL-CLOSED.json``: every later round is refused). Nothing the
server sends in the clear makes the node fail closed, and no refusal depends on the site's data
beyond what the protocol releases: a CKKS setup refuses only a sent model beyond the preset's
range and clips the new local model into it (:meth:`~secure_fl.rounds.ckks.CkksSiteRound.
on_setup`); trained arrays that are not usable (non-finite values, keys or shapes other than
the sent ones) are replaced by a ZERO update with the reported weight and the reply is that of
a good train (the reason is logged on the node at WARNING, never sent).

The one-release-per-model guard hashes what the model IS (:func:`model_digest`): the sent
floating-point arrays' content digest (names sorted, values upcast to float64; integer arrays
such as a batch counter are no part of it), each array first cast to the dtype of the matching
trained array (the precision the site's model holds), so that neither a
reordered nor a re-typed copy of a model (e.g. a float64 copy nudged below float32 resolution
for a float32 model) gets a second release. The sent and trained arrays must have the same key
SET and shapes (their order may differ; the update is laid out in the sent order). A train
function must return its arrays in the dtype of the model it trained (``ArrayRecord(model.
state_dict())`` does). A train stage WITHOUT sent arrays has no server model to guard: the
guard gets a fresh random digest (``os.urandom``), never a hash of the trained arrays (that
would be a hash of the site's update in the node's records and a link between its rounds).

When the user's train function raises, replies with an error or gives no usable weight
(``num-examples``), the server gets one constant reason, ``InvalidUpdateError: the train function
failed`` (:data:`TRAIN_FAILED`; not even the exception's class); the node logs it with its
traceback, at WARNING when the operator's node config sets ``secure-fl-debug = true``
(:data:`DEBUG_KEY`), else at DEBUG (:func:`_log_train_failure`). Residual: that one bit (the
train function failed, or not) is still the server's to see, on a model it chose; a train
function that raises on its data (e.g. on an overflow) answers a question about the data, so a
train function should not raise on data-dependent conditions.

The ``setup`` / ``step`` / ``result`` stages live in :mod:`.mod_stages` (split to keep each module
under 400 lines; this one is over, for the train stage and its checks in one place).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from secure_fl.atomic import atomic_write
from secure_fl.errors import (
    InvalidUpdateError,
    PolicyError,
    PostDecryptionError,
    RemoteProtocolError,
    SecureFLError,
)
from secure_fl.integrations.flower import records
from secure_fl.integrations.flower.mod_gate import without_envelope
from secure_fl.integrations.flower.node import (
    FlowerSite,
    NodeReleaseGuard,
    NodeSealer,
    charge_train,
    site_from_node_config,
)
from secure_fl.integrations.flower.records import Envelope, Layout

log = logging.getLogger("secure_fl.integrations.flower")

#: ``context.state`` keys (ConfigRecords): the sealed pending update, the round half's state
#: blob, the sealed facts of the open round.
PENDING = "secure_fl.pending"
STATE = "secure_fl.state"
ROUND = "secure_fl.round"
FAIL_CLOSED = "FAIL-CLOSED.json"
_DOMAIN = b"secure_fl/flower/%s/v1\x00"
SiteSource = FlowerSite | Callable[[Context], FlowerSite] | None


def make_secure_fl_mod(site: SiteSource = None) -> Mod:
    """The mod for ``site`` (a FlowerSite, a function of the Context returning one, or None:
    :func:`~.node.site_from_node_config` of ``context.node_config`` on each message).
    Guarantee: see the module docstring; the mod never raises for a secure_fl message."""

    def secure_fl_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            envelope = records.read(msg.content)
        except Exception as exc:  # malformed record: no round id to answer under
            return Message(Error(code=0, reason=_reason(exc)), reply_to=msg)
        if envelope is None:
            return without_envelope(msg, context, call_next)  # no training, no arrays leave
        return _handle(msg, context, call_next, envelope, site)

    return secure_fl_mod


#: The mod with the site from ``context.node_config["secure-fl-site"]``.
secure_fl_mod: Mod = make_secure_fl_mod()


def _reason(exc: BaseException) -> str:
    """One line naming the exception: its message for secure_fl's own errors (written never to
    hold a secret or a value), only its class for anything else."""
    if isinstance(exc, SecureFLError):
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: unexpected error (details are not sent)"


def _reply(msg: Message, envelope: Envelope, extra: dict[str, Any] | None = None) -> Message:
    content = RecordDict({records.KEY: records.to_record(envelope), **(extra or {})})
    return Message(content, reply_to=msg)


def _handle(
    msg: Message, context: Context, call_next: ClientAppCallable, env: Envelope, source: SiteSource
) -> Message:
    site_id: int | None = None
    try:
        site = _resolve(source, context)
        site_id = site.site_id
        marker = site.node_dir / FAIL_CLOSED
        if marker.exists():
            raise PolicyError(f"this node failed closed ({marker.name}); it takes no more rounds")
        if env.stage == "train":
            return _train(msg, context, call_next, env, site)
        frame = env.frame
        if frame is None:
            raise RemoteProtocolError(f"the {env.stage} stage carries no frame")
        from secure_fl.integrations.flower import mod_stages

        out, metrics = mod_stages.run_stage(env, frame, context, site)
        extra = None if metrics is None else {"metrics": MetricRecord(metrics)}
        return _reply(msg, Envelope(env.stage, env.round_id, frame=out, site_id=site_id), extra)
    except Exception as exc:
        if isinstance(exc, PostDecryptionError) and site_id is not None:
            try:
                _fail_closed(site, env, exc)
            except OSError as err:  # still leave; the operator must see this
                log.error(
                    "secure_fl site %s could not write its fail-closed marker: %s",
                    site_id,
                    type(err).__name__,
                )
        forget_round(context)
        reason = _reason(exc)
        who = "node (no site)" if site_id is None else f"site {site_id}"
        log.warning("secure_fl %s leaves round %d (%s): %s", who, env.round_id, env.stage, reason)
        return _reply(msg, Envelope(env.stage, env.round_id, site_id=site_id, left=reason))


def _resolve(source: SiteSource, context: Context) -> FlowerSite:
    if isinstance(source, FlowerSite):
        return source
    if source is None:
        return site_from_node_config(context.node_config)
    site = source(context)
    if not isinstance(site, FlowerSite):
        raise TypeError("the site function must return a FlowerSite")
    return site


def _fail_closed(site: FlowerSite, env: Envelope, exc: BaseException) -> None:
    """Stop for good: a check whose outcome depends on secret values failed."""
    body = {"round_id": env.round_id, "stage": env.stage, "reason": _reason(exc)}
    atomic_write(site.node_dir / FAIL_CLOSED, json.dumps(body) + "\n", mode=0o600)


def forget_round(context: Context) -> None:
    """Drop every secure_fl record of ``context.state`` (the round is over for this node)."""
    for key in (PENDING, STATE, ROUND):
        if key in context.state:
            del context.state[key]


# -- sealed records in context.state --------------------------------------------------------------


def _aad(kind: str, site_id: int, round_id: int) -> bytes:
    return _DOMAIN % kind.encode() + f"site={site_id};round={round_id}\x00".encode()


def put_sealed(
    context: Context, key: str, sealer: NodeSealer, site_id: int, round_id: int, data: bytes
) -> None:
    """Store ``data`` in ``context.state[key]`` sealed to (``key``, site, round)."""
    sealed = sealer.seal(data, _aad(key, site_id, round_id))
    context.state[key] = ConfigRecord({"round": int(round_id), "sealed": sealed})


def open_sealed(
    context: Context, key: str, sealer: NodeSealer, site_id: int, round_id: int
) -> bytes:
    """The data :func:`put_sealed` stored for this round. Errors: RemoteProtocolError when there
    is none for this round; DecryptionError (opaque) for an altered or foreign record."""
    rec = context.state.config_records.get(key)
    sealed = None if rec is None else rec.get("sealed")
    if rec is None or rec.get("round") != round_id or not isinstance(sealed, bytes):
        raise RemoteProtocolError(f"this node holds no {key.split('.')[-1]} for round {round_id}")
    return sealer.open(sealed, _aad(key, site_id, round_id))


# -- the pending update ---------------------------------------------------------------------------


def pack_pending(
    update: np.ndarray,
    base: np.ndarray | None,
    weight: float,
    digest: str,
    layout: Layout,
    metrics: Mapping[str, Any] | None = None,
) -> bytes:
    """The pending update as bytes: a JSON header (with the user's ``metrics``: released only
    with the unmask answer or plain upload), the float64 update, the base (if any)."""
    head = json.dumps(
        {
            "weight": weight,
            "metrics": dict(metrics or {}),
            "digest": digest,
            "n": int(update.size),
            "base": base is not None,
            "keys": list(layout.keys),
            "shapes": [list(s) for s in layout.shapes],
            "dtypes": list(layout.dtypes),
        }
    ).encode()
    parts: list[Any] = [struct.pack(">I", len(head)), head]
    for vector in (update, base):
        if vector is not None:  # little-endian float64 words, joined with one copy
            parts.append(np.ascontiguousarray(vector, dtype="<f8").reshape(-1).data.cast("B"))
    return b"".join(parts)


def unpack_pending(data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """(header, update, base) of :func:`pack_pending`'s bytes."""
    (size,) = struct.unpack_from(">I", data)
    head = json.loads(data[4 : 4 + size])
    n, start = int(head["n"]), 4 + size
    # one copy each: writable native float64 arrays, independent of ``data``
    update = np.frombuffer(data, dtype="<f8", count=n, offset=start).astype(np.float64)
    base = None
    if head["base"]:
        base = np.frombuffer(data, dtype="<f8", count=n, offset=start + 8 * n).astype(np.float64)
    return head, update, base


def layout_of(head: dict[str, Any]) -> Layout:
    """The :class:`~.records.Layout` recorded in a pending header."""
    return Layout(
        tuple(head["keys"]),
        tuple(tuple(int(d) for d in s) for s in head["shapes"]),
        tuple(head["dtypes"]),
    )


def model_digest(
    sent: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray] | None = None
) -> str:
    """SHA-256 (hex) of what the model ``sent`` IS, as the site's model holds it:
    :func:`secure_fl.transport.tensors.content_digest` (names sorted, values upcast exactly to
    float64, -0.0 as 0.0; neither the order nor the dtype of the record counts) of each
    FLOATING-POINT array, cast first to the dtype of the array of the same name in ``like``
    (the trained arrays; None: as sent). Arrays whose dtype (the site's, with ``like``) is not
    floating point (integer counters such as torch's ``num_batches_tracked``, booleans) are
    left out of the model's identity: a server that changes only a counter, which leaves the
    trained weights bit-identical, gets no second release.

    Guarantee: a reordered copy of a model, a wider-typed copy that the site's dtype rounds to
    the same numbers (float64 values nudged below float32 resolution for a float32 model), or a
    copy whose integer arrays differ, has the same digest. NOT caught (the documented
    residual, ``protocols/security.md``): a float value nudged by one ulp of the site's dtype
    is a new model; a server can perturb a model slightly without changing the training much,
    and only differential privacy bounds what the difference of two such rounds reveals.
    Errors: InvalidUpdateError when a value does not fit the site's dtype (it would be
    infinite), a name of ``like`` is missing, or the model holds no floating-point array."""
    from secure_fl.transport.tensors import content_digest

    cast: dict[str, np.ndarray] = {}
    for name, value in sent.items():
        array = np.asarray(value)
        if like is not None:
            if name not in like:
                raise InvalidUpdateError(f"the trained arrays hold no {name!r}")
            with np.errstate(over="ignore", invalid="ignore"):
                array = array.astype(np.asarray(like[name]).dtype)
        if array.dtype.name not in ("float16", "float32", "float64"):
            continue  # not part of the model's identity (see the docstring)
        cast[str(name)] = np.ascontiguousarray(array)
    if not cast:
        raise InvalidUpdateError(
            "the model holds no floating-point array (float16, float32 or float64); its "
            "identity for the one-release-per-model guard would be empty"
        )
    return content_digest(cast).hex()


def _align(sent: Any, trained: Any) -> dict[str, Any]:
    """The trained ``ArrayRecord``'s arrays in the sent record's key order. Errors:
    InvalidUpdateError when the key sets or a shape differ."""
    if set(sent.keys()) != set(trained.keys()):
        only_sent = sorted(set(sent.keys()) - set(trained.keys()))
        only_got = sorted(set(trained.keys()) - set(sent.keys()))
        raise InvalidUpdateError(
            "the trained arrays' keys differ from the sent ones (keys in one only): "
            f"sent={only_sent} got={only_got}"
        )
    out: dict[str, Any] = {}
    for key, array in sent.items():
        if tuple(array.shape) != tuple(trained[key].shape):
            raise InvalidUpdateError(
                f"the trained array {key!r} has another shape than the sent one"
            )
        out[key] = trained[key]
    return out


def _layout_of(arrays: Any) -> Layout:
    """The :class:`~.records.Layout` of an ``ArrayRecord`` whatever its values. Errors:
    InvalidUpdateError (:data:`TRAIN_FAILED`) for an empty record or a non-numeric array."""
    values = {str(k): v.numpy() for k, v in arrays.items()}
    if not values or any(v.dtype.kind not in "fiu" for v in values.values()):
        raise InvalidUpdateError(TRAIN_FAILED)
    return Layout(
        tuple(values),
        tuple(tuple(int(d) for d in v.shape) for v in values.values()),
        tuple(v.dtype.str for v in values.values()),
    )


def _check_weight(num: Any) -> float:
    if (
        isinstance(num, bool)
        or not isinstance(num, int | float)
        or not math.isfinite(float(num))
        or float(num) <= 0
    ):
        raise InvalidUpdateError(f"metrics['num-examples'] must be a number > 0, got {num!r}")
    return float(num)


def _proof(site: FlowerSite, msg: Message, round_id: int) -> bytes | None:
    """The site's signature over its claim (None without a signing key)."""
    if site.signing_key is None:
        return None
    from secure_fl.transport.provision_files import load_signing_key

    node = int(msg.metadata.dst_node_id)
    key = load_signing_key(site.signing_key)
    return key.sign(records.claim_message(round_id, site.site_id, node))


#: The one reason a train stage leaves with when the user's train function raised or gave no
#: usable weight (the same whatever happened: the details are logged on the node only).
TRAIN_FAILED = "the train function failed"


def _train(
    msg: Message, context: Context, call_next: ClientAppCallable, env: Envelope, site: FlowerSite
) -> Message:
    forget_round(context)  # a new round supersedes whatever this node held
    charge_train(site.state_dir)  # PolicyError: too many trains without a setup; nothing runs
    sent = msg.content.array_records.get("arrays")
    base: np.ndarray | None = None
    if sent is not None:  # the server's values: a refusal here depends on nothing else
        base, sent_layout = records.flatten(sent, where="arrays")
    try:
        reply = call_next(msg, context)
        if reply.has_error():
            raise InvalidUpdateError("the train function replied with an error")
        arrays = reply.content.array_records.get("arrays")
        metrics = reply.content.metric_records.get("metrics")
        if arrays is None or metrics is None:
            raise InvalidUpdateError("the train reply must hold 'arrays' and 'metrics'")
        weight = _check_weight(metrics.get("num-examples"))
    except Exception:
        _log_train_failure(context, site)
        raise InvalidUpdateError(TRAIN_FAILED) from None  # one reason, never the class
    if sent is not None and base is not None:
        # The model's identity from the sent values and the trained dtypes only (never from
        # whether the training went well): see model_digest.
        like = {k: arrays.get(k, v).numpy() for k, v in sent.items()}
        digest = model_digest({k: v.numpy() for k, v in sent.items()}, like)
    try:
        if sent is not None and base is not None:
            trained, layout = records.flatten(_align(sent, arrays), where="reply arrays")
            update = trained - base
            del trained
            if not np.isfinite(update).all():
                raise InvalidUpdateError("the update (trained - sent) is not finite")
        else:
            # Nothing was sent: there is no server model to guard against a second release,
            # and a digest of the trained arrays (the site's own update) must never reach the
            # guard, whose records and refusals would let the server link or confirm updates.
            update, layout = records.flatten(arrays, where="reply arrays")
            digest = os.urandom(32).hex()
    except (InvalidUpdateError, RemoteProtocolError) as exc:
        # Whether the training overflowed (and where) depends on the data: never a refusal.
        log.warning(
            "secure_fl site %s: the trained arrays are not usable (%s); a zero update is sealed "
            "with the reported weight (the reason is not sent)",
            site.site_id,
            exc,
        )
        if sent is None:
            layout = _layout_of(arrays)
            digest = os.urandom(32).hex()  # nothing was sent: no model to guard
        else:
            layout = sent_layout
        update = np.zeros(layout.size, dtype=np.float64)
    NodeReleaseGuard(site.state_dir, env.round_id, digest).check_fresh()
    sealer = NodeSealer(site.state_dir)
    # The base (the sent model) is needed only by a CKKS setup: not sealed without a context.
    kept = base if site.ckks is not None else None
    packed = pack_pending(update, kept, weight, digest, layout, dict(metrics))
    put_sealed(context, PENDING, sealer, site.site_id, env.round_id, packed)
    del update, base, kept, packed
    proof = _proof(site, msg, env.round_id)
    envelope = Envelope("train", env.round_id, site_id=site.site_id, weight=weight, proof=proof)
    return _reply(msg, envelope)


#: The node config key (the SuperNode operator's, never the run config) that logs the user's
#: train function's exceptions with their traceback at WARNING (else DEBUG).
DEBUG_KEY = "secure-fl-debug"


def _log_train_failure(context: Context, site: FlowerSite) -> None:
    """Log the exception the user's train function raised, with its traceback, on this node
    only: at WARNING when the node config sets ``secure-fl-debug = true``, else at DEBUG. The
    reply never holds it (only :data:`TRAIN_FAILED` leaves). Call from an ``except``."""
    flag = context.node_config.get(DEBUG_KEY, False)
    debug = flag is True or (isinstance(flag, str) and flag.strip().lower() == "true")
    log.log(
        logging.WARNING if debug else logging.DEBUG,
        "secure_fl site %s: the train function raised or gave no usable weight (the server "
        "is told only %r)",
        site.site_id,
        TRAIN_FAILED,
        exc_info=True,
    )


def save_model(path: Path, vector: np.ndarray, layout: Layout) -> None:
    """Write ``vector`` laid out as ``layout`` to ``path`` (npz, atomically, mode 0600)."""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        n = math.prod(shape)
        arrays[key] = vector[offset : offset + n].reshape(shape).astype(np.dtype(dtype))
        offset += n
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue(), mode=0o600)


__all__ = [
    "DEBUG_KEY",
    "PENDING",
    "ROUND",
    "STATE",
    "TRAIN_FAILED",
    "make_secure_fl_mod",
    "secure_fl_mod",
]
