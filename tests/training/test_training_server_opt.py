"""The server optimiser in the simulated FedAvg: config, checkpointed state, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import tiny_config

from secure_fl.aggregators.server_opt import make_server_optimizer
from secure_fl.errors import ConfigError
from secure_fl.training import load_config, run_experiment
from secure_fl.training.config import StrategyConfig
from secure_fl.training.strategies import SERVER_OPTIMIZER_KEY, apply_server_optimizer


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_toml_table_is_resolved_and_validated(tmp_path: Path) -> None:
    good = _write(
        tmp_path / "a.toml",
        '[strategy.server_optimizer]\nname = "fedadam"\nlr = 0.1\n',
    )
    cfg = load_config(good)
    assert cfg.strategy.server_optimizer == {
        "name": "fedadam",
        "lr": 0.1,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }
    assert load_config(_write(tmp_path / "b.toml", "")).strategy.server_optimizer == {
        "name": "fedavg",
        "lr": 1.0,
    }
    bad = _write(tmp_path / "c.toml", '[strategy.server_optimizer]\nname = "fedadam"\ntau = 0\n')
    with pytest.raises(ConfigError, match=r"strategy\.server_optimizer\.tau must be"):
        load_config(bad)
    bad = _write(tmp_path / "d.toml", '[strategy.server_optimizer]\nname = "fedavgm"\nbeta1 = 1\n')
    with pytest.raises(ConfigError, match=r"strategy\.server_optimizer\.beta1 .*lr, momentum"):
        load_config(bad)
    over = load_config(good, [("strategy.server_optimizer.name", "fedavgm")])
    with pytest.raises(ConfigError, match="momentum"):
        StrategyConfig({"name": "fedavgm", "momentum": 2})
    assert over.strategy.server_optimizer == {"name": "fedavgm", "lr": 0.1, "momentum": 0.9}


def test_the_optimiser_state_in_the_strategy_state_continues_exactly() -> None:
    """Two rounds in one go equal one round, a 'checkpoint' of the strategy state, another."""
    rng = np.random.default_rng(0)
    means = [
        {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(4)}
        for _ in range(2)
    ]
    opt = make_server_optimizer("fedadam", lr=0.1)
    ref = make_server_optimizer("fedadam", lr=0.1)
    state: dict = {"global": {}}
    for mean in means:
        out: dict = {}
        step = apply_server_optimizer(opt, state, mean, out)
        flat = np.concatenate([np.asarray(mean[k], np.float64).ravel() for k in ("a", "b")])
        expected = ref.step(flat)
        got = np.concatenate([step["a"].ravel(), step["b"].ravel()])
        np.testing.assert_allclose(got, expected.astype(np.float32))
        assert step["a"].shape == (2, 3) and step["a"].dtype == np.float32
        # the state the runner checkpoints: arrays only, copied through torch as the runner does
        state = {
            "global": {},
            SERVER_OPTIMIZER_KEY: {
                k: torch.from_numpy(np.ascontiguousarray(v)).numpy()
                for k, v in out[SERVER_OPTIMIZER_KEY].items()
            },
        }
    assert int(state[SERVER_OPTIMIZER_KEY]["steps"][0]) == 2
    # plain FedAvg keeps no state and returns the mean itself
    out = {}
    step = apply_server_optimizer(make_server_optimizer(), {"global": {}}, means[0], out)
    assert out == {}
    np.testing.assert_array_equal(step["a"], means[0]["a"])


def test_fedadam_run_resumes_to_the_same_model(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=2,
        strategy=StrategyConfig({"name": "fedadam", "lr": 0.01}),
    )
    run_experiment(config, tmp_path / "straight", log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "crashed", log=lambda _: None, stop_after=("fedavg", 1))
    ckpt = torch.load(tmp_path / "crashed" / "checkpoints" / "fedavg.pt", weights_only=True)
    assert set(ckpt["state"][SERVER_OPTIMIZER_KEY]) == {"m", "v", "steps", "length"}
    run_experiment(config, tmp_path / "crashed", log=lambda _: None)
    a = torch.load(tmp_path / "straight" / "models" / "fedavg.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "models" / "fedavg.pt", weights_only=True)
    assert set(a) == {"global"}  # the optimiser state is not a model
    for name, tensor in a["global"].items():
        assert torch.equal(tensor, b["global"][name]), name
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["strategy"]["server_optimizer"]["name"] == "fedadam"
    assert "fedadam" in (tmp_path / "straight" / "report.md").read_text()


def test_site_level_dp_refuses_a_server_optimiser(tiny_datalist: Path, tmp_path: Path) -> None:
    from secure_fl.privacy import PrivacyConfig

    config = tiny_config(
        tiny_datalist,
        strategy=StrategyConfig({"name": "fedavgm"}),
        privacy=PrivacyConfig(level="site", noise_multiplier=1.0, clip=0.5),
    )
    with pytest.raises(ConfigError, match=r"strategy\.server_optimizer must be plain fedavg"):
        run_experiment(config, tmp_path / "run", log=lambda _: None)
