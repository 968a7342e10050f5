"""Configuration files: TOML and YAML, validated with errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# ---------------------------------------------------------------------------------------------
# command-line overrides (simulate --set / --rounds) and configuration diffs (issue 14)


def test_overrides_are_applied_and_validated_as_the_file(tmp_path: Path) -> None:
    from secure_fl.training.config import parse_override

    path = _write(tmp_path, "c.toml", 'rounds = 3\n[train]\nlr = 0.01\n[data]\ndatalist = ""\n')
    overrides = [
        parse_override(text)
        for text in (
            "rounds=5",
            "train.lr=0.1",
            "aggregation.name=secagg+",
            "aggregation.options.dropout_rate=0.2",
            "preprocess.grid=[32, 32, 32]",
            "dropouts.2=['site-A']",
            "data.synthetic_dir=elsewhere",
        )
    ]
    config = load_config(path, overrides)
    assert config.rounds == 5 and config.train.lr == 0.1
    assert config.aggregation.name == "secagg+"
    assert config.aggregation.options == {"dropout_rate": 0.2}
    assert config.preprocess.grid == (32, 32, 32) and config.dropouts == {"2": ["site-A"]}
    # a path given on the command line is relative to the current folder, not to the file
    assert config.data.synthetic_dir == str(Path("elsewhere").resolve())
    with pytest.raises(ConfigError, match="dropouts: keys are round numbers from 1 to rounds=5"):
        load_config(path, [("rounds", 5), ("dropouts", {"6": ["site-A"]})])
    with pytest.raises(ConfigError, match=r"unknown key privacy\.epsilon; allowed keys in privacy"):
        load_config(path, [parse_override("privacy.epsilon=1")])


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("0.01", 0.01),
        ("1e-5", 1e-5),
        ("true", True),
        ("no", False),
        ('"x y"', "x y"),
        ("secagg+", "secagg+"),
        ("[16, 16, 16]", [16, 16, 16]),
        ("['a', 'b']", ["a", "b"]),
        ("{ seed = 1 }", {"seed": 1}),
    ],
)
def test_values_are_read_as_toml_scalars(text: str, value: object) -> None:
    from secure_fl.training.config import parse_override

    assert parse_override(f"some.key={text}") == ("some.key", value)


def test_config_diff_names_every_changed_key() -> None:
    from secure_fl.training import ExperimentConfig, TrainConfig
    from secure_fl.training.config import config_diff, describe_diff

    a = ExperimentConfig(rounds=3).to_dict()
    b = ExperimentConfig(rounds=4, seed=2, train=TrainConfig(lr=0.5)).to_dict()
    assert config_diff(a, a) == []
    diff = config_diff(a, b)
    assert [key for key, _, _ in diff] == ["rounds", "seed", "train.lr"]
    assert (
        describe_diff(diff) == f"rounds: 3 -> 4; seed: 0 -> 2; train.lr: {a['train']['lr']} -> 0.5"
    )
    assert "and 1 more" in describe_diff(diff, limit=2)
    del a["fedprox_mu"]
    assert config_diff(a, b)[0] == ("fedprox_mu", "(absent)", b["fedprox_mu"])


@given(
    value=st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.lists(st.integers(0, 512), max_size=4),
    )
)
def test_a_value_written_as_toml_reads_back(value: object) -> None:
    from secure_fl.training.config import parse_value

    text = json.dumps(value).replace("e+", "e")  # JSON numbers, booleans and lists are TOML too
    if isinstance(value, float) and "." not in text and "e" not in text:
        text += ".0"
    assert parse_value(text) == value


@given(
    old=st.dictionaries(
        st.sampled_from("abc"),
        st.integers(0, 3) | st.dictionaries(st.sampled_from("xy"), st.integers(0, 3)),
    ),
    new=st.dictionaries(
        st.sampled_from("abc"),
        st.integers(0, 3) | st.dictionaries(st.sampled_from("xy"), st.integers(0, 3)),
    ),
)
def test_config_diff_is_empty_exactly_when_equal(
    old: dict[str, object], new: dict[str, object]
) -> None:
    from secure_fl.training.config import config_diff

    diff = config_diff(old, new)
    assert (diff == []) == (old == new)
    assert [(k, b, a) for k, a, b in diff] == config_diff(new, old)


def test_an_option_added_since_a_run_was_written_is_not_a_difference_at_its_default() -> None:
    from secure_fl.training.config import ExperimentConfig, config_diff

    new = ExperimentConfig().to_dict()
    old = {k: v for k, v in new.items() if k != "strategy"}
    old["train"] = {k: v for k, v in new["train"].items() if k != "ema"}
    assert config_diff(old, new, ExperimentConfig().to_dict()) == []
    # Without the defaults, or with a non-default new value, it is one.
    assert [k for k, _, _ in config_diff(old, new)] == ["strategy", "train.ema"]
    changed = {**new, "train": {**new["train"], "ema": 0.9}}
    assert [k for k, _, _ in config_diff(old, changed, new)] == ["train.ema"]
