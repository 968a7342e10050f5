"""SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020): sans-IO protocol cores.

See ``protocols/secagg.md`` for the specification: phases, messages, checks, what each party learns.
"""

from secure_fl.secagg.client import ClientPhase, SecAggClient
from secure_fl.secagg.config import PROTOCOLS, SecAggConfig, make_config
from secure_fl.secagg.graph import (
    MaskingParameters,
    derive_graph,
    harary_graph,
    minimum_threshold,
    secagg_parameters,
    secagg_plus_parameters,
)
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    Phase,
    RevealNonce,
    RevealSet,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_fl.secagg.policy import SitePolicy
from secure_fl.secagg.server import SecAggServer, ServerPhase
from secure_fl.secagg.simulation import PartyStats, RoundResult, run_round

__all__ = [
    "PROTOCOLS",
    "AdvertiseKeys",
    "ClientPhase",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeyRoster",
    "MaskedInput",
    "MaskingParameters",
    "PartyStats",
    "Phase",
    "RevealNonce",
    "RevealSet",
    "RoundResult",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "ServerPhase",
    "ShareDelivery",
    "ShareKeys",
    "SitePolicy",
    "UnmaskRequest",
    "UnmaskResponse",
    "derive_graph",
    "harary_graph",
    "make_config",
    "minimum_threshold",
    "run_round",
    "secagg_parameters",
    "secagg_plus_parameters",
]
