"""Bytes for every round message, so that any transport can carry a round.

``encode(message) -> bytes`` and ``decode(data) -> message`` for every message of
:mod:`secure_fl.secagg.messages` and :mod:`secure_fl.rounds.messages`. A frame is
``b"SFR" | version (1 byte) | tag (1 byte) | body``. The SecAgg phase messages' bodies are the
protobuf messages of ``protocols/federation.proto`` (the conversions of
:mod:`secure_fl.rounds.protobuf`, shared with the gRPC transport); vectors are raw little-endian
arrays behind a fixed header; the small setups of the plain and CKKS rounds are canonical JSON
(floats round-trip exactly). Other rounds (e.g. :mod:`secure_fl.rounds.ckks`) may add message
types with :func:`register` (tags 64-255).

Decoding checks structure (lengths, types, duplicates, integer ranges, and finite numbers:
weights finite and > 0, ``l2_clip`` None or finite and > 0); the round halves check meaning.
A JSON body is refused before parsing when it is longer than :data:`MAX_JSON_BYTES` or nested
deeper than its message allows. A site-to-server message's ``sender`` is what the message
claims: the server half compares it with the authenticated peer.
Errors: RemoteProtocolError for any malformed frame, whatever failed inside (no other
exception escapes :func:`decode`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.rounds import protobuf as wire
from secure_fl.rounds.messages import (
    CkksResult,
    CkksSetup,
    CkksUpload,
    Message,
    PlainSetup,
    PlainUpload,
    SecAggSetup,
)
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    RevealNonce,
    RevealSet,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.errors import RejectedError

MAGIC = b"SFR"
VERSION = 1
#: The most entries a decoded message may list (sites, shares, ciphertexts).
MAX_ENTRIES = 1 << 16
#: The longest JSON body (plain and CKKS setups) decoded; longer ones are refused unparsed.
MAX_JSON_BYTES = 8 << 20
#: The deepest nesting of a JSON body: object -> weights list -> [site, weight] pair.
MAX_JSON_DEPTH = 3
_HEADER = len(MAGIC) + 2
_VECTOR = struct.Struct("<QIBQ")  # round_id, sender, bits (or clipped flag), length

Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes], Any]
_BY_TYPE: dict[type, tuple[int, Encoder]] = {}
_BY_TAG: dict[int, tuple[type, Decoder]] = {}


def register(cls: type, tag: int, encode_body: Encoder, decode_body: Decoder) -> None:
    """Make ``cls`` encodable under ``tag`` (64-255 for extensions; 1-63 are this module's).
    ``decode_body`` must raise RemoteProtocolError (or ValueError/TypeError/KeyError, which are
    wrapped) on malformed input. Errors: ConfigError when the tag or the type is taken."""
    if not isinstance(tag, int) or not 1 <= tag <= 255:
        raise ConfigError(f"tag must be an integer in [1, 255], got {tag!r}")
    if tag in _BY_TAG or cls in _BY_TYPE:
        raise ConfigError(f"tag {tag} or type {cls.__name__} is already registered")
    _BY_TYPE[cls] = (tag, encode_body)
    _BY_TAG[tag] = (cls, decode_body)


def encode(message: Message) -> bytes:
    """The frame of ``message``. Errors: ConfigError for a type no round defines."""
    entry = _BY_TYPE.get(type(message))
    if entry is None:
        raise ConfigError(f"no codec for {type(message).__name__}")
    tag, body = entry
    return MAGIC + bytes((VERSION, tag)) + body(message)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message of a frame made by :func:`encode`.
    Errors: RemoteProtocolError for a malformed, truncated or unknown frame."""
    raw = bytes(data)
    if len(raw) < _HEADER or raw[:3] != MAGIC:
        raise RemoteProtocolError("not a round message frame")
    if raw[3] != VERSION:
        raise RemoteProtocolError(f"round message frame version {raw[3]}, expected {VERSION}")
    entry = _BY_TAG.get(raw[4])
    if entry is None:
        raise RemoteProtocolError(f"unknown round message tag {raw[4]}")
    cls, body = entry
    try:
        message = body(raw[_HEADER:])
    except RemoteProtocolError:
        raise
    except RejectedError as exc:
        raise RemoteProtocolError(f"malformed {cls.__name__}: {exc.message}") from exc
    except (DecodeError, ValueError, TypeError, KeyError, struct.error, ConfigError) as exc:
        raise RemoteProtocolError(f"malformed {cls.__name__}: {exc}") from exc
    except Exception as exc:  # RecursionError, OverflowError, ...: still only a bad frame
        raise RemoteProtocolError(
            f"malformed {cls.__name__}: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if not isinstance(message, cls):
        raise RemoteProtocolError(f"malformed {cls.__name__}")
    return message


# -- protobuf bodies ----------------------------------------------------------------------------


def _pb(
    pb_type: Any, to_pb: Callable[[Any], Any], from_pb: Callable[[Any], Any]
) -> tuple[Encoder, Decoder]:
    def enc(m: Any) -> bytes:
        return bytes(to_pb(m).SerializeToString())

    def dec(b: bytes) -> Any:
        return from_pb(pb_type.FromString(b))

    return enc, dec


def _claimed(from_pb: Callable[..., Any], *extra: int) -> Callable[[Any], Any]:
    # Site -> server: the sender is the message's own claim (the server half checks it).
    return lambda m: from_pb(m, int(m.sender), *extra)


# -- vector bodies ------------------------------------------------------------------------------


def _dtype(bits: int) -> np.dtype[Any]:
    if bits == 32:
        return np.dtype("<u4")
    if bits == 64:
        return np.dtype("<u8")
    raise RemoteProtocolError(f"masked input bits must be 32 or 64, got {bits}")


def _vector_body(data: bytes, dtype: np.dtype[Any]) -> tuple[int, int, int, np.ndarray]:
    round_id, sender, flag, length = _VECTOR.unpack_from(data)
    payload = data[_VECTOR.size :]
    if len(payload) != length * dtype.itemsize:
        raise RemoteProtocolError(f"vector has {len(payload)} bytes, header says {length} values")
    vector = np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="))
    return round_id, sender, flag, vector


def _enc_masked(m: MaskedInput) -> bytes:
    bits = 32 if m.vector.dtype == np.uint32 else 64
    head = _VECTOR.pack(m.round_id, m.sender, bits, m.vector.size)
    return head + bytes(wire.masked_to_bytes(m, bits))


def _dec_masked(data: bytes) -> MaskedInput:
    bits = _VECTOR.unpack_from(data)[2]
    round_id, sender, _, vector = _vector_body(data, _dtype(bits))
    return MaskedInput(round_id, sender, vector)


def _enc_plain_upload(m: PlainUpload) -> bytes:
    head = _VECTOR.pack(m.round_id, m.sender, int(m.clipped), m.vector.size)
    return head + np.ascontiguousarray(m.vector, dtype="<f8").tobytes()


def _dec_plain_upload(data: bytes) -> PlainUpload:
    round_id, sender, flag, vector = _vector_body(data, np.dtype("<f8"))
    if flag not in (0, 1):
        raise RemoteProtocolError("plain upload: clipped flag must be 0 or 1")
    return PlainUpload(round_id, sender, vector, bool(flag))


# -- setups -------------------------------------------------------------------------------------

_SETUP = struct.Struct("<Qd")  # round_id, l2_clip (NaN: none)


def _enc_secagg_setup(m: SecAggSetup) -> bytes:
    clip = math.nan if m.l2_clip is None else m.l2_clip
    return _SETUP.pack(m.round_id, clip) + bytes(wire.setup_to_pb(m).SerializeToString())


def _dec_secagg_setup(data: bytes) -> SecAggSetup:
    round_id, clip = _SETUP.unpack_from(data)
    msg = pb.SecAggSetup.FromString(data[_SETUP.size :])
    if len(msg.site_ids) > MAX_ENTRIES:
        raise RemoteProtocolError(f"setup lists more than {MAX_ENTRIES} sites")
    return wire.setup_from_pb(msg, round_id, l2_clip=None if math.isnan(clip) else clip)


def _to_json(m: Any) -> bytes:
    out: dict[str, Any] = {}
    for f in fields(m):
        value = getattr(m, f.name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        elif f.name == "weights":
            value = [[int(s), float(w)] for s, w in sorted(value.items())]
        out[f.name] = value
    return json.dumps(out, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "round_id": (int,),
    "vector_length": (int,),
    "poly_modulus_degree": (int,),
    "chunk_ciphertexts": (int,),
    "site_ids": (list,),
    "weights": (list,),
    "l2_clip": (float, type(None)),
    "scale": (float,),
    "weight": (float,),
    "phase_deadline_s": (float,),
    "context_sha256": (str,),
    "extra": (str,),
}


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_MAX_ID = (1 << 32) - 1
_MAX_INT = (1 << 63) - 1


def _json_depth(data: bytes) -> int:
    """The deepest bracket nesting of ``data`` outside string literals (linear, no recursion)."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    step = (
        (bare == ord("[")).astype(np.int64)
        + (bare == ord("{"))
        - (bare == ord("]"))
        - (bare == ord("}"))
    )
    return int(np.cumsum(step).max(initial=0))


def _finite_number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RemoteProtocolError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or (positive and number <= 0):
        raise RemoteProtocolError(
            f"{name} must be finite{' and > 0' if positive else ''}, got {str(value)[:40]}"
        )
    return number


def _json_int(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise RemoteProtocolError(f"{name} must be an integer in [0, {high}]")
    return value


def _from_json(cls: type, data: bytes) -> Any:
    where = cls.__name__
    if len(data) > MAX_JSON_BYTES:
        raise RemoteProtocolError(f"{where}: body of {len(data)} bytes, limit {MAX_JSON_BYTES}")
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise RemoteProtocolError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    obj = json.loads(data.decode("utf-8"))
    names = {f.name for f in fields(cls)}
    if not isinstance(obj, dict) or set(obj) != names:
        raise RemoteProtocolError(f"{where}: fields must be exactly {sorted(names)}")
    for name, value in obj.items():
        allowed = _JSON_TYPES[name]
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = obj[name] = _finite_number(f"{where}.{name}", value, positive=False)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise RemoteProtocolError(f"{where}.{name} has the wrong type")
        if isinstance(value, float):
            _finite_number(f"{where}.{name}", value, positive=name == "l2_clip")
        elif isinstance(value, int):
            _json_int(f"{where}.{name}", value, _MAX_INT)
    if "site_ids" in obj:
        ids = obj["site_ids"]
        if len(ids) > MAX_ENTRIES:
            raise RemoteProtocolError(f"{where}.site_ids: more than {MAX_ENTRIES} entries")
        obj["site_ids"] = tuple(_json_int(f"{where}.site_ids[]", s, _MAX_ID) for s in ids)
        if len(set(obj["site_ids"])) != len(ids):
            raise RemoteProtocolError(f"{where}.site_ids lists a site twice")
    pairs = obj["weights"]
    if len(pairs) > MAX_ENTRIES:
        raise RemoteProtocolError(f"{where}.weights: more than {MAX_ENTRIES} entries")
    weights: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise RemoteProtocolError(f"{where}.weights: each entry must be [site_id, weight]")
        site = _json_int(f"{where}.weights[].site_id", pair[0], _MAX_ID)
        weights[site] = _finite_number(f"{where}.weights[{site}]", pair[1], positive=True)
    if len(weights) != len(pairs):
        raise RemoteProtocolError(f"{where}.weights lists a site twice")
    obj["weights"] = weights
    if "context_sha256" in obj:
        obj["context_sha256"] = bytes.fromhex(obj["context_sha256"])
    return cls(**obj)


def _dec_ckks_upload(data: bytes) -> CkksUpload:
    round_id, sender = struct.unpack_from("<QI", data)
    return CkksUpload(round_id, sender, data[12:])


# -- the table ----------------------------------------------------------------------------------


def _register_builtin() -> None:
    table: list[tuple[type, int, Encoder, Decoder]] = [
        (SecAggSetup, 1, _enc_secagg_setup, _dec_secagg_setup),
        (PlainSetup, 2, _to_json, lambda b: _from_json(PlainSetup, b)),
        (PlainUpload, 3, _enc_plain_upload, _dec_plain_upload),
        (CkksSetup, 4, _to_json, lambda b: _from_json(CkksSetup, b)),
        (
            CkksUpload,
            5,
            lambda m: struct.pack("<QI", m.round_id, m.sender) + m.payload,
            _dec_ckks_upload,
        ),
        (
            CkksResult,
            6,
            lambda m: struct.pack("<Q", m.round_id) + m.payload,
            lambda b: CkksResult(struct.unpack_from("<Q", b)[0], b[8:]),
        ),
        (MaskedInput, 10, _enc_masked, _dec_masked),
    ]
    protos: list[tuple[type, int, Any, Callable[[Any], Any], Callable[[Any], Any]]] = [
        (AdvertiseKeys, 11, pb.AdvertiseKeys, wire.advert_to_pb, _claimed(wire.advert_from_pb)),
        (RevealNonce, 12, pb.RevealNonce, wire.reveal_to_pb, _claimed(wire.reveal_from_pb)),
        (
            ShareKeys,
            13,
            pb.ShareKeys,
            wire.share_keys_to_pb,
            _claimed(wire.share_keys_from_pb, MAX_ENTRIES),
        ),
        (
            ConsistencySignature,
            14,
            pb.ConsistencySignature,
            wire.signature_to_pb,
            _claimed(wire.signature_from_pb),
        ),
        (
            UnmaskResponse,
            15,
            pb.UnmaskResponse,
            wire.unmask_to_pb,
            _claimed(wire.unmask_from_pb, MAX_ENTRIES),
        ),
        (KeyRoster, 20, pb.KeyRoster, wire.roster_to_pb, wire.roster_from_pb),
        (RevealSet, 21, pb.RevealSet, wire.reveal_set_to_pb, wire.reveal_set_from_pb),
        (ShareDelivery, 22, pb.ShareDelivery, wire.delivery_to_pb, wire.delivery_from_pb),
        (
            ConsistencyRequest,
            23,
            pb.ConsistencyRequest,
            wire.consistency_to_pb,
            wire.consistency_from_pb,
        ),
        (
            UnmaskRequest,
            24,
            pb.UnmaskRequest,
            wire.unmask_request_to_pb,
            wire.unmask_request_from_pb,
        ),
    ]
    for cls, tag, enc, dec in table:
        register(cls, tag, enc, dec)
    for cls, tag, pb_type, to_pb, from_pb in protos:
        register(cls, tag, *_pb(pb_type, to_pb, from_pb))


_register_builtin()

__all__ = ["MAGIC", "MAX_ENTRIES", "VERSION", "decode", "encode", "register"]
