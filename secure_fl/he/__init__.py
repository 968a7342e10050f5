"""Homomorphically encrypted aggregation with CKKS (TenSEAL).

Roles and artefacts (see ``protocols/ckks.md``):

* :func:`provision` writes the federation's **secret context** (every site: encrypts its update,
  decrypts the aggregate) and its **public context** (the server: adds ciphertexts, nothing else).
  :meth:`SecretContext.generate` does the same in process for a simulation.
* :class:`SiteEncryptor` checks and encrypts one site's weighted update into chunk frames;
  :class:`CiphertextSummer` (server, public context only) adds the frames;
  :class:`SumDecryptor` decrypts the summed chunks at a site, for that site only (no decryption
  ever goes to the server: see ``protocols/ckks.md``); :class:`EncryptionPool` encrypts on several
  cores. :func:`encrypted_mean` plays all three for an in-process round;
  :class:`secure_fl.aggregators.ckks.CKKSAggregator` puts it behind the common aggregator
  interface. :class:`StreamingSum` is the server's running sum over uploads that stream in
  (bounded memory); the round recipe that drives all of them is :mod:`secure_fl.rounds.ckks`.
* :data:`PRESETS` are the named parameter sets, each checked against the HE Standard's 128-bit
  limits; :data:`DEFAULT_PRESET` (``n8192-add``) is sized for additions only.

TenSEAL is imported on first use, so importing this package does not need it.
"""

from secure_fl.he.aggregate import CiphertextSummer, SiteEncryptor
from secure_fl.he.context import (
    PUBLIC_FILE,
    SECRET_FILE,
    Provisioned,
    PublicContext,
    SecretContext,
    check_fingerprint,
    provision,
)
from secure_fl.he.decrypt import RoundStats, SumDecryptor, encrypted_mean
from secure_fl.he.packing import DEFAULT_CHUNK_CIPHERTEXTS, Layout
from secure_fl.he.parallel import EncryptionPool
from secure_fl.he.params import (
    DEFAULT_PRESET,
    HE_STANDARD_128_MAX_BITS,
    PRESETS,
    CKKSPreset,
    get_preset,
)
from secure_fl.he.stream import StreamingSum, TaintedSumError

__all__ = [
    "DEFAULT_CHUNK_CIPHERTEXTS",
    "DEFAULT_PRESET",
    "HE_STANDARD_128_MAX_BITS",
    "PRESETS",
    "PUBLIC_FILE",
    "SECRET_FILE",
    "CKKSPreset",
    "CiphertextSummer",
    "EncryptionPool",
    "Layout",
    "Provisioned",
    "PublicContext",
    "RoundStats",
    "SecretContext",
    "SiteEncryptor",
    "StreamingSum",
    "SumDecryptor",
    "TaintedSumError",
    "check_fingerprint",
    "encrypted_mean",
    "get_preset",
    "provision",
]
