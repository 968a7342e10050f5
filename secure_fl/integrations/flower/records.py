"""How a secure_fl round rides in Flower messages (the one layout both halves read).

Every message of a secure_fl round is a Flower ``Message`` of type ``"train"`` (so that the
ClientApp mod sees it in front of the user's ``@app.train()`` function) whose ``RecordDict``
holds a ``ConfigRecord`` under :data:`KEY` (``"secure_fl"``):

=========  ==========================================================================
field      meaning
=========  ==========================================================================
``v``      layout version (:data:`VERSION`, 1); another value is refused
``stage``  ``"train"``, ``"setup"``, ``"step"`` or ``"result"`` (:data:`STAGES`)
``round``  the round id (an integer in [1, 2^62)), the round layer's ``round_id``
``frame``  (optional) the round layer's codec frame (:mod:`secure_fl.rounds.codec`)
=========  ==========================================================================

A site's reply carries the same record with, in addition, ``site_id`` (its provisioned site
id), and at the ``train`` stage ``weight`` (its reported weight, > 0, finite) and, when the site
has a signing key (active variant), ``proof``: its Ed25519 signature over
:func:`claim_message` (round id, site id, the node id the server addressed), so that a node
cannot claim another site's id; a site that leaves the round replies with ``left`` (a one-line
reason, no secret, no traceback) and no frame.

At the ``train`` stage the server's message also holds the user's records (``"arrays"``: the
global model, an ``ArrayRecord``; ``"config"``: a ``ConfigRecord``) which the mod passes to the
user's train function; the user's reply holds ``"arrays"`` (the trained model) and
``"metrics"`` (a ``MetricRecord`` with ``"num-examples"``). The mod never forwards the trained
arrays: its train reply holds the envelope only (site id, weight, proof); the user's metrics
follow with the site's masked input (SecAgg) or upload (plain), never in a CKKS round.

:func:`flatten` and :func:`unflatten` turn an ``ArrayRecord`` into one float64 vector (keys in
the record's order) and back; the :class:`Layout` is what the server needs to rebuild the mean.

Errors: every reader raises :class:`~secure_fl.errors.RemoteProtocolError` naming the field for
a record that is missing, of the wrong type or out of range (bytes from the other party are
untrusted), and ConfigError for a bad local argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError, RemoteProtocolError

KEY = "secure_fl"
VERSION = 1
STAGES = ("train", "setup", "step", "result")
#: Round ids are drawn below this bound (Flower config integers are signed 64-bit).
ROUND_ID_LIMIT = 1 << 62
#: The most characters of a ``left`` reason (longer ones are cut with an ellipsis marker).
MAX_REASON = 300
#: The most bytes of a ``proof`` (an Ed25519 signature is 64).
MAX_PROOF = 64
_CLAIM_DOMAIN = b"secure_fl/flower/claim/v1\x00"


@dataclass(frozen=True)
class Envelope:
    """The :data:`KEY` record of one message, checked. ``frame`` is the codec frame (or None),
    ``site_id`` / ``weight`` / ``left`` / ``proof`` only in a site's reply."""

    stage: str
    round_id: int
    frame: bytes | None = None
    site_id: int | None = None
    weight: float | None = None
    left: str | None = None
    proof: bytes | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not _is_int(self.round_id) or not 1 <= self.round_id < ROUND_ID_LIMIT:
            raise ConfigError(f"round_id must be an integer in [1, 2^62), got {self.round_id!r}")
        if self.site_id is not None and (
            not _is_int(self.site_id) or not 1 <= self.site_id < 1 << 32
        ):
            raise ConfigError(f"site_id must be an integer in [1, 2^32), got {self.site_id!r}")
        if self.weight is not None and (
            not isinstance(self.weight, float | int)
            or isinstance(self.weight, bool)
            or not math.isfinite(self.weight)
            or self.weight <= 0
        ):
            raise ConfigError(f"weight must be a finite number > 0, got {self.weight!r}")
        if self.proof is not None and (
            not isinstance(self.proof, bytes) or not 1 <= len(self.proof) <= MAX_PROOF
        ):
            raise ConfigError(f"proof must be 1 to {MAX_PROOF} bytes")


