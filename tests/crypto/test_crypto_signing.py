"""Tests for secure_fl.crypto.signing against RFC 8032 section 7.1."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from secure_fl.crypto import DeterministicRandom, SigningKey, verify
from secure_fl.errors import ConfigError, InvalidKeyError, SignatureError

CASES: list[dict[str, str]] = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "rfc8032_ed25519.json").read_text()
)["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_rfc8032_vectors(case: dict[str, str]) -> None:
    key = SigningKey.from_private_bytes(bytes.fromhex(case["secret_key"]))
    message = bytes.fromhex(case["message"])
    assert key.public_bytes.hex() == case["public_key"]
    signature = key.sign(message)
    assert signature.hex() == case["signature"]
    verify(bytes.fromhex(case["public_key"]), bytes.fromhex(case["signature"]), message)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tampered_signature_rejected(case: dict[str, str]) -> None:
    public = bytes.fromhex(case["public_key"])
    message = bytes.fromhex(case["message"])
    signature = bytes.fromhex(case["signature"])
    for i in range(len(signature)):
        for bit in (0, 5, 7):
            bad = bytearray(signature)
            bad[i] ^= 1 << bit
            with pytest.raises(SignatureError):
                verify(public, bytes(bad), message)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tampered_message_rejected(case: dict[str, str]) -> None:
    public = bytes.fromhex(case["public_key"])
    message = bytes.fromhex(case["message"])
    signature = bytes.fromhex(case["signature"])
    for bad in (message + b"\x00", b"\x73" if message == b"\x72" else b"\x00", message[:-1]):
        if bad == message:
            continue
        with pytest.raises(SignatureError):
            verify(public, signature, bad)


def test_wrong_public_key_rejected() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    sig = a.sign(b"msg")
    verify(a.public_bytes, sig, b"msg")
    with pytest.raises(SignatureError):
        verify(b.public_bytes, sig, b"msg")


@pytest.mark.parametrize(
    ("public", "signature"),
    [
        (bytes(31), bytes(64)),
        (bytes(33), bytes(64)),
        (bytes.fromhex(CASES[0]["public_key"]), bytes(63)),
        (bytes.fromhex(CASES[0]["public_key"]), bytes(65)),
        (bytes.fromhex(CASES[0]["public_key"]), b""),
        ("not bytes", bytes(64)),
        # A 32-byte string that is not the signer's key (possibly not even a curve point).
        ((2).to_bytes(32, "little"), bytes.fromhex(CASES[0]["signature"])),
    ],
)
def test_malformed_inputs_raise_signature_error(public: Any, signature: Any) -> None:
    with pytest.raises(SignatureError):
        verify(public, signature, b"")


def test_generate_deterministic_with_randbytes() -> None:
    a = SigningKey.generate(DeterministicRandom(3))
    b = SigningKey.generate(DeterministicRandom(3))
    assert a.public_bytes == b.public_bytes
    assert a.sign(b"m") == b.sign(b"m")
    assert SigningKey.generate().public_bytes != SigningKey.generate().public_bytes


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_private_key_wrong_length(size: int) -> None:
    with pytest.raises(InvalidKeyError, match=f"got {size} bytes"):
        SigningKey.from_private_bytes(bytes(size))


def test_sign_requires_bytes() -> None:
    with pytest.raises(ConfigError, match="message"):
        SigningKey.generate().sign("text")  # type: ignore[arg-type]


def test_repr_does_not_leak_private_key() -> None:
    secret = bytes.fromhex(CASES[0]["secret_key"])
    key = SigningKey.from_private_bytes(secret)
    for text in (repr(key), str(key)):
        assert secret.hex() not in text
        assert secret.hex()[:8] not in text
        assert key.public_bytes[:4].hex() in text


def test_not_picklable_or_copyable() -> None:
    key = SigningKey.generate()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(key, protocol=protocol)
    with pytest.raises(TypeError):
        copy.copy(key)
    with pytest.raises(TypeError):
        copy.deepcopy(key)
