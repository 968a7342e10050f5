"""Provision a secure_fl federation of Flower nodes: per site an Ed25519 signing key, its site JSON
(:func:`~.node.load_flower_site`) and its node-local ``state_dir``; the server's roster with the
verify keys; optionally one CKKS context pair (secret context per site, public for the server).

Layout of ``out_dir``::

    <name>/site.json          the site's JSON (relative paths), mode 0644
    <name>/signing.key        Ed25519 private key (PEM, PKCS8), mode 0600
    <name>/state/             the node's state_dir, mode 0700
    <name>/ckks-secret.ctx    (ckks) the federation's secret context, mode 0600
    ckks/                     (ckks) both artefacts as generated (keep the secret one offline)
    server/ckks-public.ctx    (ckks) the public context for the server, mode 0644
    roster.json               the public roster (names, site ids, verify keys; :func:`load_roster`)

After provisioning (ckks): ``ckks/ckks-secret.ctx`` is the federation's CKKS secret, the key
that decrypts every site's update. Each site's copy is already in its ``<name>/`` folder: move
each ``<name>/`` folder to its site, hand ``server/`` and ``roster.json`` to the server, and
DELETE ``ckks/`` (and the moved ``<name>/`` folders) from the provisioning machine: the server
must never be able to read a secret context.

Guarantee: private files are created with mode 0600 (never wider, never overwritten), private
folders 0700; site ids are 1..n in the order of ``names``; every target is checked before
anything is written, so a refused call writes nothing. Errors: ConfigError naming the argument
(bad names, fewer than 2 sites, an existing key or CKKS secret in any site folder, an existing
``ckks/`` with ckks, TenSEAL missing for ckks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secure_fl.atomic import atomic_write
from secure_fl.crypto import SigningKey
from secure_fl.errors import ConfigError
from secure_fl.rounds.policy import SitePolicy
from secure_fl.transport.config_common import RosterEntry, _check_roster, valid_name
from secure_fl.transport.config_site import policy_to_json
from secure_fl.transport.provision_files import write_private

SITE_JSON = "site.json"


@dataclass(frozen=True)
class FlowerFederation:
    """What :func:`provision_flower` wrote (the server side's view): the ``roster`` with verify
    keys, each site's JSON by name, and (ckks) the public context and the fingerprint."""

    federation: str
    roster: tuple[RosterEntry, ...]
    site_configs: Mapping[str, Path]
    ckks_public: Path | None
    ckks_fingerprint: str | None


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _check_targets(root: Path, names: Sequence[str], *, ckks: bool) -> None:
    """Refuse (ConfigError naming every one) when any target already holds a secret."""
    taken = [root / name / "signing.key" for name in names]
    taken += [root / name / "ckks-secret.ctx" for name in names]
    existing = [str(p) for p in taken if os.path.lexists(p)]
    if ckks and (root / "ckks").exists() and any((root / "ckks").iterdir()):
        existing.append(str(root / "ckks"))
    if existing:
        raise ConfigError(
            f"out_dir: an earlier provisioning exists ({', '.join(existing)}); nothing was "
            "written: provision into a fresh folder"
        )


def provision_flower(
    names: Sequence[str],
    out_dir: str | Path,
    *,
    federation: str = "flower",
    policy: SitePolicy | None = None,
    ckks_preset: str | None = None,
) -> FlowerFederation:
    """Provision the sites ``names`` (ids 1..n in that order) into ``out_dir`` (module
    docstring); every site pins ``policy`` (default: :class:`SitePolicy`'s safe default) and the
    whole roster; with ``ckks_preset`` (e.g. ``"n8192-add"``) one CKKS key pair is generated.

    Errors: ConfigError for fewer than 2 or duplicate or invalid names, an empty federation, a
    site folder that already holds a key, or ckks without TenSEAL."""
    names = list(names)
    if not isinstance(federation, str) or not federation:
        raise ConfigError(f"federation must be a non-empty string, got {federation!r}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"names must list at least 2 distinct sites, got {names!r}")
    for name in names:
        if not valid_name(name):
            raise ConfigError(f"names: {name!r} must match [A-Za-z0-9._-]{{1,64}}")
    policy = policy if policy is not None else SitePolicy()
    if not isinstance(policy, SitePolicy):
        raise ConfigError(f"policy must be a SitePolicy, got {type(policy).__name__}")
    root = Path(out_dir)
    provisioner = None
    if ckks_preset is not None:
        from secure_fl.transport.provision_ckks import ckks_provisioner

        provisioner = ckks_provisioner()
        if provisioner is None:
            raise ConfigError("ckks_preset needs secure_fl.he and TenSEAL (pip install tenseal)")
    _check_targets(root, names, ckks=ckks_preset is not None)
    root.mkdir(parents=True, exist_ok=True)
    roster: list[RosterEntry] = []
    for site_id, name in enumerate(names, start=1):
        site_dir = root / name
        _mkdir_private(site_dir)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(site_dir / "signing.key", pem)  # ConfigError when it exists
        roster.append(RosterEntry(name, site_id, verify_key=SigningKey(key).public_bytes))
        _mkdir_private(site_dir / "state")
    entries = tuple(roster)
    _check_roster(entries)
    ckks_public: Path | None = None
    fingerprint: str | None = None
    secret: bytes | None = None
    if provisioner is not None:
        ckks_dir = root / "ckks"
        _mkdir_private(ckks_dir)
        made = provisioner(ckks_dir, ckks_preset)
        fingerprint = str(made.fingerprint)
        ckks_public = root / "server" / "ckks-public.ctx"
        atomic_write(ckks_public, Path(made.public_path).read_bytes(), mode=0o644)
        secret = Path(made.secret_path).read_bytes()
    public_roster = [
        {"name": e.name, "site_id": e.site_id, "verify_key": (e.verify_key or b"").hex()}
        for e in entries
    ]
    configs: dict[str, Path] = {}
    for entry in entries:
        site_dir = root / entry.name
        body: dict[str, object] = {
            "federation": federation,
            "name": entry.name,
            "site_id": entry.site_id,
            "roster": public_roster,
            "policy": policy_to_json(policy),
            "state_dir": "state",
            "signing_key": "signing.key",
        }
        if secret is not None:
            write_private(site_dir / "ckks-secret.ctx", secret)
            body["ckks"] = {"context": "ckks-secret.ctx", "fingerprint": fingerprint}
        path = site_dir / SITE_JSON
        atomic_write(path, json.dumps(body, indent=2) + "\n", mode=0o644)
        configs[entry.name] = path
    del secret
    atomic_write(
        root / "roster.json",
        json.dumps({"federation": federation, "roster": public_roster}, indent=2) + "\n",
        mode=0o644,
    )
    return FlowerFederation(federation, entries, configs, ckks_public, fingerprint)


def load_roster(path: str | os.PathLike[str]) -> tuple[RosterEntry, ...]:
    """The public roster (names, site ids 1..n, verify keys) of a ``roster.json`` that
    :func:`provision_flower` wrote: what a ServerApp needs for
    :class:`~.workflow.SecureAggregationWorkflow`, no secret of any site.

    Guarantee: every entry has a 32-byte verify key; names and ids are valid and distinct.
    Errors: ConfigError naming the file (unreadable, not JSON, a missing or unknown field, an
    entry without ``verify_key``, fewer than 2 sites, duplicate names or ids)."""
    from secure_fl.transport.config_common import _roster
    from secure_fl.transport.config_section import _read_json, _Section

    try:
        data, base = _read_json(Path(path))
        s = _Section(data, "", base)
        roster = _roster(s)
        s.str_("federation")
        s.done()
        missing = [e.name for e in roster if e.verify_key is None]
        if missing:
            raise ConfigError(f"roster entries {missing} have no verify_key")
        _check_roster(roster)
    except ConfigError as exc:
        raise ConfigError(f"roster file {path}: {exc}") from exc
    return roster


__all__ = ["FlowerFederation", "load_roster", "provision_flower"]
