"""CKKS contexts: provisioning, artefacts, fingerprints, and the hygiene of the secret one."""

from __future__ import annotations

import copy
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest

from secure_fl.errors import ConfigError, SecureFLError
from secure_fl.he import (
    PUBLIC_FILE,
    SECRET_FILE,
    PublicContext,
    SecretContext,
    check_fingerprint,
    get_preset,
    provision,
)


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()


def test_generate_public_and_fingerprints(secret: SecretContext) -> None:
    public = secret.public()
    assert secret.tenseal_context.is_private()
    assert not public.tenseal_context.is_private()
    assert not public.tenseal_context.has_secret_key()
    assert public.fingerprint == secret.fingerprint
    assert len(secret.fingerprint) == 64 and int(secret.fingerprint, 16) >= 0
    assert public.preset == secret.preset == get_preset()
    # another key with the same parameters is another federation
    other = SecretContext.generate()
    assert other.fingerprint != secret.fingerprint
    assert other.key_id != secret.key_id


def test_fingerprint_depends_on_parameters() -> None:
    a = SecretContext.generate("n8192-add")
    b = SecretContext.generate("n16384-add")
    assert a.fingerprint != b.fingerprint
    assert b.preset.slots == 8192


def test_secret_context_refuses_pickle_and_copy_and_hides_in_repr(secret: SecretContext) -> None:
    for attempt in (
        lambda: pickle.dumps(secret),
        lambda: pickle.dumps([secret], protocol=2),
        lambda: copy.copy(secret),
        lambda: copy.deepcopy({"k": secret}),
    ):
        with pytest.raises(TypeError, match="secret key"):
            attempt()
    text = repr(secret)
    assert text == f"SecretContext(preset='n8192-add', fingerprint={secret.fingerprint[:16]})"
    assert str(secret) == text
    assert not hasattr(secret, "__dict__")  # nothing for vars() or a debugger dump to print


def test_public_context_pickles_and_round_trips(secret: SecretContext) -> None:
    public = secret.public()
    clone = pickle.loads(pickle.dumps(public))
    assert isinstance(clone, PublicContext)
    assert clone.fingerprint == public.fingerprint
    assert PublicContext.from_bytes(public.to_bytes()).fingerprint == public.fingerprint


def test_secret_round_trip_keeps_the_key(secret: SecretContext) -> None:
    import tenseal as ts

    loaded = SecretContext.from_bytes(secret.to_bytes(), expected_fingerprint=secret.fingerprint)
    assert loaded.fingerprint == secret.fingerprint
    values = np.linspace(-1, 1, 100)
    blob = ts.ckks_vector(secret.tenseal_context, values.tolist()).serialize()
    decrypted = ts.ckks_vector_from(loaded.tenseal_context, blob).decrypt()
    np.testing.assert_allclose(decrypted, values, atol=1e-9)


def test_provision_writes_0600_secret_and_0644_public(tmp_path: Path) -> None:
    done = provision(tmp_path / "keys", "n8192-add")
    assert done.secret_path == tmp_path / "keys" / SECRET_FILE
    assert done.public_path == tmp_path / "keys" / PUBLIC_FILE
    assert stat.S_IMODE(os.stat(done.secret_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(done.public_path).st_mode) & 0o077 in (0o044, 0o004, 0o040, 0)
    site = SecretContext.load(done.secret_path, expected_fingerprint=done.fingerprint)
    server = PublicContext.load(done.public_path, expected_fingerprint=done.fingerprint)
    assert site.fingerprint == server.fingerprint == done.fingerprint
    assert not server.tenseal_context.is_private()
    # no leftovers from the atomic write
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        [SECRET_FILE, PUBLIC_FILE]
    )
    with pytest.raises(ConfigError, match="exists"):
        provision(tmp_path / "keys")
    again = provision(tmp_path / "keys", overwrite=True)
    assert again.fingerprint != done.fingerprint


def test_secret_file_readable_by_others_is_refused(tmp_path: Path, secret: SecretContext) -> None:
    path = secret.save(tmp_path / "s.ctx")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SecretContext.load(path)
    os.chmod(path, 0o600)
    assert SecretContext.load(path).fingerprint == secret.fingerprint


def test_server_refuses_the_secret_artefact(tmp_path: Path, secret: SecretContext) -> None:
    path = secret.save(tmp_path / "s.ctx")
    with pytest.raises(ConfigError, match="could read every site's update"):
        PublicContext.load(path)
    with pytest.raises(ConfigError, match="could read every site's update"):
        PublicContext.from_bytes(secret.to_bytes())
    # a PublicContext can never wrap a TenSEAL context that holds the secret key
    with pytest.raises(ConfigError, match="secret key"):
        PublicContext(secret.tenseal_context, secret.preset, secret.key_id, secret.fingerprint)


def test_site_refuses_the_public_artefact(secret: SecretContext) -> None:
    with pytest.raises(ConfigError, match="sites need the secret one"):
        SecretContext.from_bytes(secret.public().to_bytes())


def test_mismatched_fingerprint_is_refused(tmp_path: Path, secret: SecretContext) -> None:
    other = SecretContext.generate()
    with pytest.raises(ConfigError, match="not the federation's"):
        SecretContext.from_bytes(other.to_bytes(), expected_fingerprint=secret.fingerprint)
    with pytest.raises(ConfigError, match="not the federation's"):
        PublicContext.from_bytes(other.public().to_bytes(), expected_fingerprint=secret.fingerprint)
    check_fingerprint(secret.fingerprint, secret.fingerprint.upper(), "x")
    check_fingerprint(secret.fingerprint, None, "x")


@pytest.mark.parametrize("position", [0, 9, 40, 200, 5000, -40, -1])
def test_corrupted_artefacts_are_refused(secret: SecretContext, position: int) -> None:
    for blob, loader in (
        (secret.to_bytes(), SecretContext.from_bytes),
        (secret.public().to_bytes(), PublicContext.from_bytes),
    ):
        bad = bytearray(blob)
        bad[position % len(blob)] ^= 0x10
        with pytest.raises(ConfigError):
            loader(bytes(bad))
        with pytest.raises(ConfigError):
            loader(blob[: len(blob) // 2])


def test_tampered_header_with_recomputed_digest_is_refused(secret: SecretContext) -> None:
    import hashlib

    blob = secret.public().to_bytes()
    # claim another key id: the recomputed fingerprint no longer matches the header's
    old = secret.key_id.encode()
    new = (("0" if old[:1] != b"0" else "1") + secret.key_id[1:]).encode()
    body = blob[:-32].replace(old, new)
    with pytest.raises(ConfigError, match="fingerprint"):
        PublicContext.from_bytes(body + hashlib.sha256(body).digest())
    blob = secret.to_bytes()
    body = blob[:-32].replace(old, new)
    with pytest.raises(ConfigError, match="key id"):
        SecretContext.from_bytes(body + hashlib.sha256(body).digest())


@pytest.mark.parametrize("junk", [b"", b"SFLCKKSC", b"x" * 100, "text"])
def test_junk_is_refused_with_a_library_error(junk: object) -> None:
    for loader in (SecretContext.from_bytes, PublicContext.from_bytes):
        with pytest.raises(SecureFLError):
            loader(junk)  # type: ignore[arg-type]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SecretContext.load(tmp_path / "nope")
    with pytest.raises(ConfigError):
        PublicContext.load(tmp_path / "nope")
