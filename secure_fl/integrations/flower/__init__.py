"""secure_fl on Flower (Message API): our secure aggregation and DP where Flower users already run.

Install with the extra: ``pip install 'secure_fl[flower]'`` (Flower 1.42 with its simulation
engine). Spec: ``protocols/flower.md``.

* :class:`~secure_fl.integrations.flower.workflow.SecureAggregationWorkflow` -- the ServerApp side:
  drives the round layer's server halves (SecAgg / SecAgg+ active by default, CKKS, plain) over
  ``grid.send_and_receive``; dropouts as Flower reports them.
* :func:`~secure_fl.integrations.flower.mod.make_secure_fl_mod` / ``secure_fl_mod`` -- the
  ClientApp mod: runs the site halves around the user's own train function, under the site's own
  policy, roster and keys (never the server's), its round state sealed in ``context.state``.
* :class:`~secure_fl.integrations.flower.privacy.FlowerPrivacy` -- DP-FedAvg (central or
  distributed noise) with the hash-chained ledger that ``secure-fl audit`` verifies.
* :func:`~secure_fl.integrations.flower.simulate.simulate` -- one round through a real Flower
  ServerApp and ClientApps (``run_simulation``), returning what ``aggregators.create(...).aggregate``
  returns.

Importing this package imports nothing from Flower; the names load on first use and raise a
:class:`~secure_fl.errors.ConfigError` naming the extra when Flower is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "Envelope": "records",
    "FlowerFederation": "provision",
    "FlowerPrivacy": "privacy",
    "FlowerRoundResult": "workflow",
    "FlowerSite": "node",
    "LocalGrid": "grid",
    "PrivacyPlan": "privacy",
    "SecureAggregationWorkflow": "workflow",
    "load_flower_site": "node",
    "load_roster": "provision",
    "make_secure_fl_mod": "mod",
    "provision_flower": "provision",
    "secure_fl_mod": "mod",
    "simulate": "simulate",
}


def require_flower() -> None:
    """Errors: ConfigError naming the extra when Flower is not importable."""
    try:
        importlib.import_module("flwr")
    except ImportError as exc:
        from secure_fl.errors import ConfigError

        raise ConfigError(
            "secure_fl.integrations.flower needs Flower: pip install 'secure_fl[flower]'"
        ) from exc


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_fl.integrations.flower' has no attribute {name!r}")
    require_flower()
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted([*_LAZY, "require_flower"])
