"""One exception tree for the whole library.

Every error that secure_fl raises on purpose derives from :class:`SecureFLError`, so a pipeline
can catch the library's failures with one ``except`` clause. Validation errors also derive from
:class:`ValueError` so that code written against plain Python conventions keeps working.

Security checks raise; they never return ``False`` and never rely on ``assert``.
"""

from __future__ import annotations


class SecureFLError(Exception):
    """Base class of every error raised on purpose by secure_fl."""


class ConfigError(SecureFLError, ValueError):
    """A configuration value is missing, of the wrong type or outside its allowed range.

    The message names the field and the allowed range.
    """


class InvalidUpdateError(SecureFLError, ValueError):
    """A model update is malformed: wrong structure, shape or dtype, NaN/Inf, or a duplicate site."""


class CryptoError(SecureFLError):
    """Base class of failures inside the cryptographic wrappers."""


class InvalidKeyError(CryptoError, ValueError):
    """Key material has the wrong length or is degenerate (for example a low-order X25519 point)."""


class DecryptionError(CryptoError):
    """Authenticated decryption failed.

    Deliberately opaque: a wrong key, a tampered ciphertext, a wrong nonce and mismatched associated
    data (replay into another round, redirection to another receiver) all raise this same error.
    """


class SignatureError(CryptoError):
    """A signature did not verify."""


class SecretSharingError(CryptoError):
    """Base class of Shamir secret-sharing failures."""


class InsufficientSharesError(SecretSharingError):
    """Fewer distinct shares than the threshold were supplied; nothing can be reconstructed."""


class InconsistentSharesError(SecretSharingError):
    """The supplied shares do not lie on one polynomial of the agreed degree (tampering or corruption)."""


class ProtocolError(SecureFLError):
    """Base class of secure-aggregation protocol failures."""


class LocalProtocolError(ProtocolError):
    """This party was asked to do something the protocol forbids (wrong phase, bad local input)."""


class RemoteProtocolError(ProtocolError):
    """A peer or the server sent a message that violates the protocol.

    A party that raises this enters a permanent error state and refuses every later message.
    """


class ThresholdError(ProtocolError):
    """Fewer parties than the threshold remain; the round aborts and reveals nothing."""


class LedgerIntegrityError(SecureFLError):
    """The privacy ledger was altered (a record edited, deleted, reordered or inserted, or the tail
    truncated); the message names the first broken record."""


class BudgetExceededError(SecureFLError):
    """A privacy budget would be exceeded; the round is refused before it runs."""


class DataError(SecureFLError, ValueError):
    """A data file (scan, label, brain mask) is unreadable or unfit for training: truncated or
    corrupt, not a 3-D volume, NaN/Inf voxels, a label of another shape or with unexpected values.

    The message lists every bad case, one line each, with the file and the reason.
    """


class PolicyError(RemoteProtocolError):
    """The server asked this site for something its own policy refuses (an aggregation it does not
    accept, plain aggregation, the semi-honest variant, a threshold below the site's minimum, a
    wrong vector length, a stale round id, a second update for the same model). The site leaves
    the round without sending anything."""


class PostDecryptionError(DecryptionError):
    """A check whose outcome depends on secret values failed: what this party decrypted (a CKKS
    global model out of range, non-finite, or not of the announced size), or its own new model
    computed from secret data.

    Refusing only the round would hand the server a one-bit oracle per round that it can steer (it
    can shift ciphertexts with the public key alone); a site that gets this error stops for good
    instead (fail closed, ``protocols/ckks.md``). The message never holds decrypted values.
    """
