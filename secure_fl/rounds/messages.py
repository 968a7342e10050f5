"""The round layer's own messages: the setups a server sends first, and the plain upload.

The SecAgg phase messages are those of :mod:`secure_fl.secagg.messages`; the round layer adds the
setup that precedes them (:class:`SecAggSetup`, what ``protocols/federation.proto``'s SecAggSetup
carries), the plain baseline's setup and upload, and the CKKS setup and upload. All are frozen
dataclasses without I/O; :mod:`secure_fl.rounds.codec` turns each into bytes and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

import numpy as np

from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    RevealNonce,
    RevealSet,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)


def _frozen_map(obj: object, name: str) -> None:
    value = getattr(obj, name)
    object.__setattr__(obj, name, MappingProxyType(dict(value)))


@dataclass(frozen=True)
class SecAggSetup:
    """Server -> site: one SecAgg / SecAgg+ round's configuration and encoding plan.

    ``site_ids`` ascending; ``k`` the masking degree (``n - 1``: complete graph);
    ``verify_keys`` every participant's Ed25519 key (active variant, else empty);
    ``frac_bits``/``clip_range`` the fixed-point codec (``bits`` its modulus); ``weight`` the
    receiver's normalised weight as the server announces it (informative: the site computes its
    own from ``weights``, every participant's reported weight); ``l2_clip`` the L2 bound the site
    applies before encoding (None: none); ``distributed_dp_json`` the distributed-DP noise every
    site adds (empty: none), bound into the round; ``phase_deadline_s`` seconds per phase.
    """

    round_id: int
    protocol: str
    site_ids: tuple[int, ...]
    threshold: int
    k: int
    vector_length: int
    bits: int
    active: bool
    frac_bits: int
    clip_range: float
    weight: float
    weights: Mapping[int, float]
    verify_keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)
    l2_clip: float | None = None
    distributed_dp_json: str = ""
    phase_deadline_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "site_ids", tuple(self.site_ids))
        _frozen_map(self, "weights")
        _frozen_map(self, "verify_keys")

    def wire_size(self) -> int:
        return (
            64
            + 12 * len(self.site_ids)
            + 36 * len(self.verify_keys)
            + len(self.distributed_dp_json)
        )


@dataclass(frozen=True)
class PlainSetup:
    """Server -> site (plain baseline): the round, its participants' reported weights, the
    vector length and the optional L2 bound. The site sends its update in the clear."""

    round_id: int
    site_ids: tuple[int, ...]
    vector_length: int
    weights: Mapping[int, float]
    l2_clip: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site_ids", tuple(self.site_ids))
        _frozen_map(self, "weights")

    def wire_size(self) -> int:
        return 32 + 12 * len(self.site_ids)


@dataclass(frozen=True)
class PlainUpload:
    """Site -> server (plain baseline): the site's (L2-clipped) update in the clear, float64.
    ``clipped`` says whether the L2 bound changed it (reported, never silent)."""

    round_id: int
    sender: int
    vector: np.ndarray = field(repr=False)
    clipped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", np.asarray(self.vector, dtype=np.float64))

    def wire_size(self) -> int:
        return 13 + 4 * int(self.vector.size)


@dataclass(frozen=True)
class CkksSetup:
    """Server -> site (CKKS): the federation's context fingerprint, the encryption parameters
    the site checks against its own context, its normalised weight, the vector length, the
    ciphertexts per frame and the participants' reported weights. (The CKKS round,
    :mod:`secure_fl.rounds.ckks`, may carry more in ``extra``: canonical JSON.)"""

    round_id: int
    context_sha256: bytes
    poly_modulus_degree: int
    scale: float
    weight: float
    vector_length: int
    chunk_ciphertexts: int
    weights: Mapping[int, float] = field(default_factory=dict)
    l2_clip: float | None = None
    phase_deadline_s: float = 0.0
    extra: str = ""

    def __post_init__(self) -> None:
        _frozen_map(self, "weights")

    def wire_size(self) -> int:
        return 80 + len(self.context_sha256) + 12 * len(self.weights) + len(self.extra)


@dataclass(frozen=True)
class CkksUpload:
    """Site -> server (CKKS): the site's encrypted, weight-scaled update (opaque bytes: the
    framed ciphertexts of :mod:`secure_fl.he`)."""

    round_id: int
    sender: int
    payload: bytes = field(repr=False)

    def wire_size(self) -> int:
        return 12 + len(self.payload)


@dataclass(frozen=True)
class CkksResult:
    """Server -> site (CKKS): the encrypted weighted sum, the next global model (opaque)."""

    round_id: int
    payload: bytes = field(repr=False)

    def wire_size(self) -> int:
        return 8 + len(self.payload)


#: Messages a server sends.
ServerMessage: TypeAlias = (
    SecAggSetup
    | PlainSetup
    | CkksSetup
    | CkksResult
    | KeyRoster
    | RevealSet
    | ShareDelivery
    | ConsistencyRequest
    | UnmaskRequest
)
#: Messages a site sends.
SiteMessage: TypeAlias = (
    PlainUpload
    | CkksUpload
    | AdvertiseKeys
    | RevealNonce
    | ShareKeys
    | MaskedInput
    | ConsistencySignature
    | UnmaskResponse
)
#: Any round message (what :func:`secure_fl.rounds.codec.encode` accepts).
Message: TypeAlias = Any

__all__ = [
    "AdvertiseKeys",
    "CkksResult",
    "CkksSetup",
    "CkksUpload",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "PlainSetup",
    "PlainUpload",
    "RevealNonce",
    "RevealSet",
    "SecAggSetup",
    "ServerMessage",
    "ShareDelivery",
    "ShareKeys",
    "SiteMessage",
    "UnmaskRequest",
    "UnmaskResponse",
]
