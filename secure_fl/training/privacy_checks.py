"""Which privacy settings cannot work with the rest of an experiment: checked when a config loads.

Torch-free on purpose (reading a config imports no torch); re-exported from
:mod:`secure_fl.training.privacy_run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secure_fl.errors import ConfigError

if TYPE_CHECKING:
    from secure_fl.training.config import ExperimentConfig


def check_privacy_config(config: ExperimentConfig) -> None:
    """Combinations of privacy with the rest of the experiment that cannot work.

    Errors: ConfigError naming the keys.
    """
    p = config.privacy
    if not p.enabled:
        return
    if len(config.strategies) != 1:
        raise ConfigError(
            "with privacy enabled, strategies must name exactly one strategy (each strategy "
            f"would spend the same patients' budget again), got {list(config.strategies)}"
        )
    if p.level == "sample":
        if config.preprocess.samples_per_volume != 1:
            raise ConfigError(
                "privacy.level='sample' protects each patient: set preprocess.samples_per_volume "
                f"= 1 (one patch per case per draw), got {config.preprocess.samples_per_volume}"
            )
        if config.model.norm == "batch":
            raise ConfigError("privacy.level='sample' needs model.norm = 'instance' or 'group'")
        if config.strategies[0] == "fedprox":
            raise ConfigError("fedprox is not supported with privacy.level='sample'")
    if p.level == "site" and config.strategies[0] != "fedavg":
        raise ConfigError(
            f"privacy.level='site' is DP-FedAvg: strategies must be ['fedavg'], got "
            f"{list(config.strategies)}"
        )
    if p.level == "sample" and p.trust == "distributed":
        # federated DP-SGD (secure_fl.training.fed_dpsgd): one global step per round
        if config.strategies[0] != "fedavg":
            raise ConfigError(
                "privacy.level='sample' with trust='distributed' is federated DP-SGD: "
                f"strategies must be ['fedavg'], got {list(config.strategies)}"
            )
        if config.train.local_epochs != 1:
            raise ConfigError(
                "federated DP-SGD takes one global step per round: train.local_epochs must be "
                f"1, got {config.train.local_epochs}"
            )
        if config.strategy.server_optimizer != {"name": "fedavg", "lr": 1.0}:
            raise ConfigError(
                "federated DP-SGD applies plain SGD with train.lr on the server: "
                f"strategy.server_optimizer must be plain fedavg, got "
                f"{config.strategy.server_optimizer}"
            )
    if p.trust == "distributed":
        if p.accountant != "rdp":
            raise ConfigError(
                "privacy.accountant must be 'rdp' with trust='distributed' (the discrete "
                "mechanisms are bounded in RDP; PRV/PLD of the Gaussian would not bound them)"
            )
        if p.bits not in (32, 64):
            raise ConfigError(
                f"privacy.bits must be 32 or 64 with trust='distributed' (the secure-aggregation "
                f"ring), got {p.bits}"
            )
        if config.aggregation.name not in ("secagg", "secagg+"):
            raise ConfigError(
                "trust='distributed' adds noise under secure aggregation: aggregation.name must "
                "be 'secagg' or 'secagg+'"
            )
