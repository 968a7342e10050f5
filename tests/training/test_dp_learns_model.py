"""DP that learns, the model side: group norm and weight standardisation under Opacus, batch norm
refused, pretrained checkpoints, the trainable subset (d shrinks), and the options in config.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dp_learns_helpers import Patches, dp_round
from torch import nn

from secure_fl.errors import ConfigError
from secure_fl.training import config_from_mapping
from secure_fl.training.finetune import (
    GROUPS,
    freeze_except,
    load_pretrained,
    select_parameters,
    trainable_dimension,
    trainable_summary,
)
from secure_fl.training.layers import WSConv3d, regroup_norms
from secure_fl.training.model import ModelConfig, build_unet, get_state

SMALL = {"channels": (4, 8, 16), "num_res_units": 1}


def test_group_norm_builds_at_every_width_including_the_two_class_output() -> None:
    net = build_unet(ModelConfig(norm="group", norm_groups=4, **SMALL))  # type: ignore[arg-type]
    groups = {m.num_channels: m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {2: 2, 4: 4, 8: 4, 16: 4}
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    with pytest.raises(ConfigError, match=r"model\.norm_groups"):
        ModelConfig(norm="group", norm_groups=0)
    with pytest.raises(ConfigError, match=r"model\.norm_groups"):
        regroup_norms(net, 0)


def test_weight_standardisation_swaps_the_convs_that_feed_a_norm_and_keeps_the_state() -> None:
    torch.manual_seed(0)
    plain = build_unet(ModelConfig(norm="group", **SMALL))  # type: ignore[arg-type]
    torch.manual_seed(0)
    ws = build_unet(ModelConfig(norm="group", weight_standardisation=True, **SMALL))  # type: ignore[arg-type]
    swapped = [m for m in ws.modules() if isinstance(m, WSConv3d)]
    assert len(swapped) == 4  # the output conv and the residual projections stay plain
    assert get_state(plain).keys() == get_state(ws).keys()
    x = torch.randn(1, 1, 16, 16, 16)
    assert not torch.allclose(plain(x), ws(x))
    # The kernel a WSConv3d uses has zero mean and unit variance per output channel.
    conv = swapped[0]
    w = conv.weight.reshape(conv.out_channels, -1)
    used = (w - w.mean(1, keepdim=True)) / (w.std(1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(used.mean(1), torch.zeros(conv.out_channels), atol=1e-5)
    assert torch.allclose(used.std(1, unbiased=False), torch.ones(conv.out_channels), atol=1e-3)


@pytest.mark.parametrize("norm,ws", [("group", True), ("instance", True), ("group", False)])
def test_norm_and_ws_models_train_one_dp_sgd_round_under_opacus(norm: str, ws: bool) -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(channels=(4, 8), num_res_units=1, norm=norm, weight_standardisation=ws)
    net = build_unet(cfg)
    before = get_state(net)
    result = dp_round(net, Patches(4))
    assert result.steps == 2 and result.sample_rate == 0.5
    after = get_state(net)
    assert any(
        not torch.equal(torch.from_numpy(before[k]), torch.from_numpy(after[k])) for k in before
    )


def test_batch_norm_is_refused_by_dp_sgd_with_a_clear_error() -> None:
    net = build_unet(ModelConfig(channels=(4, 8), num_res_units=1, norm="batch"))
    with pytest.raises(ConfigError, match=r"model.norm = 'batch'.*'group' or 'instance'"):
        dp_round(net, Patches(4))


def test_pretrained_checkpoint_is_loaded_and_a_bad_one_is_named(tmp_path: Path) -> None:
    cfg = ModelConfig(norm="group", **SMALL)  # type: ignore[arg-type]
    torch.manual_seed(3)
    source = build_unet(cfg)
    ckpt = tmp_path / "public.pt"
    torch.save(source.state_dict(), ckpt)
    torch.manual_seed(99)
    loaded = build_unet(ModelConfig(norm="group", pretrained=str(ckpt), **SMALL))  # type: ignore[arg-type]
    assert all((get_state(loaded)[k] == v).all() for k, v in get_state(source).items())
    with pytest.raises(ConfigError, match=r"model.pretrained: checkpoint file not found: .*nope"):
        build_unet(ModelConfig(pretrained=str(tmp_path / "nope.pt"), **SMALL))  # type: ignore[arg-type]
    other = build_unet(ModelConfig(channels=(4, 8), num_res_units=1, norm="group"))
    with pytest.raises(ConfigError, match=r"public\.pt does not fit model.*missing"):
        load_pretrained(other, str(ckpt))
    wider = build_unet(ModelConfig(channels=(8, 8, 16), num_res_units=1, norm="group"))
    with pytest.raises(ConfigError, match=r"public\.pt: .* has shape"):
        load_pretrained(wider, str(ckpt))
    junk = tmp_path / "junk.pt"
    torch.save({"a": 1}, junk)
    with pytest.raises(ConfigError, match=r"junk\.pt is not a state dict"):
        load_pretrained(other, str(junk))


def test_trainable_patterns_freeze_the_rest_and_shrink_d() -> None:
    net = build_unet(ModelConfig(norm="group", **SMALL))  # type: ignore[arg-type]
    total = trainable_dimension(net)
    d = freeze_except(net, ["head", "norm"])
    assert 0 < d < total / 4
    assert d == trainable_dimension(net)
    for name, p in net.named_parameters():
        assert p.requires_grad == (name.startswith("model.2.") or ".adn.N." in name)
    assert freeze_except(net, []) == total
    for group in GROUPS:
        assert select_parameters(net, [group])
    assert select_parameters(net, ["model.0.*"]) == {
        n for n, _ in net.named_parameters() if n.startswith("model.0.")
    }
    with pytest.raises(ConfigError, match=r"train.trainable\[1\]='decodr' selects no parameter"):
        freeze_except(net, ["head", "decodr"])
    inst = build_unet(ModelConfig(**SMALL))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"use model\.norm='group'"):
        freeze_except(inst, ["norm"])
    line = trainable_summary(ModelConfig(norm="group", **SMALL), ["head", "norm"])  # type: ignore[arg-type]
    assert line.startswith(f"trainable parameters d = {d:,} of {total:,}")


def test_frozen_parameters_do_not_move_under_dp_sgd() -> None:
    torch.manual_seed(2)
    net = build_unet(ModelConfig(channels=(4, 8), num_res_units=1, norm="group"))
    freeze_except(net, ["head"])
    before = get_state(net)
    dp_round(net, Patches(4))
    after = get_state(net)
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved and all(k.startswith("model.2.") for k in moved)
    freeze_except(net, ["model.2.*"])
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        dp_round(net, Patches(4))


def test_the_options_load_from_a_config_and_are_recorded(tmp_path: Path) -> None:
    values = {
        "model": {
            "norm": "group",
            "norm_groups": 8,
            "weight_standardisation": True,
            "pretrained": "public.pt",
        },
        "train": {
            "trainable": ["decoder", "norm"],
            "augment_multiplicity": 4,
            "ema": 0.999,
            "max_physical_batch": 8,
        },
        "data": {"synthetic_cases": [64]},
    }
    resolved = config_from_mapping(values).to_dict()
    for section, entries in values.items():
        for key, value in entries.items():  # type: ignore[attr-defined]
            assert resolved[section][key] == value
    for key, value, match in [
        ("augment_multiplicity", 0, r"train.augment_multiplicity must be an int in \[1, 64\]"),
        ("ema", 1.0, r"train.ema must be in \(0, 1\)"),
        ("max_physical_batch", 0, "train.max_physical_batch must be an int >= 1"),
        ("trainable", [""], r"train.trainable\[0\]"),
        ("trainable", ["norm", "norm"], "must not repeat"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_mapping({"train": {key: value}})
    with pytest.raises(ConfigError, match=r"model\.weight_standardisation must be true or false"):
        config_from_mapping({"model": {"weight_standardisation": 1}})
