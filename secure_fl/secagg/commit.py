"""Hash commitments of SecAgg / SecAgg+: the graph nonces and the Shamir shares.

* Graph commitment: each site commits to a fresh 32-byte nonce in its (signed) key advertisement and
  reveals it only after the server has forwarded every commitment. The graph seed hashes every
  site's nonce, so neither the server nor a coalition of sites can choose the SecAgg+ graph.
* Share commitment: the owner of a secret commits, for each holder, to the holder's share under a
  fresh 32-byte salt (sent to the holder inside the AEAD). The holder checks the commitment on
  receipt; the server checks every share revealed in the unmasking phase against it, so a holder
  that reveals a wrong share is caught and its shares are ignored.

All commitments are SHA-256 over a domain-separated, fixed-layout encoding (hiding: the salt and
the nonce are 32 uniformly random bytes; binding: collision resistance of SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

NONCE_SIZE = 32
SALT_SIZE = 32
COMMITMENT_SIZE = 32

#: Which of a site's two secrets a share commitment is for.
MASK_KEY = b"mask-key"
SELF_SEED = b"self-seed"


def graph_commitment(context: bytes, sender: int, nonce: bytes) -> bytes:
    """SHA-256 commitment of ``sender`` to its graph ``nonce`` in the round named by ``context``."""
    return hashlib.sha256(
        struct.pack(">I", len(context)) + context + struct.pack(">I", sender) + nonce
    ).digest()


def graph_seed(context: bytes, reveals: dict[int, bytes]) -> bytes:
    """The public graph seed: SHA-256 over the round context and every ``(site, nonce)``, sorted."""
    h = hashlib.sha256(struct.pack(">I", len(context)) + context)
    for site in sorted(reveals):
        h.update(struct.pack(">I", site) + reveals[site])
    return h.digest()


def share_commitment(
    context: bytes, kind: bytes, owner: int, holder: int, salt: bytes, share: bytes
) -> bytes:
    """SHA-256 commitment to one serialised Shamir ``share`` of ``owner``'s secret ``kind`` held by
    ``holder``, hidden by ``salt``."""
    return hashlib.sha256(
        struct.pack(">I", len(context))
        + context
        + struct.pack(">B", len(kind))
        + kind
        + struct.pack(">II", owner, holder)
        + salt
        + share
    ).digest()


def matches(expected: bytes, actual: bytes) -> bool:
    """Constant-time equality of two commitments."""
    return hmac.compare_digest(expected, actual)
