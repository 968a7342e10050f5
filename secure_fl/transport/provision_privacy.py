"""The privacy options of ``secure-fl provision`` and the privacy floor it pins in every site's
policy (site-level DP over gRPC: :mod:`secure_fl.transport.privacy`)."""

from __future__ import annotations

import argparse
from typing import Any

from secure_fl.privacy.config import PrivacyConfig
from secure_fl.transport.config import AggregationSettings


def privacy_floor(privacy: PrivacyConfig, protocol: str, rounds: int) -> dict[str, Any]:
    """The ``policy`` fields every site gets for ``privacy`` (SitePolicy's ``require_dp`` and
    ``min_noise_multiplier``).

    Trust ``distributed``: ``require_dp`` and, as floor, the Gaussian-equivalent multiplier the
    configuration calls for over ``rounds`` rounds (the configured ``noise_multiplier``, or the
    one calibrated for ``target_epsilon``; a hair below it for float slack): a server that sends
    less noise is refused by every site before anything is sent. Trust ``central``: the server
    adds the noise, which a site cannot check: no floor (``require_dp`` false).

    Errors: ConfigError when the server cannot serve ``privacy`` (not site level, not SecAgg /
    SecAgg+, seeded noise, site sampling, or distributed without RDP)."""
    from secure_fl.privacy.session import calibrate_multiplier
    from secure_fl.transport.privacy import check_served

    check_served(privacy, AggregationSettings(protocol=protocol))
    if privacy.trust != "distributed":
        return {"require_dp": False, "min_noise_multiplier": None}
    needed = calibrate_multiplier(privacy, 1.0, rounds)
    return {"require_dp": True, "min_noise_multiplier": needed * (1.0 - 1e-9)}


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``secure-fl provision`` options of :func:`privacy_from_args`: ``--privacy
    none|site``, ``--trust central|distributed``, ``--target-epsilon``, ``--noise-multiplier``,
    ``--delta``, ``--clip``, ``--mechanism``."""
    group = parser.add_argument_group("differential privacy (site level, DP-FedAvg)")
    group.add_argument(
        "--privacy",
        choices=["none", "site"],
        default="none",
        help="site: DP-FedAvg with a hash-chained ledger the audit verifies (default: none)",
    )
    group.add_argument(
        "--trust",
        choices=["central", "distributed"],
        default="central",
        help="who adds the noise: the server (central) or the sites before masking",
    )
    group.add_argument("--target-epsilon", type=float, default=None, help="epsilon of the run")
    group.add_argument("--noise-multiplier", type=float, default=None, help="instead of a target")
    group.add_argument("--delta", type=float, default=1e-5, help="default: %(default)s")
    group.add_argument(
        "--clip", type=float, default=1.0, help="L2 bound on each site's update (default: 1.0)"
    )
    group.add_argument(
        "--mechanism",
        choices=["gaussian", "discrete_gaussian", "skellam"],
        default=None,
        help="default: gaussian (central), discrete_gaussian (distributed)",
    )


def privacy_from_args(args: argparse.Namespace) -> PrivacyConfig | None:
    """The :class:`PrivacyConfig` of :func:`add_privacy_arguments`' options (None for
    ``--privacy none``). Errors: ConfigError naming the option (via ``privacy.<field>``)."""
    if getattr(args, "privacy", "none") == "none":
        return None
    mechanism = args.mechanism or (
        "discrete_gaussian" if args.trust == "distributed" else "gaussian"
    )
    return PrivacyConfig(
        level="site",
        trust=args.trust,
        mechanism=mechanism,
        target_epsilon=args.target_epsilon,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        clip=args.clip,
    )


__all__ = ["add_privacy_arguments", "privacy_floor", "privacy_from_args"]
