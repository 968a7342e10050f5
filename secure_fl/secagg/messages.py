"""Messages of the SecAgg / SecAgg+ protocol: frozen dataclasses, no I/O.

Every message carries the round it belongs to; parties refuse messages of another round. Sizes are
reported by :meth:`wire_size`, the number of bytes the message's fields occupy in a compact binary
encoding (ids 4 bytes, round 8 bytes, keys and ciphertexts their length, vectors their raw size),
which is what the in-process harness counts as bytes sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

_ID = 4
_ROUND = 8
_LEN = 4


class Phase(Enum):
    """The protocol's phases, in order. A dropout is injected 'at' a phase: the site sends nothing
    from that phase on."""

    ADVERTISE_KEYS = 0
    REVEAL_NONCE = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY_CHECK = 4
    UNMASKING = 5


@dataclass(frozen=True)
class AdvertiseKeys:
    """Site -> server (phase 0): two fresh X25519 public keys, optionally signed.

    ``enc_public`` keys the encryption of secret shares; ``mask_public`` keys the pairwise masks.
    ``graph_commitment`` (32 bytes for a sparse SecAgg+ graph, empty otherwise) commits the site to
    the nonce it reveals in the reveal phase. In the active variant ``signature`` covers all three.
    """

    round_id: int
    sender: int
    enc_public: bytes
    mask_public: bytes
    signature: bytes | None = None
    graph_commitment: bytes = b""

    def wire_size(self) -> int:
        return (
            _ROUND
            + _ID
            + len(self.enc_public)
            + len(self.mask_public)
            + _LEN
            + len(self.signature or b"")
            + _LEN
            + len(self.graph_commitment)
        )


@dataclass(frozen=True)
class KeyRoster:
    """Server -> site (after phase 0): every advertisement that arrived (U1).

    All of U1, not only the site's neighbours: a sparse graph is derived only after the reveal
    phase, and every site must see every commitment.
    """

    round_id: int
    adverts: tuple[AdvertiseKeys, ...]

    def wire_size(self) -> int:
        return _ROUND + _LEN + sum(a.wire_size() for a in self.adverts)


@dataclass(frozen=True)
class RevealNonce:
    """Site -> server (reveal phase, sparse graphs only): the nonce behind the site's commitment."""

    round_id: int
    sender: int
    nonce: bytes

    def wire_size(self) -> int:
        return _ROUND + _ID + _LEN + len(self.nonce)


@dataclass(frozen=True)
class RevealSet:
    """Server -> site (reveal phase, sparse graphs only): every ``(site, nonce)`` revealed.

    It must name exactly the senders of the :class:`KeyRoster`; each site recomputes the graph
    seed from it.
    """

    round_id: int
    reveals: tuple[tuple[int, bytes], ...]

    def wire_size(self) -> int:
        return _ROUND + _LEN + sum(_ID + _LEN + len(n) for _, n in self.reveals)


@dataclass(frozen=True)
class ShareKeys:
    """Site -> server (share phase): for each neighbour, the AEAD-encrypted shares addressed to it.

    ``ciphertexts`` pairs a receiver id with the sealed (nonce || ciphertext || tag) bytes.
    ``commitments`` holds, for every holder (each neighbour and the sender itself), the
    ``(holder, mask_key_commitment, seed_commitment)`` of the two shares it holds.
    """

    round_id: int
    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]
    commitments: tuple[tuple[int, bytes, bytes], ...] = ()

    def wire_size(self) -> int:
        return (
            _ROUND
            + _ID
            + 2 * _LEN
            + sum(_ID + _LEN + len(c) for _, c in self.ciphertexts)
            + sum(_ID + len(a) + len(b) for _, a, b in self.commitments)
        )


@dataclass(frozen=True)
class ShareDelivery:
    """Server -> site (start of the masked-input phase): the encrypted shares addressed to it.

    The senders listed are the site's view of U2, the neighbours that completed key sharing.
    ``commitments`` forwards, per sender, ``(owner, mask_key_commitment, seed_commitment)`` the
    owner published for this site's shares.
    """

    round_id: int
    ciphertexts: tuple[tuple[int, bytes], ...]
    commitments: tuple[tuple[int, bytes, bytes], ...] = ()

    def wire_size(self) -> int:
        return (
            _ROUND
            + 2 * _LEN
            + sum(_ID + _LEN + len(c) for _, c in self.ciphertexts)
            + sum(_ID + len(a) + len(b) for _, a, b in self.commitments)
        )


@dataclass(frozen=True)
class MaskedInput:
    """Site -> server (masked-input phase): the input plus self mask plus pairwise masks, modulo 2^bits.

    The vector is made read-only so that no party can alter a message after sending it.
    """

    round_id: int
    sender: int
    vector: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.vector.setflags(write=False)

    def wire_size(self) -> int:
        return _ROUND + _ID + _LEN + int(self.vector.nbytes)


@dataclass(frozen=True)
class ConsistencyRequest:
    """Server -> site (consistency phase, active variant): the set U3 of sites whose masked input arrived."""

    round_id: int
    survivors: frozenset[int]

    def wire_size(self) -> int:
        return _ROUND + _LEN + _ID * len(self.survivors)


@dataclass(frozen=True)
class ConsistencySignature:
    """Site -> server (consistency phase, active variant): the site's Ed25519 signature over (round, U3)."""

    round_id: int
    sender: int
    signature: bytes

    def wire_size(self) -> int:
        return _ROUND + _ID + _LEN + len(self.signature)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> site (unmasking): which neighbours survived and which dropped.

    For a surviving peer the site reveals its share of the peer's self-mask seed; for a dropped peer
    its share of the peer's mask key. A peer named in both sets is refused: answering would reveal
    the peer's input. In the active variant ``signatures`` carries the consistency signatures.
    """

    round_id: int
    survivors: frozenset[int]
    dropped: frozenset[int]
    signatures: tuple[tuple[int, bytes], ...] = ()

    def wire_size(self) -> int:
        return (
            _ROUND
            + _LEN * 3
            + _ID * (len(self.survivors) + len(self.dropped))
            + sum(_ID + _LEN + len(s) for _, s in self.signatures)
        )


@dataclass(frozen=True)
class UnmaskResponse:
    """Site -> server (unmasking): shares of survivors' self-mask seeds and dropped peers' mask keys.

    Each entry is ``(owner, serialised Shamir share, salt)``; the server checks it against the
    owner's share commitment. ``rejected`` names owners whose share failed its commitment when this
    site received it: the site withholds those shares.
    """

    round_id: int
    sender: int
    self_mask_shares: tuple[tuple[int, bytes, bytes], ...]
    mask_key_shares: tuple[tuple[int, bytes, bytes], ...]
    rejected: tuple[int, ...] = ()

    def wire_size(self) -> int:
        entries = self.self_mask_shares + self.mask_key_shares
        return (
            _ROUND
            + _ID
            + 3 * _LEN
            + sum(_ID + len(s) + len(salt) for _, s, salt in entries)
            + _ID * len(self.rejected)
        )


ClientMessage = (
    AdvertiseKeys | RevealNonce | ShareKeys | MaskedInput | ConsistencySignature | UnmaskResponse
)
ServerMessage = KeyRoster | RevealSet | ShareDelivery | ConsistencyRequest | UnmaskRequest
