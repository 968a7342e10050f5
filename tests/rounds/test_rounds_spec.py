"""One typed aggregation spec: validation, options, and configs that refuse a wrong option on load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl.errors import ConfigError
from secure_fl.rounds.spec import DRIVER_OPTIONS, OPTIONS, PROTOCOLS, AggregationSpec


@pytest.mark.parametrize(
    ("protocol", "options", "words"),
    [
        ("secagg", {"clip_range": 0}, "aggregation.clip_range must be a finite number in (0, inf)"),
        ("secagg", {"clip_range": float("nan")}, "aggregation.clip_range"),
        ("secagg", {"precision": 2.0}, "aggregation.precision must be a finite number in (0, 1)"),
        ("secagg", {"bits": 16}, "aggregation.bits must be one of [32, 64]"),
        ("secagg", {"threshold": 1}, "aggregation.threshold must be an integer >= 2"),
        ("secagg", {"threshold": 2.0}, "aggregation.threshold must be an integer >= 2"),
        (
            "secagg",
            {"dropout_rate": 0.5},
            "aggregation.dropout_rate must be a finite number in [0, 0.5)",
        ),
        ("secagg", {"corrupt_fraction": -0.1}, "aggregation.corrupt_fraction"),
        ("secagg", {"active": 1}, "aggregation.active must be true or false"),
        ("secagg+", {"k": 4}, "aggregation.threshold must be given when aggregation.k"),
        ("ckks", {"chunk_ciphertexts": 5000}, "chunk_ciphertexts must be an integer in [1, 4096]"),
        ("ckks", {"workers": 0}, "aggregation.workers"),
        ("plain", {"l2_clip": -1.0}, "aggregation.l2_clip"),
        ("rot13", {}, "aggregation.protocol must be one of"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(
    protocol: str, options: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        AggregationSpec.from_options(protocol, options)
    assert words in str(info.value)


def test_an_option_of_another_protocol_is_refused_listing_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        AggregationSpec.from_options("plain", {"threshold": 3}, where="aggregation.options")
    message = str(info.value)
    assert "aggregation.options" in message and "['threshold']" in message
    assert "allowed: ['l2_clip']" in message
    with pytest.raises(ConfigError, match=r"\['colour'\].*allowed: .*'seed'"):
        AggregationSpec.split_options("secagg", {"colour": "blue"})
    spec, rest = AggregationSpec.split_options("secagg+", {"seed": 4, "k": 4, "threshold": 3})
    assert rest == {"seed": 4} and spec.k == 4


@settings(max_examples=40, deadline=None)
@given(
    protocol=st.sampled_from(PROTOCOLS),
    clip=st.floats(1e-3, 1e3),
    l2=st.none() | st.floats(1e-3, 1e3),
    rate=st.floats(0.0, 0.49),
)
def test_options_round_trip_through_from_options(
    protocol: str, clip: float, l2: float | None, rate: float
) -> None:
    wanted = {"clip_range": clip, "l2_clip": l2, "dropout_rate": rate}
    options = {k: v for k, v in wanted.items() if k in OPTIONS[protocol]}
    spec = AggregationSpec.from_options(protocol, options)
    again = AggregationSpec.from_options(protocol, spec.options())
    assert again == spec
    assert json.loads(json.dumps(spec.options())) == spec.options()
    assert set(spec.options()) == set(OPTIONS[protocol])
    assert not set(DRIVER_OPTIONS[protocol]) & set(OPTIONS[protocol])


def test_the_transport_config_refuses_an_unknown_aggregation_key(tmp_path: Path) -> None:
    from secure_fl.transport.config import AggregationSettings, load_server_config
    from secure_fl.transport.provision import provision

    done = provision(tmp_path / "fed", ["a", "b"], ckks=False)
    data = json.loads(Path(done.server_config).read_text())
    assert load_server_config(done.server_config).aggregation == AggregationSpec("secagg+")
    assert AggregationSettings is AggregationSpec
    data["aggregation"]["treshold"] = 3
    Path(done.server_config).write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_server_config(done.server_config)
    assert "['treshold']" in str(info.value) and "'threshold'" in str(info.value)
    data["aggregation"] = {"protocol": "secagg", "threshold": 1}
    Path(done.server_config).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"aggregation\.threshold must be an integer >= 2"):
        load_server_config(done.server_config)


def test_a_wrong_aggregator_option_is_caught_when_the_training_config_loads(tmp_path: Path) -> None:
    from secure_fl.training import load_config

    path = tmp_path / "x.toml"
    path.write_text('[aggregation]\nname = "secagg+"\noptions = { dropuot_rate = 0.2 }\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "aggregation.options" in message and "dropuot_rate" in message
    assert "'dropout_rate'" in message  # the allowed options are listed
    path.write_text('[aggregation]\nname = "plain"\noptions = { threshold = 3 }\n')
    with pytest.raises(ConfigError, match="allowed: \\['l2_clip'\\]"):
        load_config(path)


def _imports_torch(modules: str) -> bool:
    code = f"import {modules}, sys; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip() == "True"


def test_reading_a_transport_config_imports_no_torch() -> None:
    assert not _imports_torch("secure_fl.transport.config, secure_fl.rounds.spec")


def test_reading_a_training_config_imports_no_torch() -> None:
    assert not _imports_torch("secure_fl.transport.config, secure_fl.training.config")
