"""Configuration files: TOML and YAML, validated with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_fl.errors import ConfigError
from secure_fl.training import load_config


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_yaml_give_the_same_config(tmp_path: Path) -> None:
    toml = _write(
        tmp_path,
        "a.toml",
        'name = "x"\nrounds = 3\nstrategies = ["fedavg", "centralized"]\n'
        "[train]\nlr = 0.01\nlocal_epochs = 2\n"
        '[aggregation]\nname = "secagg+"\noptions = { dropout_rate = 0.2 }\n'
        "[preprocess]\ngrid = [32, 32, 32]\npatch = [16, 16, 16]\n",
    )
    yaml = _write(
        tmp_path,
        "a.yaml",
        "name: x\nrounds: 3\nstrategies: [fedavg, centralized]\n"
        "train: {lr: 0.01, local_epochs: 2}\n"
        "aggregation: {name: secagg+, options: {dropout_rate: 0.2}}\n"
        "preprocess: {grid: [32, 32, 32], patch: [16, 16, 16]}\n",
    )
    a, b = load_config(toml), load_config(yaml)
    assert a == b
    assert a.train.lr == 0.01 and a.preprocess.grid == (32, 32, 32)
    assert a.aggregation.options == {"dropout_rate": 0.2}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rounds = 3\nlearning_rate = 1\n", "unknown key learning_rate"),
        ("[train]\nlr_rate = 0.1\n", "unknown key train.lr_rate"),
        ('[train]\nlr = "fast"\n', "train.lr must be a finite number"),
        ("rounds = 2.5\n", "rounds must be an integer"),
        ("rounds = 0\n", "rounds must be >= 1"),
        ('strategies = ["fedsgd"]\n', "strategies"),
        ('[aggregation]\nname = "paillier"\n', "aggregation.name"),
        ("[preprocess]\ngrid = [32, 32]\n", "preprocess.grid must have 3 entries"),
        ("[preprocess]\npatch = [20, 20, 20]\n", "preprocess.patch"),
        ('[data]\ndatalist = "missing.json"\n', "data.datalist: file not found"),
        ("[train]\nbatch_size = 0\n", "train.batch_size"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, "c.toml", text))


def test_unparsable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(_write(tmp_path, "bad.toml", "rounds = = 3"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="must end in"):
        load_config(_write(tmp_path, "c.ini", "x"))


def test_shipped_configs_load() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    demo = load_config(configs / "demo.toml")
    assert demo.aggregation.name == "secagg+" and demo.rounds == 12
    compare = load_config(configs / "compare_quick.yaml")
    assert "centralized" in compare.strategies