def claim_message(round_id: int, site_id: int, node_id: int) -> bytes:
    """The bytes a site signs to prove its train-stage claim: the domain, the round id, its site
    id and the Flower node id the server addressed (``message.metadata.dst_node_id``), each as
    8 bytes big-endian. A proof is good for one round, one site and one node only.
    Errors: ConfigError for a value that is not an integer in [0, 2^64)."""
    parts = []
    for name, value in (("round_id", round_id), ("site_id", site_id), ("node_id", node_id)):
        if not _is_int(value) or not 0 <= value < 1 << 64:
            raise ConfigError(f"{name} must be an integer in [0, 2^64), got {value!r}")
        parts.append(int(value).to_bytes(8, "big"))
    return _CLAIM_DOMAIN + b"".join(parts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def to_record(envelope: Envelope) -> Any:
    """The ``ConfigRecord`` of ``envelope`` (store it under :data:`KEY`)."""
    from flwr.app import ConfigRecord

    data: dict[str, Any] = {"v": VERSION, "stage": envelope.stage, "round": envelope.round_id}
    if envelope.frame is not None:
        data["frame"] = bytes(envelope.frame)
    if envelope.site_id is not None:
        data["site_id"] = int(envelope.site_id)
    if envelope.weight is not None:
        data["weight"] = float(envelope.weight)
    if envelope.left is not None:
        reason = envelope.left.replace("\n", " ")
        data["left"] = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
    if envelope.proof is not None:
        data["proof"] = bytes(envelope.proof)
    return ConfigRecord(data)


def read(content: Any) -> Envelope | None:
    """The envelope of a message's ``RecordDict`` (``message.content``), or None when it has no
    :data:`KEY` record (a message that is not ours). Errors: RemoteProtocolError naming the
    field for a malformed record."""
    try:
        records = content.config_records
    except Exception as exc:
        raise RemoteProtocolError("message content is not a RecordDict") from exc
    if KEY not in records:
        return None
    rec = records[KEY]
    allowed = {"v", "stage", "round", "frame", "site_id", "weight", "left", "proof"}
    unknown = sorted(set(rec.keys()) - allowed)
    if unknown:
        raise RemoteProtocolError(f"{KEY} record has unknown fields {unknown}")
    if rec.get("v") != VERSION:
        raise RemoteProtocolError(f"{KEY}.v must be {VERSION}, got {rec.get('v')!r}")
    stage = rec.get("stage")
    if stage not in STAGES:
        raise RemoteProtocolError(f"{KEY}.stage must be one of {STAGES}, got {stage!r}")
    round_id = rec.get("round")
    if not _is_int(round_id) or not 1 <= round_id < ROUND_ID_LIMIT:
        raise RemoteProtocolError(f"{KEY}.round must be an integer in [1, 2^62), got {round_id!r}")
    frame = rec.get("frame")
    if frame is not None and not isinstance(frame, bytes):
        raise RemoteProtocolError(f"{KEY}.frame must be bytes")
    site_id = rec.get("site_id")
    if site_id is not None and (not _is_int(site_id) or not 1 <= site_id < 1 << 32):
        raise RemoteProtocolError(f"{KEY}.site_id must be an integer in [1, 2^32), got {site_id!r}")
    weight = rec.get("weight")
    if weight is not None and (
        not isinstance(weight, float | int)
        or isinstance(weight, bool)
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise RemoteProtocolError(f"{KEY}.weight must be a finite number > 0, got {weight!r}")
    left = rec.get("left")
    if left is not None and not isinstance(left, str):
        raise RemoteProtocolError(f"{KEY}.left must be a string")
    proof = rec.get("proof")
    if proof is not None and (not isinstance(proof, bytes) or not 1 <= len(proof) <= MAX_PROOF):
        raise RemoteProtocolError(f"{KEY}.proof must be 1 to {MAX_PROOF} bytes")
    return Envelope(
        stage=stage,
        round_id=round_id,
        frame=frame,
        site_id=site_id,
        weight=None if weight is None else float(weight),
        left=left,
        proof=proof,
    )


@dataclass(frozen=True)
class Layout:
    """Keys, shapes and dtypes of an ``ArrayRecord`` flattened by :func:`flatten`."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


def flatten(arrays: Any, *, where: str = "arrays") -> tuple[np.ndarray, Layout]:
    """One float64 vector of every array of ``arrays`` (an ``ArrayRecord``), keys in the record's
    order, and its :class:`Layout`. Errors: RemoteProtocolError naming ``where`` for an empty
    record, a non-numeric array or a value that is not finite."""
    keys: list[str] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[str] = []
    parts: list[np.ndarray] = []
    for key, array in arrays.items():
        value = array.numpy()
        if value.dtype.kind not in "fiu":
            raise RemoteProtocolError(f"{where}[{key!r}] has dtype {value.dtype}: numbers only")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise RemoteProtocolError(f"{where}[{key!r}] holds a value that is not finite")
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        keys.append(str(key))
        shapes.append(tuple(int(d) for d in value.shape))
        dtypes.append(value.dtype.str)
        parts.append(flat)
    if not parts:
        raise RemoteProtocolError(f"{where} holds no array")
    vector = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return vector, Layout(tuple(keys), tuple(shapes), tuple(dtypes))


def unflatten(vector: np.ndarray, layout: Layout) -> Any:
    """The ``ArrayRecord`` of ``vector`` laid out as ``layout`` (each array cast back to its
    dtype). Errors: ConfigError when the length differs from the layout's size."""
    from flwr.app import Array, ArrayRecord

    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.size != layout.size:
        raise ConfigError(
            f"vector has {vector.size} values; the layout holds {layout.size} ({len(layout.keys)} arrays)"
        )
    out: dict[str, Any] = {}
    offset = 0
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        n = math.prod(shape)
        part = vector[offset : offset + n].reshape(shape).astype(np.dtype(dtype))
        out[key] = Array(part)
        offset += n
    return ArrayRecord(out)


__all__ = [
    "KEY",
    "MAX_REASON",
    "ROUND_ID_LIMIT",
    "STAGES",
    "VERSION",
    "Envelope",
    "Layout",
    "claim_message",
    "flatten",
    "read",
    "to_record",
    "unflatten",
]
