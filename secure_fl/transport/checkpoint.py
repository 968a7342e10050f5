"""The server's checkpoint: written after every completed round, read at start-up.

``state_dir/checkpoint.json`` names the federation, the number of completed rounds, the model file
``model-NNNNNN.tensors`` and its SHA-256, the round history, the privacy-ledger state (``null``
until differential privacy is on) and the server optimiser's state (when one is configured). Each file is written to a temporary name, flushed to disk and
renamed, model first, so a crash at any point leaves either the previous or the new checkpoint,
never a mix. Per-round records are kept in ``state_dir/rounds/round-NNNNNN.json`` (failed attempts
in ``round-NNNNNN-failed-A.json``).

CKKS: once a CKKS round has completed, the global model exists only encrypted. The checkpoint then
holds that ciphertext (``model-NNNNNN.ckks``, ``"model_format": "ckks-encrypted"``), never a
plaintext model: the server cannot decrypt it.

Errors: :func:`load` raises ConfigError when the checkpoint belongs to another federation or its
model does not match the recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError
from secure_fl.transport.tensors import Tensors, dumps, loads

CHECKPOINT = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    """``completed_rounds`` rounds are done (the next round id equals it); ``model`` is the
    global model after them; ``ledger`` is the DP ledger's state dict (None without DP).
    ``encrypted_model``: with CKKS, the encrypted global model (a CKKS_MODEL payload,
    :mod:`secure_fl.transport.ckks`) instead of ``model`` (then empty). ``server_optimizer``: the
    server optimiser's state dict (None without one)."""

    federation: str
    completed_rounds: int
    model: Tensors = field(repr=False)
    model_sha256: str
    history: tuple[Mapping[str, Any], ...] = ()
    ledger: Mapping[str, Any] | None = None
    encrypted_model: bytes | None = field(default=None, repr=False)
    server_optimizer: Mapping[str, Any] | None = None


def model_blob(model: Mapping[str, np.ndarray]) -> tuple[bytes, str]:
    """The serialised model and its SHA-256 (hex)."""
    blob = dumps(model)
    return blob, hashlib.sha256(blob).hexdigest()


def save(state_dir: Path, checkpoint: Checkpoint, blob: bytes | None = None) -> None:
    """Write ``checkpoint`` atomically (see the module docstring); ``blob`` is the serialised
    model when the caller already has it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    encrypted = checkpoint.encrypted_model
    if encrypted is not None:
        data = encrypted
    else:
        data = blob if blob is not None else dumps(checkpoint.model)
    if hashlib.sha256(data).hexdigest() != checkpoint.model_sha256:
        raise ConfigError("checkpoint model does not match its SHA-256")
    suffix = "ckks" if encrypted is not None else "tensors"
    model_name = f"model-{checkpoint.completed_rounds:06d}.{suffix}"
    atomic_write(state_dir / model_name, data, mode=0o600)
    meta = {
        "federation": checkpoint.federation,
        "completed_rounds": checkpoint.completed_rounds,
        "model_file": model_name,
        "model_sha256": checkpoint.model_sha256,
        "history": list(checkpoint.history),
        "ledger": checkpoint.ledger,
    }
    opt_name = f"server-optimizer-{checkpoint.completed_rounds:06d}.tensors"
    if checkpoint.server_optimizer is not None:
        meta["server_optimizer"] = _save_optimizer(state_dir, opt_name, checkpoint.server_optimizer)
    if encrypted is not None:
        meta["model_format"] = "ckks-encrypted"
    atomic_write(state_dir / CHECKPOINT, (json.dumps(meta, indent=1) + "\n").encode(), mode=0o600)
    for old in [
        *state_dir.glob("model-*.tensors"),
        *state_dir.glob("model-*.ckks"),
        *state_dir.glob("server-optimizer-*.tensors"),
    ]:
        if old.name not in (model_name, opt_name):
            old.unlink(missing_ok=True)


def _save_optimizer(state_dir: Path, name: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """The optimiser's scalars for checkpoint.json; its vectors go to ``name`` (tensors)."""
    arrays = {k: np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    if arrays:
        data = dumps(arrays)
        atomic_write(state_dir / name, data, mode=0o600)
        meta["_arrays_file"] = name
        meta["_arrays_sha256"] = hashlib.sha256(data).hexdigest()
    return meta


def _load_optimizer(state_dir: Path, meta: object) -> dict[str, Any] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ConfigError("checkpoint server_optimizer must be an object")
    state = {k: v for k, v in meta.items() if not k.startswith("_arrays")}
    name = meta.get("_arrays_file")
    if name is not None:
        try:
            data = (state_dir / str(name)).read_bytes()
        except OSError as exc:
            raise ConfigError(f"checkpoint optimiser state {name} is unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != meta.get("_arrays_sha256"):
            raise ConfigError(f"checkpoint optimiser state {name} does not match its SHA-256")
        state.update({k: np.asarray(v, dtype=np.float64) for k, v in loads(data).items()})
    return state


def save_round_record(state_dir: Path, name: str, record: Mapping[str, Any]) -> None:
    """Write the record of one round attempt to ``rounds/<name>.json`` (``round-NNNNNN`` for a
    completed round, ``round-NNNNNN-failed-A`` for a failed attempt)."""
    rounds = state_dir / "rounds"
    rounds.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, indent=1) + "\n").encode()
    atomic_write(rounds / f"{name}.json", data, mode=0o600)


def load(state_dir: Path, federation: str) -> Checkpoint | None:
    """The checkpoint in ``state_dir``, or None when there is none (a fresh start)."""
    path = state_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        blob = (state_dir / meta["model_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from exc
    if meta.get("federation") != federation:
        raise ConfigError(
            f"checkpoint {path} belongs to federation {meta.get('federation')!r}, not "
            f"{federation!r}"
        )
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("model_sha256"):
        raise ConfigError(f"checkpoint model {meta['model_file']} does not match its SHA-256")
    encrypted = meta.get("model_format") == "ckks-encrypted"
    return Checkpoint(
        federation=federation,
        completed_rounds=int(meta["completed_rounds"]),
        model={} if encrypted else loads(blob),
        model_sha256=digest,
        history=tuple(meta.get("history", [])),
        ledger=meta.get("ledger"),
        encrypted_model=blob if encrypted else None,
        server_optimizer=_load_optimizer(state_dir, meta.get("server_optimizer")),
    )


def allocate_round_id(
    state_dir: Path, federation: str, history: Sequence[Mapping[str, Any]], completed: int
) -> int:
    """A round id never used before by this federation's server, persisted in
    ``state_dir/round_ids.json`` before it is returned (so before any site hears of it): sites
    refuse a round id that is not greater than every one they contributed to, so a retried or
    resumed round runs under a new id. A lost ``round_ids.json`` is covered by the history.

    Errors: ConfigError when ``round_ids.json`` is unreadable."""
    path = state_dir / "round_ids.json"
    used = [int(h["round_id"]) for h in history if isinstance(h.get("round_id"), int)]
    next_id = max([completed, *(u + 1 for u in used)])
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("federation") == federation:
                next_id = max(next_id, int(saved["next"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is unreadable: {exc}") from exc
    atomic_write(path, json.dumps({"federation": federation, "next": next_id + 1}))
    return next_id
