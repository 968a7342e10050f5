"""``secure-fl provision``: a certificate authority, certificates, keys and one config per party.

Layout of ``FEDERATION_DIR`` (every private key is written with mode 0600, in directories of mode
0700, and never overwritten)::

    ca/ca.crt, ca/ca.key             the federation CA; keep ca.key offline
    server/server.json               the server's config (roster with pinned certificates)
    server/server.crt, server.key    the server's TLS identity; server/ca.crt
    sites/<name>/site.json           one config per site
    sites/<name>/site.crt, site.key  the site's TLS identity (common name = site name)
    sites/<name>/signing.key         the site's long-term Ed25519 key (active SecAgg variant)
    sites/<name>/ca.crt
    sites/<name>/ckks-secret.ctx     the CKKS secret context (encrypts, decrypts the global model)
    server/ckks-public.ctx           the CKKS public context (adds ciphertexts only)
    ckks/                            both CKKS artefacts as generated; keep offline like ca/
    roster.json                      names, ids, certificate fingerprints, verification keys
    server/initial_model.tensors     with ``unet``: the initial 3D-UNet (``model.path``)

Copy ``server/`` to the server machine and ``sites/<name>/`` to each site; each directory is
self-contained (paths in the configs are relative to it).

Keys: ECDSA P-256 for TLS (widely supported by gRPC's TLS stacks), Ed25519 for protocol signatures.
The CKKS artefacts come from :func:`secure_fl.he.provision` (TenSEAL); they are written when
``ckks`` is true, or by default when that function and TenSEAL are available; each config then
names its artefact and the federation's CKKS fingerprint. :func:`rotate_ckks`
(``secure-fl provision FEDERATION_DIR --rotate-ckks``) replaces the CKKS keys of an existing
federation folder and the fingerprints in every config.

With ``unet`` (``secure-fl provision --task unet``) every site's ``task`` trains the MONAI 3D-UNet
(:func:`secure_fl.training.remote.unet_site_task`, with that site's datalist) and the server starts
from the model written by :func:`secure_fl.training.remote.write_initial_model`; no JSON needs
editing by hand.

The certificates are issued by :mod:`secure_fl.transport.pki`, the UNet task by
:mod:`secure_fl.transport.provision_unet`, the privacy options by
:mod:`secure_fl.transport.provision_privacy`, the key files by
:mod:`secure_fl.transport.provision_files`, the CKKS keys (and their rotation) by
:mod:`secure_fl.transport.provision_ckks`; every name is importable from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from secure_fl.crypto import SigningKey
from secure_fl.errors import ConfigError
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.transport.config import (
    AGGREGATIONS,
    AggregationSettings,
    SitePolicy,
    policy_to_json,
    valid_name,
)
from secure_fl.transport.pki import (
    _cert_pem,
    _host_names,
    _issue,
    _key_pem,
    _name,
    issue_site_certificate,
    new_ca,
)
from secure_fl.transport.provision_ckks import RotatedCkks, ckks_provisioner, rotate_ckks
from secure_fl.transport.provision_files import (
    _mkdir_private,
    _write_public,
    load_signing_key,
    write_private,
)
from secure_fl.transport.provision_unet import (
    INITIAL_MODEL,
    UNET_FACTORY,
    UNetTask,
    _unet_remote,
    site_datalists,
)
from secure_fl.transport.tls import cert_fingerprint

DEFAULT_SERVER_NAME = "secure-fl-server"


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` wrote: the directory, the server config and each site's config."""

    root: Path
    server_config: Path
    site_configs: dict[str, Path]
    ckks: str


