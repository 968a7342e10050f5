"""The gRPC server's side of the coordinator: its :class:`~.coordinator.Host`, and the privacy
layer it builds from the config.

:class:`ShellHost` forwards every host call to the server's overridable methods
(``_new_round_id``, ``_post``, ``_set_model``, ``_set_encrypted_model``), so a test's malicious
server subclass changes what the coordinator does through them; checkpoints and round records are
written atomically by :mod:`.checkpoint`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from secure_fl.errors import ConfigError
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport import tensors
from secure_fl.transport.config import ServerConfig
from secure_fl.transport.coordinator import Attempt, ModelView

if TYPE_CHECKING:
    from secure_fl.transport.server import FederationServer


class ShellHost:
    """The coordinator's Host for ``server`` (see the module docstring)."""

    def __init__(self, server: FederationServer) -> None:
        self._s = server

    def new_round_id(self) -> int:
        return self._s._new_round_id()

    def post(self, attempt: Attempt, site: int, kind: str, message: Message) -> None:
        self._s._post(attempt, site, kind, message)

    def model_view(self) -> ModelView:
        s = self._s
        return ModelView(s._model, s._digest, len(s._blob), s._encrypted, s._structure)

    def set_model(self, model: tensors.Tensors) -> None:
        self._s._set_model(model)

    def set_encrypted_model(self, blob: bytes) -> None:
        self._s._set_encrypted_model(blob)

    def save_checkpoint(self, checkpoint: ckpt.Checkpoint, blob: bytes | None) -> None:
        ckpt.save(self._s.config.state_dir, checkpoint, blob=blob or self._s._blob)

    def save_round_record(self, name: str, record: Mapping[str, Any]) -> None:
        ckpt.save_round_record(self._s.config.state_dir, name, record)

    def clock(self) -> float:
        return time.monotonic()


def server_privacy(config: ServerConfig) -> Any:
    """The server's privacy layer (:class:`secure_fl.transport.privacy.ServerPrivacy`) when the
    config asks for one. Errors: ConfigError when it cannot be built."""
    if config.privacy is None:
        return None
    try:
        module = importlib.import_module("secure_fl.transport.privacy")
        factory = module.ServerPrivacy.from_config
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"privacy needs secure_fl.transport.privacy.ServerPrivacy, unavailable: {exc}"
        ) from exc
    return factory(config, config.state_dir)
