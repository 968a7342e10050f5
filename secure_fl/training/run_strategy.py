"""The strategies of a simulated experiment (:mod:`secure_fl.training.runner`): building one from
the configuration, evaluating its model(s) on the held-out cases, and summarising its aggregation
report for the metrics line.

Errors: ConfigError for a strategy the configuration cannot run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from secure_fl.errors import ConfigError
from secure_fl.training.config import ExperimentConfig
from secure_fl.training.dp_fedavg import DPFedAvg, SiteDP
from secure_fl.training.strategies import Federation, Strategy, StrategyState, make_strategy


def _make_strategy(config: ExperimentConfig, name: str) -> Strategy:
    dropouts = {int(k) - 1: v for k, v in config.dropouts.items()}  # keys: rounds from 1
    if config.privacy.level == "sample" and config.privacy.trust == "distributed":
        from secure_fl.training.fed_dpsgd import FedDPSGD

        p, train = config.privacy, config.train
        # federated DP-SGD; noise_multiplier and sample_rate are set by PrivacyRound.prepare
        return FedDPSGD(
            clip=p.clip,
            noise_multiplier=p.noise_multiplier or 1.0,
            sample_rate=1.0,
            lr=lambda r: float(train.lr_for_round(r, config.rounds)),
            aggregator=config.aggregation.name,
            aggregator_options=config.aggregation.options,
            mechanism=p.mechanism,
            dropouts=dropouts,
            seed=config.seed if p.reproducible_noise else None,
        )
    if config.privacy.level == "site":
        p = config.privacy
        if config.strategy.server_optimizer != {"name": "fedavg", "lr": 1.0}:
            # DP-FedAvg applies its own (noised) mean; refusing beats silently ignoring.
            raise ConfigError(
                "strategy.server_optimizer must be plain fedavg (lr = 1) with "
                f"privacy.level='site', got {config.strategy.server_optimizer}"
            )
        # The noise multiplier is resolved by PrivacyRound.prepare (calibration).
        dp = SiteDP(
            noise_multiplier=p.noise_multiplier or 1.0,
            clip=p.clip,
            sample_rate=p.site_sample_rate,
            trust=p.trust,
            mechanism=p.mechanism,
            bits=p.bits,
            seed=config.seed,
        )
        return DPFedAvg(dp, config.aggregation.name, config.aggregation.options, dropouts=dropouts)
    return make_strategy(
        name,
        rounds=config.rounds,
        aggregator=config.aggregation.name,
        aggregator_options=config.aggregation.options,
        fedprox_mu=config.fedprox_mu,
        dropouts=dropouts,
        server_optimizer=config.strategy.server_optimizer,
    )


def evaluate_strategy(
    strategy: Strategy, fed: Federation, state: StrategyState
) -> tuple[dict[str, float], float]:
    """Mean Dice per site on its held-out cases, and the mean over all held-out cases pooled."""
    dice: dict[str, float] = {}
    everything: list[float] = []
    for name in fed.names:
        states = strategy.eval_states(fed, state, name)
        if strategy.mean_over_models and len(states) > 1:
            per_model = [fed.sites[name].dice([s]) for s in states]
            scores = [float(np.mean(case)) for case in zip(*per_model, strict=True)]
        else:
            scores = fed.sites[name].dice(states)
        everything.extend(scores)
        dice[name] = float(np.mean(scores)) if scores else float("nan")
    pooled = float(np.mean(everything)) if everything else float("nan")
    return dice, pooled


def _summarise(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    keep = (
        "aggregator",
        "included",
        "dropped",
        "clipped_total",
        "threshold",
        "k",
        "bits",
        "max_error",
        "seconds",
    )
    out = {k: report[k] for k in keep if k in report}
    if "bytes_sent" in report:
        out["bytes_sent_per_site"] = float(np.mean(list(report["bytes_sent"].values())))
    return out