def provision(
    directory: str | Path,
    sites: Sequence[str],
    *,
    federation: str | None = None,
    listen: str = "127.0.0.1:50051",
    server_name: str = DEFAULT_SERVER_NAME,
    server_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    rounds: int = 3,
    protocol: str = "secagg+",
    days: int = 365,
    ckks: bool | None = None,
    active: bool = True,
    corrupt_fraction: float = 0.0,
    dropout_rate: float = 0.1,
    model_shapes: Sequence[Sequence[int]] = ((16, 16), (16,)),
    unet: UNetTask | None = None,
    privacy: PrivacyConfig | None = None,
) -> Provisioned:
    """Create a federation directory (layout in the module docstring) for ``sites``.

    Guarantee: every private key is created with mode 0600 and no existing file is overwritten;
    the server config pins each site's certificate fingerprint.

    ``ckks``: write the CKKS artefacts (True), skip them (False), or write them when
    :func:`ckks_provisioner` finds a provisioner (None).

    Each site config gets a ``policy`` (:class:`~secure_fl.transport.config.SitePolicy`): it
    accepts only ``protocol`` (``plain`` explicitly allowed when that is the protocol), requires
    the active variant unless ``active`` is false (the semi-honest variant, by name), assumes
    ``corrupt_fraction`` and ``dropout_rate`` as the server does, and pins the vector length of
    the model (``model_shapes``).

    ``unet``: every site's task trains the 3D-UNet on its own datalist (:class:`UNetTask`), and
    the server's ``model.path`` is ``server/initial_model.tensors`` (written here); the pinned
    vector length is then that model's parameter count (``model_shapes`` is ignored).

    ``privacy``: site-level DP over gRPC (:mod:`secure_fl.transport.privacy`): the server config
    gets the ``privacy`` section (its ``state_dir`` becomes an auditable run folder) and every
    site a privacy floor
    (:func:`secure_fl.transport.provision_privacy.privacy_floor`: with trust ``distributed`` it requires the
    sites' noise, at least the multiplier the target calls for; the server's ``min_sites`` is
    then every site, so that the noise threshold always holds).

    Errors: ConfigError for invalid or duplicate site names, fewer than 2 sites, an unknown
    protocol, privacy the server cannot serve (not site level, or not over SecAgg / SecAgg+),
    a directory that already holds a federation, ``ckks=True`` without TenSEAL, a site
    without a datalist, or ``unet`` without torch and MONAI.
    """
    root = Path(directory)
    names = list(sites)
    if len(names) < 2:
        raise ConfigError(f"--sites must name at least 2 sites, got {len(names)}")
    if len(set(names)) != len(names):
        raise ConfigError("--sites must not repeat a name")
    for name in [*names, server_name]:
        if not valid_name(name):
            raise ConfigError(f"name {name!r} must match [A-Za-z0-9._-]{{1,64}}")
    if server_name in names:
        raise ConfigError(f"a site may not be named like the server ({server_name!r})")
    if protocol not in AGGREGATIONS:
        raise ConfigError(f"protocol must be one of {AGGREGATIONS}, got {protocol!r}")
    AggregationSettings(
        protocol=protocol,
        dropout_rate=dropout_rate,
        corrupt_fraction=corrupt_fraction,
        active=active,
    )
    remote: Any = None
    if unet is not None:
        for name in names:
            unet.site_task(name, rounds)  # every site has a datalist, before anything is written
        remote = _unet_remote()
        initial = remote.initial_model(unet.channels, unet.seed)
        model_shapes = [tuple(int(d) for d in v.shape) for v in initial.values()]
    vector_length = sum(math.prod(shape) for shape in model_shapes)
    floor: dict[str, Any] = {}
    if privacy is not None:
        from secure_fl.transport.provision_privacy import privacy_floor

        floor = privacy_floor(privacy, protocol, rounds)
    site_policy = SitePolicy(
        aggregations=(protocol,),
        allow_plain=protocol == "plain",
        require_active=active,
        corrupt_fraction=corrupt_fraction,
        dropout_rate=dropout_rate,
        vector_length=vector_length,
        **floor,
    )
    fed = federation or root.resolve().name or "federation"
    if not valid_name(fed):
        raise ConfigError(f"federation name {fed!r} must match [A-Za-z0-9._-]{{1,64}}")
    if (root / "ca" / "ca.key").exists() or (root / "roster.json").exists():
        raise ConfigError(f"{root} already holds a federation; refusing to overwrite it")

    root.mkdir(parents=True, exist_ok=True)
    ca_dir, server_dir, sites_dir = root / "ca", root / "server", root / "sites"
    for d in (ca_dir, server_dir, sites_dir):
        _mkdir_private(d)
    ca_cert, ca_key = new_ca(fed, days=max(days, 3650))
    ca_pem = _cert_pem(ca_cert)
    write_private(ca_dir / "ca.key", _key_pem(ca_key))
    _write_public(ca_dir / "ca.crt", ca_pem)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        subject=_name(server_name, fed),
        public_key=server_key.public_key(),
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        days=days,
        ca=False,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=_host_names([server_name, *server_hosts]),
    )
    write_private(server_dir / "server.key", _key_pem(server_key))
    _write_public(server_dir / "server.crt", _cert_pem(server_cert))
    _write_public(server_dir / "ca.crt", ca_pem)

    roster: list[dict[str, Any]] = []
    for site_id, name in enumerate(names, start=1):
        site_dir = sites_dir / name
        _mkdir_private(site_dir)
        cert_pem, key_pem = issue_site_certificate(ca_cert, ca_key, name, fed, days=days)
        write_private(site_dir / "site.key", key_pem)
        _write_public(site_dir / "site.crt", cert_pem)
        _write_public(site_dir / "ca.crt", ca_pem)
        signing = Ed25519PrivateKey.generate()
        write_private(site_dir / "signing.key", _key_pem(signing))
        roster.append(
            {
                "name": name,
                "site_id": site_id,
                "cert_sha256": cert_fingerprint(x509.load_pem_x509_certificate(cert_pem)),
                "verify_key": SigningKey(signing).public_bytes.hex(),
            }
        )
    (root / "roster.json").write_text(json.dumps({"roster": roster}, indent=2) + "\n")

    ckks_note = "not provisioned"
    server_ckks: dict[str, str] | None = None
    site_ckks: dict[str, str] | None = None
    provisioner = ckks_provisioner() if ckks is not False else None
    if ckks and provisioner is None:
        raise ConfigError("CKKS keys need secure_fl.he and TenSEAL: pip install tenseal==0.3.18")
    if provisioner is not None:
        ckks_dir = root / "ckks"
        _mkdir_private(ckks_dir)
        made = provisioner(ckks_dir)
        secret = Path(made.secret_path).read_bytes()
        _write_public(server_dir / "ckks-public.ctx", Path(made.public_path).read_bytes())
        for name in names:
            write_private(sites_dir / name / "ckks-secret.ctx", secret)
        server_ckks = {"context": "ckks-public.ctx", "fingerprint": made.fingerprint}
        site_ckks = {"context": "ckks-secret.ctx", "fingerprint": made.fingerprint}
        ckks_note = f"fingerprint {made.fingerprint[:16]}..., artefacts in {ckks_dir}"

    model_section: dict[str, Any] = {"shapes": [list(shape) for shape in model_shapes]}
    if unet is not None:
        remote.write_initial_model(server_dir / INITIAL_MODEL, unet.channels, unet.seed)
        model_section = {"path": INITIAL_MODEL}
    tls = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}
    server_config = {
        "federation": fed,
        "listen": listen,
        "tls": tls,
        "roster": roster,
        "state_dir": "state",
        "rounds": rounds,
        "min_sites": len(names) if floor.get("require_dp") else 2,
        "aggregation": {
            "protocol": protocol,
            "clip_range": 10.0,
            "dropout_rate": dropout_rate,
            "corrupt_fraction": corrupt_fraction,
            "active": active,
        },
        "model": model_section,
        "deadlines": {"update_s": 3600.0, "phase_s": 120.0, "wait_for_sites_s": 120.0},
        "limits": {},
    }
    if server_ckks is not None:
        server_config["ckks"] = server_ckks
    if privacy is not None:
        server_config["privacy"] = privacy.to_dict()
    server_path = server_dir / "server.json"
    server_path.write_text(json.dumps(server_config, indent=2) + "\n")
    site_paths: dict[str, Path] = {}
    for name in names:
        site_config = {
            "federation": fed,
            "name": name,
            "server": listen,
            "server_name": server_name,
            "tls": {"ca": "ca.crt", "cert": "site.crt", "key": "site.key"},
            "signing_key": "signing.key",
            "roster": roster,
            "state_dir": "state",
            "output_model": "final_model.tensors",
            "task": (
                unet.site_task(name, rounds)
                if unet is not None
                else {"kind": "synthetic", "options": {}}
            ),
            "policy": policy_to_json(site_policy),
        }
        if site_ckks is not None:
            site_config["ckks"] = site_ckks
        path = sites_dir / name / "site.json"
        path.write_text(json.dumps(site_config, indent=2) + "\n")
        site_paths[name] = path
    return Provisioned(
        root=root, server_config=server_path, site_configs=site_paths, ckks=ckks_note
    )


__all__ = [
    "DEFAULT_SERVER_NAME",
    "INITIAL_MODEL",
    "UNET_FACTORY",
    "Provisioned",
    "RotatedCkks",
    "UNetTask",
    "ckks_provisioner",
    "issue_site_certificate",
    "load_signing_key",
    "new_ca",
    "provision",
    "rotate_ckks",
    "site_datalists",
    "write_private",
]
