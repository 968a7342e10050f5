"""Tests for secure_fl.crypto.kdf against RFC 5869 Appendix A (SHA-256 test cases)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secure_fl.crypto import hkdf_sha256
from secure_fl.errors import ConfigError

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
CASES: list[dict[str, Any]] = json.loads((VECTORS / "rfc5869_hkdf_sha256.json").read_text())[
    "cases"
]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_rfc5869_vectors(case: dict[str, Any]) -> None:
    okm = hkdf_sha256(
        bytes.fromhex(case["ikm"]),
        salt=bytes.fromhex(case["salt"]),
        info=bytes.fromhex(case["info"]),
        length=case["length"],
    )
    assert okm.hex() == case["okm"]


def test_rfc5869_case3_salt_none_equals_empty_salt() -> None:
    """RFC 5869: a missing salt is HashLen zeros, and HMAC treats b"" like that key."""
    case = CASES[2]
    assert case["salt"] == ""
    ikm = bytes.fromhex(case["ikm"])
    okm = hkdf_sha256(ikm, salt=None, info=b"", length=case["length"])
    assert okm.hex() == case["okm"]
    assert okm == hkdf_sha256(ikm, salt=bytes(32), info=b"", length=case["length"])


def test_default_length_is_32_and_prefix_consistent() -> None:
    case = CASES[0]
    out = hkdf_sha256(
        bytes.fromhex(case["ikm"]),
        salt=bytes.fromhex(case["salt"]),
        info=bytes.fromhex(case["info"]),
    )
    assert len(out) == 32
    assert out.hex() == case["okm"][:64]


def test_info_separates_outputs() -> None:
    assert hkdf_sha256(b"k", salt=None, info=b"a") != hkdf_sha256(b"k", salt=None, info=b"b")


@pytest.mark.parametrize("length", [0, -1, 255 * 32 + 1, True])
def test_bad_length(length: int) -> None:
    with pytest.raises(ConfigError, match="length"):
        hkdf_sha256(b"k", salt=None, info=b"", length=length)


def test_max_length_allowed() -> None:
    assert len(hkdf_sha256(b"k", salt=None, info=b"", length=255 * 32)) == 255 * 32


def test_bad_types() -> None:
    with pytest.raises(ConfigError, match="ikm"):
        hkdf_sha256("k", salt=None, info=b"")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="salt"):
        hkdf_sha256(b"k", salt="s", info=b"")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="info"):
        hkdf_sha256(b"k", salt=None, info="i")  # type: ignore[arg-type]
