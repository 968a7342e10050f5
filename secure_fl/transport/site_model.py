"""A site's view of the global model and its fail-closed marker (no sockets).

Guarantees:

* The model a site trains on is the payload whose SHA-256 the server announced (the caller's
  ``fetch`` checks the digest; it is checked again here). "The same model" for the release guard
  (:mod:`.replay`) is its **content** (:attr:`SiteModel.content`:
  :func:`~secure_fl.transport.tensors.release_key`, values as a float32 task holds them), not
  the bytes served: a float64 copy nudged below float32 resolution is the same model.
* CKKS: an encrypted global model is decrypted here, for this site only, and never leaves it;
  only for a CKKS round (``allow_encrypted``): served to a round of another aggregation it is
  refused before anything is decrypted, and a decrypted model held from a CKKS round is not
  reused there. A failed check whose outcome depends on secret values (out of range,
  non-finite, not decrypting) fails closed: :func:`write_fail_closed_marker` writes ``state_dir/FAIL-CLOSED.json`` (with
  the model's digest, round and stated contributors: :attr:`SiteModel.details`) before
  anything else and the caller stops for good (see :mod:`secure_fl.transport.site`). Checks that
  depend only on what the server sent refuse just the round (``RemoteProtocolError``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from secure_fl.atomic import atomic_write
from secure_fl.errors import InvalidUpdateError, PostDecryptionError, RemoteProtocolError
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import tensors
from secure_fl.transport.config import SiteConfig
from secure_fl.transport.policy import bounded_json
from secure_fl.transport.rounds import sha256

#: In ``state_dir``: written when the site fails closed; the site refuses to start while it exists.
FAIL_CLOSED_MARKER = "FAIL-CLOSED.json"

#: ``fetch(digest) -> payload``: the transport's download of the model named by ``digest``.
FetchModel = Callable[[bytes], bytes | bytearray | memoryview]


class FailClosedError(Exception):
    """Stop for good (the marker is written): nothing more is sent. Not a SecureFLError, so that
    no per-round handler can catch it."""


def write_fail_closed_marker(config: SiteConfig, where: dict[str, Any], reason: str) -> Path:
    """Write ``state_dir/FAIL-CLOSED.json`` (federation, ``where``: the round, its round id, the
    model's SHA-256, the round it is the result of and, for an encrypted model, the number of
    contributors the server states; time, reason) atomically and return its path. ``reason``
    must hold no decrypted or secret value. Errors: OSError."""
    marker = config.state_dir / FAIL_CLOSED_MARKER
    atomic_write(
        marker,
        json.dumps(
            {
                "federation": config.federation,
                **where,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "reason": reason,
                "to_resume": "find out why (a tampered or corrupted model from the server, or "
                "a diverging local model), then remove this file",
            },
            indent=2,
        ),
    )
    return marker


class SiteModel:
    """The global model this site holds, by the digest the server announced.

    ``fail_closed(reason)`` is called (it must not return) when a check on decrypted values
    fails. ``log`` is a :class:`~secure_fl.transport.logs.EventLog`.
    """

    def __init__(
        self, config: SiteConfig, log: Any, fail_closed: Callable[[str], NoReturn]
    ) -> None:
        self._config = config
        self._log = log
        self._fail_closed = fail_closed
        self.model: tensors.Tensors | None = None
        self.digest = b""
        # tensors.release_key of the model held: the key of the release guard (replay.py).
        self.content = b""
        self.decrypted = False
        # What an operator needs to investigate a fail-closed stop: the model's digest, its
        # round and (CKKS) the number of contributors the server states. No secret value.
        self.details: dict[str, Any] = {}
        self._secret: Any = None  # secure_fl.he.SecretContext, loaded on first use

    def secret(self) -> Any:
        """The federation's secret CKKS context (loaded once; fingerprint and file mode checked).
        Errors: ConfigError."""
        if self._secret is None:
            self._secret = ckks_wire.load_secret(self._config.ckks)
        return self._secret

    def ensure(
        self,
        digest: bytes,
        fetch: FetchModel,
        *,
        encrypted_round: int | None = None,
        allow_encrypted: bool,
    ) -> tensors.Tensors:
        """The global model named by ``digest``: fetched unless already held, and decrypted here
        when it is the encrypted CKKS model (which must be the result of round
        ``encrypted_round``) **and** ``allow_encrypted`` (a CKKS round, or the final model
        written locally): the CKKS magic is checked before anything is decrypted, and an
        encrypted model (or one already decrypted and held) served to a round of another
        aggregation is refused, so that no metric, update or sum of a round whose checks are
        not the CKKS ones is ever computed on decrypted values. :attr:`decrypted` tells whether
        the model returned was decrypted here. Errors: RemoteProtocolError (a model refused on
        what the server sent: nothing is sent in the round), ConfigError; a failed check on
        decrypted values calls ``fail_closed``."""
        refused = RemoteProtocolError(
            "the server serves the encrypted CKKS global model to a round that is not a CKKS "
            "round; it is not decrypted (its values would leave this site through that round)"
        )
        if self.model is not None and self.digest == digest:
            if self.decrypted and not allow_encrypted:
                raise refused
            return self.model
        data = fetch(digest)
        if sha256(data) != digest:
            raise RemoteProtocolError("the downloaded model does not match its SHA-256")
        if bytes(data[: len(ckks_wire.MODEL_MAGIC)]) == ckks_wire.MODEL_MAGIC:
            if not allow_encrypted:
                raise refused
            self.details = {
                "model_sha256": bytes(digest).hex(),
                "model_round_id": encrypted_round,
                "contributors": _stated_contributors(data),
            }
            try:
                model = ckks_wire.decrypt_model(
                    self.secret(),
                    data,
                    expected_round=encrypted_round,
                    expected_structure=(
                        ckks_wire.structure_of(self.model) if self.model is not None else None
                    ),
                    expected_size=self._config.policy.vector_length,
                )
                content = tensors.release_key(model)
            except (PostDecryptionError, InvalidUpdateError) as exc:
                self._fail_closed(str(exc))
            decrypted = True
            self._log.info(
                "ckks-model-decrypted", round_id=encrypted_round, note="kept at this site"
            )
        else:
            model = tensors.loads(data)
            try:
                content = tensors.release_key(model)
            except InvalidUpdateError as exc:
                raise RemoteProtocolError(f"the global model is refused: {exc}") from None
            decrypted = False
            self.details = {"model_sha256": bytes(digest).hex(), "encrypted": False}
        self.model, self.content, self.decrypted = model, content, decrypted
        self.digest = digest
        return model


def _stated_contributors(data: bytes | bytearray | memoryview) -> int | None:
    """The number of contributors an encrypted model's header states (for the fail-closed
    marker; nothing is decrypted), or None when the header cannot be read."""
    view = memoryview(data).cast("B")
    start = len(ckks_wire.MODEL_MAGIC) + 4
    if len(view) < start:
        return None
    length = int.from_bytes(view[start - 4 : start], "big")
    if length > min(_MAX_HEADER_READ, len(view) - start):
        return None
    try:
        header = bounded_json(
            bytes(view[start : start + length]).decode("utf-8"),
            "CKKS model header",
            max_chars=_MAX_HEADER_READ,
        )
    except (UnicodeDecodeError, ValueError):
        return None
    value = header.get("contributors") if isinstance(header, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_MAX_HEADER_READ = 1 << 20
