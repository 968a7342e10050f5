"""Files written by ``secure-fl provision`` (:mod:`secure_fl.transport.provision`): private files
(mode 0600, never overwritten) in private directories (0700), public files (0644), and loading a
site's Ed25519 signing key.

Errors: ConfigError naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secure_fl.crypto import SigningKey
from secure_fl.errors import ConfigError


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuses to overwrite an existing file.

    Errors: ConfigError if the file exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def load_signing_key(path: Path) -> SigningKey:
    """Load a site's Ed25519 signing key (PEM, PKCS8). Errors: ConfigError."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load signing key {path}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return SigningKey(key)
