"""CKKS contexts: provisioning, loading, fingerprints and secret hygiene.

Two artefacts per federation, written by :func:`provision` (or made in process for a simulation):

* the **secret context** (:class:`SecretContext`), held by every site: parameters and the one
  secret key. It encrypts (symmetric RLWE encryption: no public key exists, so nobody without the
  secret key can even encrypt) and decrypts the aggregate.
* the **public context** (:class:`PublicContext`), held by the server: parameters only. It can
  deserialise and add ciphertexts, nothing else.

Both carry the same **fingerprint**: SHA-256 over the preset's parameters, SEAL's parameter id
(a hash of the exact primes) and a key id derived from the secret key. Parties compare fingerprints,
so mixed keys or parameters fail loudly instead of decrypting to garbage. The artefact format,
the fingerprint and the file I/O are in :mod:`secure_fl.he.artefact`.

Artefact format (version 1), every field big-endian::

    b"SFLCKKSC" | version u8 = 1 | kind u8 (1 secret, 2 public) | header length u32 | header JSON
    | body length u64 | body (TenSEAL context) | SHA-256 of everything before

The header JSON holds ``format``, ``kind``, ``preset``, ``key_id`` and ``fingerprint``.

Secret hygiene: a :class:`SecretContext` cannot be pickled or copied (``TypeError``), its repr shows
only the preset name and the fingerprint, and no error message or log line quotes key material.
:meth:`SecretContext.save` writes with mode 0600 (atomically, refusing to overwrite unless asked),
and :meth:`SecretContext.load` refuses a file that other users can read.
"""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from secure_fl.crypto.hygiene import NoPickle
from secure_fl.errors import ConfigError, CryptoError
from secure_fl.he.artefact import (
    _FORMAT,
    _KIND_PUBLIC,
    _KIND_SECRET,
    PathLike,
    _check_parameters,
    _decode_artefact,
    _encode_artefact,
    _fingerprint,
    _key_id,
    _load_tenseal,
    _parms_id,
    _public_bytes,
    _read,
    _secret_bytes,
    _write,
    check_fingerprint,
    tenseal,
)
from secure_fl.he.params import CKKSPreset, get_preset

#: File names that :func:`provision` writes.
SECRET_FILE: Final = "ckks-secret.ctx"  # noqa: S105 - a file name, not a password
PUBLIC_FILE: Final = "ckks-public.ctx"


