"""DP that learns, end to end: a checkpoint pretrained on the designated public cohort, then a
federated DP-SGD run that fine-tunes a trainable subset of it with every option switched on
(recorded in config.json, d logged, the ledger audited clean)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_config

from secure_fl.data import PreprocessConfig, load_datalist
from secure_fl.privacy import PrivacyConfig, audit_run
from secure_fl.training import ModelConfig, TrainConfig, run_experiment
from secure_fl.training.model import build_unet, get_state
from secure_fl.training.pretrain import PUBLIC_SEED_OFFSET, pretrain

MODEL = ModelConfig(channels=(4, 8, 16), num_res_units=1, norm="group")
PRE = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1)


@pytest.fixture(scope="module")
def public_checkpoint(tiny_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tiny_config(tiny_datalist, model=MODEL, preprocess=PRE)
    out = tmp_path_factory.mktemp("pretrain") / "ckpt" / "public.pt"
    result = pretrain(base, out, cases=4, epochs=1, threads=1)
    public = load_datalist(result.datalist)
    assert result.cases == 4 and len(public) == 4
    manifest = json.loads((result.datalist.parent / "manifest.json").read_text())
    assert manifest["params"]["seed"] == base.data.synthetic_seed + PUBLIC_SEED_OFFSET
    # Only the public cohort was read: it lives in its own folder, beside the checkpoint.
    assert result.datalist.parent == out.parent / "public-cohort"
    assert all(result.datalist.parent in c.image.parents for c in public)
    assert not any(tiny_datalist.parent in c.image.parents for c in public)
    return result.checkpoint


def test_pretraining_writes_a_checkpoint_that_model_pretrained_loads(
    public_checkpoint: Path,
) -> None:
    state = torch.load(public_checkpoint, weights_only=True)
    assert set(state) == set(get_state(build_unet(MODEL)))
    model = dataclasses.replace(MODEL, pretrained=str(public_checkpoint))
    assert all((get_state(build_unet(model))[k] == v.numpy()).all() for k, v in state.items())


@pytest.mark.slow
def test_dp_fine_tuning_of_the_public_checkpoint_with_every_option(
    public_checkpoint: Path, tiny_datalist: Path, tmp_path: Path
) -> None:
    state = torch.load(public_checkpoint, weights_only=True)
    model = dataclasses.replace(MODEL, pretrained=str(public_checkpoint))
    assert all((get_state(build_unet(model))[k] == v.numpy()).all() for k, v in state.items())
    train = TrainConfig(
        lr=3e-3,
        batch_size=2,
        device="cpu",
        trainable=("head", "norm"),
        augment_multiplicity=2,
        ema=0.9,
        max_physical_batch=1,
    )
    config = tiny_config(
        tiny_datalist,
        rounds=1,
        model=model,
        preprocess=PRE,
        train=train,
        privacy=PrivacyConfig(level="sample", target_epsilon=8.0, accountant="prv"),
    )
    lines: list[str] = []
    run_experiment(config, tmp_path / "run", log=lines.append)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["model"]["pretrained"] == str(public_checkpoint)
    assert recorded["train"]["trainable"] == ["head", "norm"]
    assert (recorded["train"]["augment_multiplicity"], recorded["train"]["ema"]) == (2, 0.9)
    assert any(line.startswith("trainable parameters d = ") for line in lines)
    final = torch.load(tmp_path / "run" / "models" / "fedavg.pt", weights_only=True)
    (global_state,) = final.values()
    frozen = [k for k in state if not k.startswith("model.2.") and ".adn.N." not in k]
    assert frozen and all(torch.equal(global_state[k], state[k]) for k in frozen)
    assert audit_run(tmp_path / "run").findings == []
