"""Tests for secure_fl.crypto.kex: RFC 7748 vectors, agree_key, hygiene."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from secure_fl.crypto import DeterministicRandom, X25519KeyPair, agree_key, hkdf_sha256
from secure_fl.errors import ConfigError, InvalidKeyError

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "rfc7748_x25519.json").read_text()
)

# Low-order points of Curve25519 and non-canonical encodings of them (u = 0, 1, two points of
# order 8, p - 1, p, p + 1): X25519 with any of them gives the all-zero shared secret.
LOW_ORDER_POINTS = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]

_P = 2**255 - 19


def _reference_x25519(scalar: bytes, u: bytes) -> bytes:
    """Straight transcription of the RFC 7748 section 5 ladder (an independent oracle)."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    kn = int.from_bytes(k, "little")
    ub = bytearray(u)
    ub[31] &= 127
    x1 = int.from_bytes(ub, "little") % _P
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in range(254, -1, -1):
        kt = (kn >> t) & 1
        swap ^= kt
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = kt
        a = (x2 + z2) % _P
        aa = a * a % _P
        b = (x2 - z2) % _P
        bb = b * b % _P
        e = (aa - bb) % _P
        c = (x3 + z3) % _P
        d = (x3 - z3) % _P
        da = d * a % _P
        cb = c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + 121665 * e) % _P
    if swap:
        x2, x3, z2, z3 = x3, x2, z3, z2
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


@pytest.mark.parametrize("case", VECTORS["scalar_mult"], ids=["5.2-1", "5.2-2"])
def test_rfc7748_scalar_mult(case: dict[str, str]) -> None:
    pair = X25519KeyPair.from_private_bytes(bytes.fromhex(case["scalar"]))
    assert pair.exchange(bytes.fromhex(case["u_coordinate"])).hex() == case["output"]
    assert _reference_x25519(
        bytes.fromhex(case["scalar"]), bytes.fromhex(case["u_coordinate"])
    ) == (bytes.fromhex(case["output"]))


def test_rfc7748_iterated() -> None:
    it = VECTORS["iterated"]
    k = u = bytes.fromhex(it["start"])
    for i in range(1, 1001):
        k, u = X25519KeyPair.from_private_bytes(k).exchange(u), k
        if i == 1:
            assert k.hex() == it["after_1"]
    assert k.hex() == it["after_1000"]


def test_rfc7748_diffie_hellman() -> None:
    dh = VECTORS["diffie_hellman"]
    alice = X25519KeyPair.from_private_bytes(bytes.fromhex(dh["alice_private"]))
    bob = X25519KeyPair.from_private_bytes(bytes.fromhex(dh["bob_private"]))
    assert alice.public_bytes.hex() == dh["alice_public"]
    assert bob.public_bytes.hex() == dh["bob_public"]
    assert alice.exchange(bob.public_bytes).hex() == dh["shared_secret"]
    assert bob.exchange(alice.public_bytes).hex() == dh["shared_secret"]
    assert alice.private_bytes().hex() == dh["alice_private"]


def test_exchange_matches_reference_ladder_on_random_keys() -> None:
    rng = DeterministicRandom(b"x25519-reference")
    for _ in range(5):
        a = X25519KeyPair.generate(rng)
        u = rng(32)
        assert a.exchange(u) == _reference_x25519(a.private_bytes(), u)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_low_order_points_rejected(point: str) -> None:
    pair = X25519KeyPair.generate()
    with pytest.raises(InvalidKeyError, match="low-order"):
        pair.exchange(bytes.fromhex(point))
    with pytest.raises(InvalidKeyError):
        agree_key(pair, bytes.fromhex(point), context=b"ctx")


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_private_bytes_wrong_length(size: int) -> None:
    with pytest.raises(InvalidKeyError, match=f"got {size} bytes"):
        X25519KeyPair.from_private_bytes(bytes(size))


@pytest.mark.parametrize("size", [0, 31, 33])
def test_peer_public_wrong_length(size: int) -> None:
    pair = X25519KeyPair.generate()
    with pytest.raises(InvalidKeyError, match=f"got {size} bytes"):
        pair.exchange(bytes(size))
    with pytest.raises(InvalidKeyError):
        agree_key(pair, bytes(size), context=b"ctx")


def test_private_key_wrong_type() -> None:
    with pytest.raises(InvalidKeyError):
        X25519KeyPair.from_private_bytes("00" * 32)  # type: ignore[arg-type]


def test_generate_with_randbytes_is_deterministic() -> None:
    a = X25519KeyPair.generate(DeterministicRandom(5))
    b = X25519KeyPair.generate(DeterministicRandom(5))
    assert a.public_bytes == b.public_bytes
    assert a.private_bytes() == DeterministicRandom(5)(32)


def test_generate_from_os_differs() -> None:
    assert X25519KeyPair.generate().public_bytes != X25519KeyPair.generate().public_bytes


def test_generate_rejects_short_randbytes() -> None:
    with pytest.raises(InvalidKeyError, match="got 16 bytes"):
        X25519KeyPair.generate(lambda n: bytes(16))


def test_agree_key_symmetric_and_formula() -> None:
    rng = DeterministicRandom(b"agree")
    a = X25519KeyPair.generate(rng)
    b = X25519KeyPair.generate(rng)
    k_ab = agree_key(a, b.public_bytes, context=b"secure_fl/mask/v1")
    k_ba = agree_key(b, a.public_bytes, context=b"secure_fl/mask/v1")
    assert k_ab == k_ba
    assert len(k_ab) == 32
    lo, hi = sorted([a.public_bytes, b.public_bytes])
    expected = hkdf_sha256(
        a.exchange(b.public_bytes), salt=None, info=b"secure_fl/mask/v1" + lo + hi, length=32
    )
    assert k_ab == expected
    assert k_ab != a.exchange(b.public_bytes)


def test_agree_key_context_and_peer_separation() -> None:
    a, b, c = (X25519KeyPair.generate() for _ in range(3))
    assert agree_key(a, b.public_bytes, context=b"mask") != agree_key(
        a, b.public_bytes, context=b"enc"
    )
    assert agree_key(a, b.public_bytes, context=b"mask") != agree_key(
        a, c.public_bytes, context=b"mask"
    )


def test_agree_key_refuses_own_public_key() -> None:
    a = X25519KeyPair.generate()
    with pytest.raises(InvalidKeyError, match="own public key"):
        agree_key(a, a.public_bytes, context=b"ctx")


def test_agree_key_bad_arguments() -> None:
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    with pytest.raises(ConfigError, match="context"):
        agree_key(a, b.public_bytes, context="ctx")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="own"):
        agree_key(b.public_bytes, a.public_bytes, context=b"ctx")  # type: ignore[arg-type]


def test_repr_does_not_leak_private_key() -> None:
    pair = X25519KeyPair.generate()
    secret_hex = pair.private_bytes().hex()
    for text in (repr(pair), str(pair), f"{pair}"):
        assert secret_hex not in text
        assert secret_hex[:8] not in text
        assert pair.public_bytes[:4].hex() in text


def test_not_picklable_or_copyable() -> None:
    pair = X25519KeyPair.generate()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(pair, protocol=protocol)
    with pytest.raises(TypeError):
        copy.copy(pair)
    with pytest.raises(TypeError):
        copy.deepcopy(pair)
    with pytest.raises(TypeError):
        pair.__getstate__()
