"""``model.pretrained`` in a config file is a path like ``data.datalist`` (relative to the file),
and ``secure-fl pretrain CONFIG OUT`` writes a checkpoint that loads as ``model.pretrained``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from secure_fl.cli import main
from secure_fl.training import load_config
from secure_fl.training.config import parse_override
from secure_fl.training.model import build_unet, get_state


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c.toml"
    path.write_text(text)
    return path


def test_relative_pretrained_path_is_taken_from_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "configs", '[model]\npretrained = "../ckpt/public.pt"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the config's folder: the file decides
    config = load_config(path)
    assert config.model.pretrained == str((tmp_path / "ckpt" / "public.pt").resolve())
    absolute = tmp_path / "abs.pt"
    config = load_config(_write(tmp_path / "b", f'[model]\npretrained = "{absolute}"\n'))
    assert config.model.pretrained == str(absolute)
    # on the command line (--set), relative to the current folder, like data.datalist
    config = load_config(path, [parse_override('model.pretrained="mine.pt"')])
    assert config.model.pretrained == str((elsewhere / "mine.pt").resolve())
    assert load_config(_write(tmp_path / "c", "rounds = 2\n")).model.pretrained is None


def test_pretrain_cli_writes_a_loadable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(
        tmp_path,
        "[data]\nsynthetic_shape = [16, 16, 16]\n"
        "[preprocess]\ngrid = [16, 16, 16]\npatch = [8, 8, 8]\nsamples_per_volume = 1\n"
        '[model]\nchannels = [2, 4]\nnum_res_units = 0\nnorm = "group"\n'
        '[train]\ndevice = "cpu"\nbatch_size = 2\n',
    )
    out = tmp_path / "ckpt" / "public.pt"
    args = ["pretrain", str(config), str(out), "--cases", "2", "--epochs", "1"]
    assert main(args) == 0
    assert "use it with model.pretrained" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "public-cohort" / "datalist.json").is_file()
    model = dataclasses.replace(load_config(config).model, pretrained=str(out))
    state = torch.load(out, weights_only=True)
    loaded = get_state(build_unet(model))
    assert set(state) == set(loaded)
    assert all((loaded[k] == v.numpy()).all() for k, v in state.items())


def test_pretrain_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.pt"
    assert main(["pretrain", str(tmp_path / "missing.toml"), str(out)]) == 2
    assert "config file not found" in capsys.readouterr().err
    config = _write(tmp_path, "rounds = 1\n")
    assert main(["pretrain", str(config), str(out), "--epochs", "0"]) == 2
    assert main(["pretrain", str(config), str(out), "--cases", "20000"]) == 2
    assert "cases must be an int in [1, 10000]" in capsys.readouterr().err
    assert not out.exists()
