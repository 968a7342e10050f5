"""The Flower ClientApp mod that makes a node a secure_fl site (the SITE column of the contract).

Put :data:`secure_fl_mod` (or :func:`make_secure_fl_mod` with a fixed site) in front of the
user's ``@app.train()`` function: ``ClientApp(mods=[secure_fl_mod])``. A message without a
``"secure_fl"`` record passes straight through. For one round (:mod:`.records` for the layout):

1. ``train``: the user's train function runs; its trained arrays never leave the node. The
   update (trained minus sent arrays, or the trained arrays when none were sent) is sealed
   into ``context.state`` (AES-256-GCM under the :class:`~.node.NodeSealer`, bound to site id
   and round id); the reply is the site id, the weight (``num-examples``) and the user's public
   metrics.
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
own DP record (``state_dir/flower/dp_rounds.jsonl``); a CKKS check that depends on secret
values fails closed (``state_dir/flower/FAIL-CLOSED.json``: every later round is refused).

The ``setup`` / ``step`` / ``result`` stages live in :mod:`.mod_stages` (split to keep each module
under 400 lines). A node provisioned with a CKKS context range-checks its new local model at the
``train`` stage, whatever the round's aggregation turns out to be (the stage does not say), so
that a refusal never follows the weight report.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
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
from secure_fl.integrations.flower.node import (
    FlowerSite,
    NodeReleaseGuard,
    NodeSealer,
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
            return call_next(msg, context)
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

        out = mod_stages.run_stage(env, frame, context, site)
        return _reply(msg, Envelope(env.stage, env.round_id, frame=out, site_id=site_id))
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
        log.warning(
            "secure_fl site %s leaves round %d (%s): %s", site_id, env.round_id, env.stage, reason
        )
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
    update: np.ndarray, base: np.ndarray | None, weight: float, digest: str, layout: Layout
) -> bytes:
    """The pending update as bytes: a JSON header, the float64 update, the base (if any)."""
    head = json.dumps(
        {
            "weight": weight,
            "digest": digest,
            "n": int(update.size),
            "base": base is not None,
            "keys": list(layout.keys),
            "shapes": [list(s) for s in layout.shapes],
            "dtypes": list(layout.dtypes),
        }
    ).encode()
    body = update.astype("<f8").tobytes() + (b"" if base is None else base.astype("<f8").tobytes())
    return struct.pack(">I", len(head)) + head + body


def unpack_pending(data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """(header, update, base) of :func:`pack_pending`'s bytes."""
    (size,) = struct.unpack_from(">I", data)
    head = json.loads(data[4 : 4 + size])
    n = int(head["n"])
    values = np.frombuffer(data[4 + size :], dtype="<f8").astype(np.float64)
    update = values[:n].copy()
    base = values[n : 2 * n].copy() if head["base"] else None
    return head, update, base


def layout_of(head: dict[str, Any]) -> Layout:
    """The :class:`~.records.Layout` recorded in a pending header."""
    return Layout(
        tuple(head["keys"]),
        tuple(tuple(int(d) for d in s) for s in head["shapes"]),
        tuple(head["dtypes"]),
    )


def model_digest(vector: np.ndarray, layout: Layout) -> str:
    """SHA-256 (hex) of a model's content: keys, shapes and float64 values (-0.0 as 0.0)."""
    h = hashlib.sha256(b"secure_fl/flower/model/v1\x00")
    h.update(json.dumps([layout.keys, layout.shapes]).encode())
    h.update((np.asarray(vector, dtype=np.float64) + 0.0).astype("<f8").tobytes())
    return h.hexdigest()


def _train(
    msg: Message, context: Context, call_next: ClientAppCallable, env: Envelope, site: FlowerSite
) -> Message:
    forget_round(context)  # a new round supersedes whatever this node held
    reply = call_next(msg, context)
    if reply.has_error():
        raise InvalidUpdateError("the train function replied with an error")
    content = reply.content
    arrays = content.array_records.get("arrays")
    metrics = content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        raise InvalidUpdateError("the train reply must hold 'arrays' and 'metrics'")
    num = metrics.get("num-examples")
    if (
        isinstance(num, bool)
        or not isinstance(num, int | float)
        or not math.isfinite(float(num))
        or float(num) <= 0
    ):
        raise InvalidUpdateError(f"metrics['num-examples'] must be a number > 0, got {num!r}")
    trained, layout = records.flatten(arrays, where="reply arrays")
    sent = msg.content.array_records.get("arrays")
    base: np.ndarray | None = None
    if sent is not None:
        base, sent_layout = records.flatten(sent, where="arrays")
        if sent_layout.keys != layout.keys or sent_layout.shapes != layout.shapes:
            raise InvalidUpdateError("the trained arrays' keys or shapes differ from the sent ones")
        update = trained - base
        digest = model_digest(base, sent_layout)
    else:
        update = trained
        digest = model_digest(trained, layout)
    del trained
    NodeReleaseGuard(site.state_dir, env.round_id, digest).check_fresh()
    if site.ckks is not None and site.policy.accepts("ckks"):
        from secure_fl.integrations.flower import mod_stages

        # Before the weight is reported: a refusal later would tell the server one bit.
        mod_stages.check_ckks_vector(site, update if base is None else base + update)
    weight = float(num)
    sealer = NodeSealer(site.state_dir)
    packed = pack_pending(update, base, weight, digest, layout)
    put_sealed(context, PENDING, sealer, site.site_id, env.round_id, packed)
    del update, base, packed
    envelope = Envelope("train", env.round_id, site_id=site.site_id, weight=weight)
    return _reply(msg, envelope, {"metrics": metrics})


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


__all__ = ["PENDING", "ROUND", "STATE", "make_secure_fl_mod", "secure_fl_mod"]