class SecretContext(NoPickle):
    """A site's CKKS context: the preset's parameters and the federation's secret key.

    Build one with :meth:`generate` (simulation, or the provisioner), :meth:`load` or
    :meth:`from_bytes`. It cannot be pickled or copied, and its repr shows only the fingerprint.

    Errors: ConfigError for invalid presets, artefacts or fingerprint mismatches; CryptoError if
    TenSEAL fails to generate keys.
    """

    _no_pickle_message = (
        "SecretContext holds the CKKS secret key and cannot be pickled or copied; "
        "use save() (mode 0600) or to_bytes() deliberately"
    )

    __slots__ = ("_ctx", "_fingerprint", "_key_id", "_preset")

    def __init__(self, ctx: Any, preset: CKKSPreset, key_id: str, fingerprint: str) -> None:
        """Internal: use :meth:`generate`, :meth:`load` or :meth:`from_bytes`."""
        self._ctx = ctx
        self._preset = preset
        self._key_id = key_id
        self._fingerprint = fingerprint

    @classmethod
    def generate(cls, preset: str | CKKSPreset | None = None) -> SecretContext:
        """Create fresh parameters and a fresh secret key for ``preset`` (default ``n8192-add``)."""
        params = get_preset(preset)
        ts = tenseal()
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
                n_threads=1,
            )
            ctx.global_scale = params.scale
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CryptoError(f"TenSEAL refused preset {params.name!r}: {exc}") from exc
        _check_parameters(ctx, params)
        key_id = _key_id(_secret_bytes(ctx))
        return cls(ctx, params, key_id, _fingerprint(params, _parms_id(ctx), key_id))

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_fingerprint: str | None = None) -> SecretContext:
        """Load a secret artefact produced by :meth:`to_bytes`.

        Errors: ConfigError when the artefact is corrupted, is a public artefact, holds no secret
        key, does not match its preset or its own key id, or has another fingerprint than
        ``expected_fingerprint``.
        """
        header, body = _decode_artefact(data, _KIND_SECRET)
        preset = CKKSPreset.from_dict(header.get("preset", {}))
        ctx = _load_tenseal(body)
        if not ctx.is_private():
            raise ConfigError("the secret context artefact holds no secret key")
        _check_parameters(ctx, preset)
        ctx.global_scale = preset.scale
        key_id = _key_id(_secret_bytes(ctx))
        if not hmac.compare_digest(key_id.encode(), header["key_id"].encode()):
            raise ConfigError("the secret context's key does not match the key id in its header")
        fingerprint = _fingerprint(preset, _parms_id(ctx), key_id)
        if not hmac.compare_digest(fingerprint.encode(), header["fingerprint"].encode()):
            raise ConfigError("the secret context's fingerprint does not match its header")
        check_fingerprint(fingerprint, expected_fingerprint, "the secret context")
        return cls(ctx, preset, key_id, fingerprint)

    @classmethod
    def load(cls, path: PathLike, *, expected_fingerprint: str | None = None) -> SecretContext:
        """Load the secret artefact at ``path`` (see :meth:`from_bytes`).

        Errors: as :meth:`from_bytes`; also ConfigError when the file is unreadable or, on POSIX,
        readable or writable by group or others (``chmod 600`` it).
        """
        if os.name == "posix":
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except OSError as exc:
                raise ConfigError(f"cannot read secret context {os.fspath(path)!r}: {exc}") from exc
            if mode & 0o077:
                raise ConfigError(
                    f"secret context {os.fspath(path)!r} is accessible to other users "
                    f"(mode {mode:04o}); chmod 600 it"
                )
        return cls.from_bytes(_read(path), expected_fingerprint=expected_fingerprint)

    def to_bytes(self) -> bytes:
        """The secret artefact, key included. Treat the result as the secret key itself."""
        header = {
            "format": _FORMAT,
            "kind": "secret",
            "preset": self._preset.to_dict(),
            "key_id": self._key_id,
            "fingerprint": self._fingerprint,
        }
        return _encode_artefact(_KIND_SECRET, header, _secret_bytes(self._ctx))

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the secret artefact to ``path`` with mode 0600; return the path.

        Errors: ConfigError if ``path`` exists and ``overwrite`` is false; OSError from the file
        system.
        """
        target = Path(path)
        _write(target, self.to_bytes(), 0o600, overwrite)
        return target

    def public(self) -> PublicContext:
        """The matching server context: the same parameters and fingerprint, no secret key."""
        ctx = _load_tenseal(_public_bytes(self._ctx))
        return PublicContext(ctx, self._preset, self._key_id, self._fingerprint)

    @property
    def preset(self) -> CKKSPreset:
        return self._preset

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 over parameters and key id; equal for every party of one federation."""
        return self._fingerprint

    @property
    def key_id(self) -> str:
        """A public identifier of the secret key (a domain-separated hash of it)."""
        return self._key_id

    @property
    def tenseal_context(self) -> Any:
        """The wrapped ``tenseal.Context`` (holds the secret key: never send or log it)."""
        return self._ctx

    def __repr__(self) -> str:
        return f"SecretContext(preset={self._preset.name!r}, fingerprint={self._fingerprint[:16]})"


