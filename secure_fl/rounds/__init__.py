"""One transport-neutral round per aggregation: the recipe every driver runs, written once.

* :mod:`~secure_fl.rounds.spec` -- :class:`AggregationSpec`, the one typed aggregation config.
* :mod:`~secure_fl.rounds.plan` -- :func:`plan_round` -> :class:`RoundPlan` (participants and
  weights -> normalised weights, bit plan, SecAggConfig bound to the weights and codec).
* :mod:`~secure_fl.rounds.base` -- :class:`ServerRound`, :class:`SiteRound` (sans-IO halves),
  :class:`RoundOutcome`, :data:`NoiseHook`.
* :mod:`~secure_fl.rounds.plain`, :mod:`~secure_fl.rounds.secagg` (and ``rounds.ckks``) -- the
  halves of each aggregation; :mod:`~secure_fl.rounds.checks` -- a site's setup checks.
* :mod:`~secure_fl.rounds.messages`, :mod:`~secure_fl.rounds.codec` -- messages and their bytes.
* :mod:`~secure_fl.rounds.local` -- :func:`run_local`, the in-process driver.
* :mod:`~secure_fl.rounds.state` -- a site half's state exported and restored between messages,
  its secrets sealed under a :class:`StateSealer` (the latest state only, once).
* :mod:`~secure_fl.rounds.guards` -- :class:`ReleaseGuard`, a site's memory across rounds (one
  participation and one unmasking per round id), which every host must give each site.

Importing this package imports nothing heavy (names load on first use); the round layer
imports numpy but neither torch, grpc nor TenSEAL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secure_fl.rounds.base import NoiseHook, RoundOutcome, ServerRound, SiteRound
    from secure_fl.rounds.guards import MemoryReleaseGuard, ReleaseGuard
    from secure_fl.rounds.local import (
        in_process_policy,
        make_server_round,
        make_site_round,
        run_local,
    )
    from secure_fl.rounds.messages import (
        CkksResult,
        CkksSetup,
        CkksUpload,
        Message,
        PlainSetup,
        PlainUpload,
        SecAggSetup,
    )
    from secure_fl.rounds.plain import PlainServerRound, PlainSiteRound
    from secure_fl.rounds.plan import RoundPlan, normalise_weights, plan_round, round_binding
    from secure_fl.rounds.secagg import SecAggServerRound, SecAggSiteRound
    from secure_fl.rounds.spec import AggregationSpec
    from secure_fl.rounds.state import StateSealer

_LAZY: dict[str, str] = {
    "AggregationSpec": "secure_fl.rounds.spec",
    "CkksResult": "secure_fl.rounds.messages",
    "CkksSetup": "secure_fl.rounds.messages",
    "CkksUpload": "secure_fl.rounds.messages",
    "MemoryReleaseGuard": "secure_fl.rounds.guards",
    "Message": "secure_fl.rounds.messages",
    "NoiseHook": "secure_fl.rounds.base",
    "PlainServerRound": "secure_fl.rounds.plain",
    "PlainSetup": "secure_fl.rounds.messages",
    "PlainSiteRound": "secure_fl.rounds.plain",
    "PlainUpload": "secure_fl.rounds.messages",
    "ReleaseGuard": "secure_fl.rounds.guards",
    "RoundOutcome": "secure_fl.rounds.base",
    "RoundPlan": "secure_fl.rounds.plan",
    "SecAggServerRound": "secure_fl.rounds.secagg",
    "SecAggSetup": "secure_fl.rounds.messages",
    "SecAggSiteRound": "secure_fl.rounds.secagg",
    "ServerRound": "secure_fl.rounds.base",
    "SiteRound": "secure_fl.rounds.base",
    "StateSealer": "secure_fl.rounds.state",
    "in_process_policy": "secure_fl.rounds.local",
    "make_server_round": "secure_fl.rounds.local",
    "make_site_round": "secure_fl.rounds.local",
    "normalise_weights": "secure_fl.rounds.plan",
    "plan_round": "secure_fl.rounds.plan",
    "round_binding": "secure_fl.rounds.plan",
    "run_local": "secure_fl.rounds.local",
}


def __getattr__(name: str) -> Any:
    # Lazy: importing one submodule (e.g. rounds.spec from a config loader) must not import the
    # whole round layer (numpy, the protocol cores).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_fl.rounds' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AggregationSpec",
    "CkksResult",
    "CkksSetup",
    "CkksUpload",
    "MemoryReleaseGuard",
    "Message",
    "NoiseHook",
    "PlainServerRound",
    "PlainSetup",
    "PlainSiteRound",
    "PlainUpload",
    "ReleaseGuard",
    "RoundOutcome",
    "RoundPlan",
    "SecAggServerRound",
    "SecAggSetup",
    "SecAggSiteRound",
    "ServerRound",
    "SiteRound",
    "StateSealer",
    "in_process_policy",
    "make_server_round",
    "make_site_round",
    "normalise_weights",
    "plan_round",
    "round_binding",
    "run_local",
]
