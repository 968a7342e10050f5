"""Cryptographic core of secure_fl: thin, checked wrappers over pyca/cryptography.

* :mod:`~secure_fl.crypto.random` - randomness sources (OS CSPRNG; reproducible test stream).
* :mod:`~secure_fl.crypto.kdf` - HKDF-SHA256.
* :mod:`~secure_fl.crypto.kex` - X25519 key agreement.
* :mod:`~secure_fl.crypto.aead` - AES-256-GCM for encrypted shares.
* :mod:`~secure_fl.crypto.prg` - AES-256-CTR mask expansion into NumPy arrays.
* :mod:`~secure_fl.crypto.shamir` - Shamir secret sharing over GF(2**256 + 297).
* :mod:`~secure_fl.crypto.signing` - Ed25519 signatures.
"""

from secure_fl.crypto.aead import NONCE_SIZE, OVERHEAD, TAG_SIZE, ShareAD, open_sealed, seal
from secure_fl.crypto.kdf import hkdf_sha256
from secure_fl.crypto.kex import X25519KeyPair, agree_key
from secure_fl.crypto.prg import MaskPRG, expand_mask
from secure_fl.crypto.random import DeterministicRandom, RandomBytes, system_random_bytes
from secure_fl.crypto.shamir import PRIME, SHARE_SIZE, Share, combine, split
from secure_fl.crypto.signing import SigningKey, verify

__all__ = [
    "NONCE_SIZE",
    "OVERHEAD",
    "PRIME",
    "SHARE_SIZE",
    "TAG_SIZE",
    "DeterministicRandom",
    "MaskPRG",
    "RandomBytes",
    "Share",
    "ShareAD",
    "SigningKey",
    "X25519KeyPair",
    "agree_key",
    "combine",
    "expand_mask",
    "hkdf_sha256",
    "open_sealed",
    "seal",
    "split",
    "system_random_bytes",
    "verify",
]
