"""Site-level DP-FedAvg with ``train.trainable``: only the trainable entries are flattened,
clipped and noised (the mechanism's dimension is d), the frozen ones are released untouched, and
a site that changes a frozen parameter is refused (it would escape the noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from training_helpers import tiny_config

from secure_fl.data import load_datalist
from secure_fl.errors import ProtocolError
from secure_fl.training import ModelConfig, TrainConfig
from secure_fl.training.dp_fedavg import DPFedAvg, SiteDP
from secure_fl.training.runner import build_federation
from secure_fl.training.strategies import Federation
from secure_fl.training.strategies import _train as real_train

MODEL = ModelConfig(channels=(4, 8), num_res_units=0, norm="group")


def _federation(datalist: Path, trainable: tuple[str, ...]) -> Federation:
    train = TrainConfig(lr=3e-2, batch_size=2, device="cpu", trainable=trainable)
    config = tiny_config(datalist, model=MODEL, train=train)
    return build_federation(config, load_datalist(datalist), pooled=False)


def _strategy(trust: str = "central") -> DPFedAvg:
    mechanism = "gaussian" if trust == "central" else "discrete_gaussian"
    dp = SiteDP(noise_multiplier=1.0, clip=0.5, trust=trust, mechanism=mechanism)
    return DPFedAvg(dp, aggregator="plain" if trust == "central" else "secagg")


def test_only_trainable_entries_are_clipped_noised_and_moved(tiny_datalist: Path) -> None:
    fed = _federation(tiny_datalist, ("head", "norm"))
    strategy = _strategy()
    frozen = strategy.frozen_keys(fed)
    current = dict(fed.initial)
    trainable = [k for k in current if k not in frozen]
    assert frozen and trainable and not any("norm" in k or "adn.N" in k for k in frozen)
    d = sum(int(current[k].size) for k in trainable)
    assert d < sum(int(v.size) for v in current.values())
    new, _ = strategy.run_round(fed, strategy.init_state(fed), 0)
    glob = new["global"]
    assert list(glob) == list(current)
    assert all(np.array_equal(glob[k], current[k]) for k in frozen)  # no noise on frozen weights
    assert all(not np.array_equal(glob[k], current[k]) for k in trainable)
    assert strategy.last_round["dp_dimension"] == d
    # a round in which no site is sampled releases pure noise - on the trainable entries only
    noisy = strategy._noise_only(current, 1, 1.0, fed)["global"]
    assert all(np.array_equal(noisy[k], current[k]) for k in frozen)
    assert all(not np.array_equal(noisy[k], current[k]) for k in trainable)


def test_without_trainable_or_with_distributed_noise_the_whole_model_is_released(
    tiny_datalist: Path,
) -> None:
    assert _strategy().frozen_keys(_federation(tiny_datalist, ())) == frozenset()
    fed = _federation(tiny_datalist, ("head", "norm"))
    assert _strategy("distributed").frozen_keys(fed) == frozenset()


def test_a_site_that_changes_a_frozen_parameter_is_refused(
    tiny_datalist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = _federation(tiny_datalist, ("head",))
    strategy = _strategy()
    frozen = sorted(strategy.frozen_keys(fed))

    def leaky(site, weights, round_id, name):  # type: ignore[no-untyped-def]
        local = dict(real_train(site, weights, round_id, name))
        local[frozen[0]] = local[frozen[0]] + 1.0
        return local

    monkeypatch.setattr("secure_fl.training.dp_fedavg._train", leaky)
    with pytest.raises(ProtocolError, match=r"changed parameters that train\.trainable freezes"):
        strategy.run_round(fed, strategy.init_state(fed), 0)


def test_a_fine_tuning_site_level_run_audits_clean(tiny_datalist: Path, tmp_path: Path) -> None:
    from secure_fl.privacy import PrivacyConfig, audit_run
    from secure_fl.training import run_experiment

    train = TrainConfig(lr=3e-2, batch_size=2, device="cpu", trainable=("head", "norm"))
    privacy = PrivacyConfig(level="site", target_epsilon=8.0, clip=0.5)
    config = tiny_config(tiny_datalist, model=MODEL, train=train, privacy=privacy)
    run_experiment(config, tmp_path / "run", log=lambda _: None)
    result = audit_run(tmp_path / "run")
    assert result.ok, [f"{f.code}: {f.message}" for f in result.problems]