class PublicContext:
    """The server's CKKS context: parameters only; it can add ciphertexts, never decrypt.

    Errors: ConfigError whenever a context holding a secret key is offered (a server holding the
    secret key could read every site's update), and for corrupted artefacts or fingerprint
    mismatches.
    """

    __slots__ = ("_ctx", "_fingerprint", "_key_id", "_preset")

    def __init__(self, ctx: Any, preset: CKKSPreset, key_id: str, fingerprint: str) -> None:
        """Internal: use :meth:`SecretContext.public`, :meth:`load` or :meth:`from_bytes`."""
        if ctx.is_private() or ctx.has_secret_key():
            raise ConfigError(
                "the server context holds a secret key: a server holding it could read every "
                "site's update; give the server the public context (SecretContext.public() or "
                "the public artefact)"
            )
        self._ctx = ctx
        self._preset = preset
        self._key_id = key_id
        self._fingerprint = fingerprint

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_fingerprint: str | None = None) -> PublicContext:
        """Load a public artefact produced by :meth:`to_bytes`.

        Errors: ConfigError when the artefact is the secret one or its TenSEAL body holds a secret
        key, is corrupted, does not match its preset or header, or has another fingerprint than
        ``expected_fingerprint``.
        """
        header, body = _decode_artefact(data, _KIND_PUBLIC)
        preset = CKKSPreset.from_dict(header.get("preset", {}))
        ctx = _load_tenseal(body)
        _check_parameters(ctx, preset)
        key_id = header["key_id"]
        fingerprint = _fingerprint(preset, _parms_id(ctx), key_id)
        if not hmac.compare_digest(fingerprint.encode(), header["fingerprint"].encode()):
            raise ConfigError("the public context's fingerprint does not match its header")
        check_fingerprint(fingerprint, expected_fingerprint, "the server's public context")
        return cls(ctx, preset, key_id, fingerprint)

    @classmethod
    def load(cls, path: PathLike, *, expected_fingerprint: str | None = None) -> PublicContext:
        """Load the public artefact at ``path`` (see :meth:`from_bytes`)."""
        return cls.from_bytes(_read(path), expected_fingerprint=expected_fingerprint)

    def to_bytes(self) -> bytes:
        header = {
            "format": _FORMAT,
            "kind": "public",
            "preset": self._preset.to_dict(),
            "key_id": self._key_id,
            "fingerprint": self._fingerprint,
        }
        return _encode_artefact(_KIND_PUBLIC, header, _public_bytes(self._ctx))

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the public artefact to ``path`` with mode 0644; return the path."""
        target = Path(path)
        _write(target, self.to_bytes(), 0o644, overwrite)
        return target

    @property
    def preset(self) -> CKKSPreset:
        return self._preset

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def tenseal_context(self) -> Any:
        """The wrapped ``tenseal.Context`` (no secret key)."""
        return self._ctx

    def __repr__(self) -> str:
        return f"PublicContext(preset={self._preset.name!r}, fingerprint={self._fingerprint[:16]})"

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (PublicContext.from_bytes, (self.to_bytes(),))


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` wrote: the two artefacts and the federation's fingerprint."""

    secret_path: Path
    public_path: Path
    fingerprint: str
    preset: CKKSPreset


def provision(
    directory: PathLike, preset: str | CKKSPreset | None = None, *, overwrite: bool = False
) -> Provisioned:
    """Generate one federation's keys and write both artefacts into ``directory``.

    Writes ``ckks-secret.ctx`` (mode 0600: copy it to every site over a secure channel, never to
    the server) and ``ckks-public.ctx`` (mode 0644: for the server). The returned fingerprint is
    what every party checks (``expected_fingerprint``).

    Errors: ConfigError for an unknown preset or when a file exists and ``overwrite`` is false.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (SECRET_FILE, PUBLIC_FILE):
        if (folder / name).exists() and not overwrite:
            raise ConfigError(f"{folder / name} exists; pass overwrite=True to replace it")
    secret = SecretContext.generate(preset)
    secret_path = secret.save(folder / SECRET_FILE, overwrite=overwrite)
    public_path = secret.public().save(folder / PUBLIC_FILE, overwrite=overwrite)
    return Provisioned(secret_path, public_path, secret.fingerprint, secret.preset)


__all__ = [
    "PUBLIC_FILE",
    "SECRET_FILE",
    "PathLike",
    "Provisioned",
    "PublicContext",
    "SecretContext",
    "check_fingerprint",
    "provision",
    "tenseal",
]
