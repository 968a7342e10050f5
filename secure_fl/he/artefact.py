"""The CKKS context artefact (:mod:`secure_fl.he.context`): its binary format, the fingerprint and
key id, the checks of a TenSEAL context against its preset, and the file I/O.

Artefact format (version 1), every field big-endian::

    b"SFLCKKSC" | version u8 = 1 | kind u8 (1 secret, 2 public) | header length u32 | header JSON
    | body length u64 | body (TenSEAL context) | SHA-256 of everything before

No error message quotes key material. Errors: ConfigError naming what does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError
from secure_fl.he.params import CKKSPreset

_MAGIC: Final = b"SFLCKKSC"
_VERSION: Final = 1
_KIND_SECRET: Final = 1
_KIND_PUBLIC: Final = 2
_KIND_NAMES: Final = {_KIND_SECRET: "secret", _KIND_PUBLIC: "public"}
_PREFIX: Final = struct.Struct(">8sBBI")
_BODY_LEN: Final = struct.Struct(">Q")
_DIGEST_LEN: Final = 32
_FORMAT: Final = "secure_fl/ckks-context/v1"
_FINGERPRINT_DOMAIN: Final = "secure_fl/ckks/fingerprint/v1"
_KEY_ID_DOMAIN: Final = b"secure_fl/ckks/key-id/v1\x00"
_MAX_HEADER: Final = 1 << 16

PathLike = str | os.PathLike[str]


def tenseal() -> ModuleType:
    """Import TenSEAL on first use.

    Errors: ConfigError with the install command when TenSEAL is not installed.
    """
    try:
        module = importlib.import_module("tenseal")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("CKKS aggregation needs TenSEAL: pip install tenseal==0.3.18") from exc
    return module


def _fingerprint(preset: CKKSPreset, parms_id: list[int], key_id: str) -> str:
    params = preset.to_dict()
    del params["description"]
    doc = {
        "domain": _FINGERPRINT_DOMAIN,
        "preset": params,
        "parms_id": [int(w) for w in parms_id],
        "key_id": key_id,
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def check_fingerprint(actual: str, expected: str | None, what: str) -> None:
    """Raise ConfigError unless ``expected`` is None or equals ``actual``.

    ``what`` names the context in the message (for example ``"the site's secret context"``).
    """
    if expected is None:
        return
    if not isinstance(expected, str) or not hmac.compare_digest(
        actual.encode(), expected.strip().lower().encode()
    ):
        raise ConfigError(
            f"{what} has fingerprint {actual[:16]}..., not the federation's "
            f"{str(expected)[:16]}...: its parameters or key differ (mixed keys would decrypt to "
            "garbage); provision one context for the whole federation"
        )


def _parms_id(ctx: Any) -> list[int]:
    return [int(w) for w in ctx.seal_context().data.key_parms_id()]


def _check_parameters(ctx: Any, preset: CKKSPreset) -> None:
    """The TenSEAL context must have exactly the preset's ring degree and modulus sizes."""
    try:
        seal = ctx.seal_context().data
        key_level = seal.key_context_data()
        first_level = seal.first_context_data()
        degree = int(key_level.parms().poly_modulus_degree())
        total = int(key_level.total_coeff_modulus_bit_count())
        data = int(first_level.total_coeff_modulus_bit_count())
        ok = bool(seal.parameters_set())
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            "the TenSEAL context cannot be inspected: it is not a CKKS context"
        ) from exc
    if not ok or (degree, total, data) != (
        preset.poly_modulus_degree,
        preset.total_bits,
        preset.data_bits,
    ):
        raise ConfigError(
            f"the TenSEAL context (N={degree}, {total}-bit modulus, {data}-bit ciphertext level) "
            f"does not match preset {preset.name!r} (N={preset.poly_modulus_degree}, "
            f"{preset.total_bits}-bit modulus, {preset.data_bits}-bit ciphertext level)"
        )


def _secret_bytes(ctx: Any) -> bytes:
    data: bytes = ctx.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return data


def _public_bytes(ctx: Any) -> bytes:
    data: bytes = ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return data


def _key_id(secret_serialised: bytes) -> str:
    return hashlib.sha256(_KEY_ID_DOMAIN + secret_serialised).hexdigest()[:32]


def _load_tenseal(body: bytes) -> Any:
    ts = tenseal()
    try:
        return ts.context_from(body, n_threads=1)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError("the context artefact's TenSEAL body does not parse") from exc


def _encode_artefact(kind: int, header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    parts = [_PREFIX.pack(_MAGIC, _VERSION, kind, len(head)), head, _BODY_LEN.pack(len(body)), body]
    blob = b"".join(parts)
    return blob + hashlib.sha256(blob).digest()


def _decode_artefact(data: bytes, kind: int) -> tuple[dict[str, Any], bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ConfigError(f"a context artefact must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size + _BODY_LEN.size + _DIGEST_LEN or data[:8] != _MAGIC:
        raise ConfigError("not a secure_fl CKKS context artefact (bad magic or too short)")
    if not hmac.compare_digest(hashlib.sha256(data[:-_DIGEST_LEN]).digest(), data[-_DIGEST_LEN:]):
        raise ConfigError("the CKKS context artefact is corrupted (SHA-256 digest mismatch)")
    _, version, found, head_len = _PREFIX.unpack_from(data)
    if version != _VERSION:
        raise ConfigError(f"unsupported CKKS context artefact version {version}")
    if found not in _KIND_NAMES:
        raise ConfigError(f"unknown CKKS context artefact kind {found}")
    if found != kind:
        if kind == _KIND_PUBLIC:
            raise ConfigError(
                "this is the SECRET context artefact, which holds the secret key; the server must "
                "get the public artefact (a server holding the secret key could read every site's "
                "update)"
            )
        raise ConfigError("this is the public context artefact; sites need the secret one")
    offset = _PREFIX.size
    if head_len > _MAX_HEADER or offset + head_len + _BODY_LEN.size > len(data) - _DIGEST_LEN:
        raise ConfigError("the CKKS context artefact's header length is out of range")
    try:
        header = json.loads(data[offset : offset + head_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("the CKKS context artefact's header is not JSON") from exc
    offset += head_len
    (body_len,) = _BODY_LEN.unpack_from(data, offset)
    offset += _BODY_LEN.size
    if offset + body_len != len(data) - _DIGEST_LEN:
        raise ConfigError("the CKKS context artefact's body length does not match its size")
    if (
        not isinstance(header, dict)
        or header.get("format") != _FORMAT
        or header.get("kind") != _KIND_NAMES[kind]
        or not isinstance(header.get("key_id"), str)
        or not isinstance(header.get("fingerprint"), str)
    ):
        raise ConfigError("the CKKS context artefact's header is malformed")
    return header, data[offset : offset + body_len]


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write atomically with ``mode`` (never wider, from creation on); refuse to overwrite."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=True to replace it")
    atomic_write(path, data, mode=mode)


def _read(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read CKKS context artefact {os.fspath(path)!r}: {exc}") from exc
