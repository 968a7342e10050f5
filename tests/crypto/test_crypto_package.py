"""The package re-exports its public API."""

from __future__ import annotations

import secure_fl.crypto as crypto


def test_public_names_exported() -> None:
    expected = {
        "RandomBytes",
        "system_random_bytes",
        "DeterministicRandom",
        "hkdf_sha256",
        "X25519KeyPair",
        "agree_key",
        "ShareAD",
        "seal",
        "open_sealed",
        "NONCE_SIZE",
        "TAG_SIZE",
        "OVERHEAD",
        "MaskPRG",
        "expand_mask",
        "PRIME",
        "SHARE_SIZE",
        "Share",
        "split",
        "combine",
        "SigningKey",
        "verify",
    }
    assert expected == set(crypto.__all__)
    for name in expected:
        assert getattr(crypto, name) is not None
