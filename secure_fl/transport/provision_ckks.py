"""The CKKS keys of a provisioned federation (:mod:`secure_fl.transport.provision`): finding the
provisioner of :mod:`secure_fl.he` and rotating the keys of an existing federation folder
(``secure-fl provision FEDERATION_DIR --rotate-ckks``).

Errors: ConfigError naming the folder or file.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.transport.provision_files import _mkdir_private


def ckks_provisioner() -> Callable[..., Any] | None:
    """The CKKS key provisioner, ``secure_fl.he.provision(directory) -> Provisioned`` (with
    ``secret_path``, ``public_path`` and ``fingerprint``), when that package and TenSEAL are
    installed; None otherwise. The one place where provisioning reaches into :mod:`secure_fl.he`.
    """
    try:
        he = importlib.import_module("secure_fl.he")
        importlib.import_module("tenseal")
    except ImportError:
        return None
    provisioner = getattr(he, "provision", None)
    return provisioner if callable(provisioner) else None


@dataclass(frozen=True)
class RotatedCkks:
    """What :func:`rotate_ckks` wrote: the new and the previous CKKS fingerprints and the files."""

    fingerprint: str
    previous: str | None
    files: tuple[Path, ...]


def _config_ckks_path(config_path: Path, config: dict[str, Any], default: str) -> Path:
    section = config.get("ckks")
    name = section.get("context") if isinstance(section, dict) else None
    if not isinstance(name, str) or not name:
        name = default
    target = Path(name)
    return target if target.is_absolute() else config_path.parent / target


def rotate_ckks(directory: str | Path, preset: str | None = None) -> RotatedCkks:
    """Give an existing federation folder fresh CKKS keys (``secure-fl provision --rotate-ckks``).

    Generates a new secret key (and parameters of ``preset``; default: the preset of the current
    keys, else ``n8192-add``) and writes, each atomically: ``ckks/`` (both artefacts, the secret
    one mode 0600), the server's public context (0644), every site's secret context (0600), and
    the new fingerprint in ``server/server.json`` and every ``sites/<name>/site.json`` (the
    artefact path named by each config is kept). Parties holding the old keys are refused from
    then on (fingerprint mismatch). Copy ``server/`` and each ``sites/<name>/`` again.

    Guarantee: secrets are written with mode 0600 and never with a wider mode, even briefly.
    Rotation cannot re-encrypt a server checkpoint that holds a CKKS-encrypted global model; such
    a server refuses to resume (start it with a fresh ``state_dir``).

    Errors: ConfigError when ``directory`` is not a provisioned federation, TenSEAL is missing,
    or a config is unreadable.
    """
    from secure_fl.atomic import atomic_write

    root = Path(directory)
    server_path = root / "server" / "server.json"
    if not (root / "roster.json").exists() or not server_path.exists():
        raise ConfigError(f"{root} is not a provisioned federation (no roster.json / server.json)")
    provisioner = ckks_provisioner()
    if provisioner is None:
        raise ConfigError("CKKS keys need secure_fl.he and TenSEAL: pip install tenseal==0.3.18")
    from secure_fl.he import PublicContext

    def read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a JSON object")
        return data

    server = read(server_path)
    site_paths = sorted((root / "sites").glob("*/site.json"))
    sites = {path: read(path) for path in site_paths}
    public_path = _config_ckks_path(server_path, server, "ckks-public.ctx")
    previous: str | None = None
    old_section = server.get("ckks")
    if isinstance(old_section, dict) and isinstance(old_section.get("fingerprint"), str):
        previous = old_section["fingerprint"]
    if preset is None and public_path.exists():
        try:
            preset = PublicContext.load(public_path).preset.name
        except ConfigError:
            preset = None
    ckks_dir = root / "ckks"
    _mkdir_private(ckks_dir)
    made = provisioner(ckks_dir, preset, overwrite=True)
    secret = Path(made.secret_path).read_bytes()
    written: list[Path] = [Path(made.secret_path), Path(made.public_path)]
    atomic_write(public_path, Path(made.public_path).read_bytes(), mode=0o644)
    written.append(public_path)
    for path, config in sites.items():
        target = _config_ckks_path(path, config, "ckks-secret.ctx")
        atomic_write(target, secret, mode=0o600)
        written.append(target)
    del secret
    for path, config in [(server_path, server), *sites.items()]:
        default = "ckks-public.ctx" if path == server_path else "ckks-secret.ctx"
        section = config.get("ckks")
        context = section.get("context") if isinstance(section, dict) else None
        config["ckks"] = {
            "context": context if isinstance(context, str) and context else default,
            "fingerprint": made.fingerprint,
        }
        atomic_write(path, json.dumps(config, indent=2) + "\n", mode=0o644)
        written.append(path)
    return RotatedCkks(fingerprint=made.fingerprint, previous=previous, files=tuple(written))
