"""Tests for secure_fl.crypto.aead: GCM known answers, round trip, tampering, AD binding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_fl.crypto import NONCE_SIZE, OVERHEAD, TAG_SIZE, ShareAD, open_sealed, seal
from secure_fl.crypto.aead import _seal_with_nonce
from secure_fl.errors import ConfigError, DecryptionError, InvalidKeyError

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "gcm_aes256.json").read_text()
)["cases"]

KEY = bytes(range(32))
AD = ShareAD(protocol="secagg-semi-honest", round_id=7, sender=3, receiver=11)


def test_constants() -> None:
    assert (NONCE_SIZE, TAG_SIZE, OVERHEAD) == (12, 16, 28)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_gcm_known_answer(case: dict[str, Any]) -> None:
    key, iv = bytes.fromhex(case["key"]), bytes.fromhex(case["iv"])
    pt, aad = bytes.fromhex(case["plaintext"]), bytes.fromhex(case["aad"])
    sealed = _seal_with_nonce(key, iv, pt, aad)
    assert sealed == iv + bytes.fromhex(case["ciphertext"]) + bytes.fromhex(case["tag"])
    assert open_sealed(key, sealed, aad) == pt


def test_gcm_known_answer_tampered_aad_fails() -> None:
    case = CASES[3]
    assert case["aad"]
    key, iv = bytes.fromhex(case["key"]), bytes.fromhex(case["iv"])
    sealed = iv + bytes.fromhex(case["ciphertext"]) + bytes.fromhex(case["tag"])
    with pytest.raises(DecryptionError):
        open_sealed(key, sealed, bytes.fromhex(case["aad"])[:-1])


def test_round_trip_and_layout() -> None:
    msg = b"a shamir share of the mask key"
    sealed = seal(KEY, msg, AD)
    assert len(sealed) == len(msg) + OVERHEAD
    assert open_sealed(KEY, sealed, AD) == msg
    assert open_sealed(KEY, sealed, ShareAD("secagg-semi-honest", 7, 3, 11)) == msg
    # The layout is nonce || ciphertext || tag, reproducible from the nonce.
    assert _seal_with_nonce(KEY, sealed[:NONCE_SIZE], msg, AD.encode()) == sealed


@given(msg=st.binary(max_size=300), ad=st.binary(max_size=64))
def test_round_trip_property(msg: bytes, ad: bytes) -> None:
    assert open_sealed(KEY, seal(KEY, msg, ad), ad) == msg


def test_fresh_nonce_each_call() -> None:
    nonces = {seal(KEY, b"m", AD)[:NONCE_SIZE] for _ in range(64)}
    assert len(nonces) == 64


def test_every_bit_flip_is_detected() -> None:
    sealed = seal(KEY, b"0123456789abcdef", AD)
    for i in range(len(sealed)):
        for bit in range(8):
            tampered = bytearray(sealed)
            tampered[i] ^= 1 << bit
            with pytest.raises(DecryptionError):
                open_sealed(KEY, bytes(tampered), AD)


@pytest.mark.parametrize("length", [0, 1, NONCE_SIZE, OVERHEAD - 1])
def test_too_short(length: int) -> None:
    with pytest.raises(DecryptionError):
        open_sealed(KEY, bytes(length), AD)


def test_truncated_or_extended() -> None:
    sealed = seal(KEY, b"payload", AD)
    for bad in (sealed[:-1], sealed + b"\x00", sealed[:OVERHEAD]):
        with pytest.raises(DecryptionError):
            open_sealed(KEY, bad, AD)


def test_empty_plaintext() -> None:
    sealed = seal(KEY, b"", AD)
    assert len(sealed) == OVERHEAD
    assert open_sealed(KEY, sealed, AD) == b""


@pytest.mark.parametrize(
    "other",
    [
        dataclasses.replace(AD, round_id=8),
        dataclasses.replace(AD, receiver=12),
        dataclasses.replace(AD, sender=4),
        dataclasses.replace(AD, protocol="secagg-malicious"),
        ShareAD(protocol=AD.protocol, round_id=AD.round_id, sender=11, receiver=3),
    ],
    ids=["round", "receiver", "sender", "protocol", "swapped"],
)
def test_wrong_ad_fields(other: ShareAD) -> None:
    sealed = seal(KEY, b"share", AD)
    with pytest.raises(DecryptionError):
        open_sealed(KEY, sealed, other)


def test_share_ad_vs_its_raw_encoding() -> None:
    sealed = seal(KEY, b"share", AD)
    assert open_sealed(KEY, sealed, AD.encode()) == b"share"
    with pytest.raises(DecryptionError):
        open_sealed(KEY, sealed, b"")


def test_wrong_key() -> None:
    sealed = seal(KEY, b"share", AD)
    other = bytearray(KEY)
    other[0] ^= 1
    with pytest.raises(DecryptionError):
        open_sealed(bytes(other), sealed, AD)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33])
def test_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(InvalidKeyError, match="32 bytes"):
        seal(bytes(size), b"m", AD)
    with pytest.raises(InvalidKeyError, match="32 bytes"):
        open_sealed(bytes(size), bytes(64), AD)


def test_bad_types() -> None:
    with pytest.raises(ConfigError, match="ad"):
        seal(KEY, b"m", "ad")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="plaintext"):
        seal(KEY, "m", AD)  # type: ignore[arg-type]


def test_share_ad_encoding_unambiguous() -> None:
    enc = AD.encode()
    assert enc.startswith(b"secure_fl/share/v1")
    variants = {
        AD.encode(),
        ShareAD("secagg-semi-honest", 7, 3, 12).encode(),
        ShareAD("secagg-semi-honest\x00", 7, 3, 11).encode(),
        ShareAD("secagg-semi-hones", 7, 3, 11).encode(),
        ShareAD("a", 1, 2, 3).encode(),
        ShareAD("a", 1 << 8, 2, 3).encode(),
        ShareAD("a", 0, 2**64 - 1, 0).encode(),
    }
    assert len(variants) == 7
    assert len(ShareAD("a", 0, 1, 2).encode()) == len(b"secure_fl/share/v1") + 4 + 1 + 24


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"round_id": -1}, "round_id"),
        ({"round_id": 2**64}, "round_id"),
        ({"sender": -1}, "sender"),
        ({"sender": 2**64}, "sender"),
        ({"receiver": 2**64}, "receiver"),
        ({"receiver": 3}, "receiver"),
        ({"round_id": 1.0}, "round_id"),
        ({"sender": True}, "sender"),
        ({"protocol": ""}, "protocol"),
        ({"protocol": b"x"}, "protocol"),
    ],
)
def test_share_ad_validation(kwargs: dict[str, Any], field: str) -> None:
    fields = {"protocol": "p", "round_id": 0, "sender": 3, "receiver": 4}
    fields.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        ShareAD(**fields)


def test_share_ad_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        AD.round_id = 8  # type: ignore[misc]
