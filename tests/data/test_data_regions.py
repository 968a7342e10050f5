"""BraTS sub-regions: the label mapping per scheme, refusals, and the preprocessing of a target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from data_testutils import brats_sample_root, write_case

from secure_fl.data.datalist import scan_brats_folder
from secure_fl.data.regions import datalist_label_scheme, scheme_values, target_labels
from secure_fl.data.synthetic import generate_federation
from secure_fl.data.transforms import PreprocessConfig, TumourRegiond, eval_transforms
from secure_fl.errors import ConfigError


def _read(path: str) -> np.ndarray:
    image: Any = nib.load(path)
    return np.asanyarray(image.dataobj)


def test_label_mapping_of_every_scheme() -> None:
    assert target_labels("whole_tumour", None) == ()  # label > 0, whatever the scheme
    assert target_labels("tumour_core", "brats") == (1, 3, 4)
    assert target_labels("enhancing_tumour", "brats") == (4,)
    assert target_labels("tumour_core", "brats2023") == (1, 3)
    assert target_labels("enhancing_tumour", "brats2023") == (3,)
    assert target_labels("tumour_core", "synthetic") == (2,)
    assert scheme_values("brats") == {0, 1, 2, 3, 4}
    assert scheme_values("synthetic") == {0, 1, 2}


def test_a_sub_region_the_labels_cannot_express_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match="'enhancing_tumour' cannot be expressed with the "
        "'synthetic' labels \\(1 oedema, 2 tumour core\\)",
    ):
        target_labels("enhancing_tumour", "synthetic")
    with pytest.raises(ConfigError, match="'tumour_core' cannot be expressed with the 'binary'"):
        target_labels("tumour_core", "binary")
    with pytest.raises(ConfigError, match="needs to know what the label values mean"):
        target_labels("tumour_core", None)
    with pytest.raises(ConfigError, match=r"data\.target must be one of"):
        target_labels("necrosis", "brats")
    with pytest.raises(ConfigError, match=r"data\.label_scheme must be one of"):
        target_labels("tumour_core", "brats2099")


def test_datalist_declares_its_scheme(tmp_path: Path) -> None:
    synthetic = generate_federation(tmp_path / "fed", sites=2, cases_per_site=1, shape=(16,) * 3)
    assert datalist_label_scheme(synthetic) == "synthetic"  # from its "labels" table
    doc = {"label_scheme": "brats", "training": []}
    (tmp_path / "b.json").write_text(json.dumps(doc))
    assert datalist_label_scheme(tmp_path / "b.json") == "brats"
    (tmp_path / "n.json").write_text(json.dumps({"training": []}))
    assert datalist_label_scheme(tmp_path / "n.json") is None
    (tmp_path / "x.json").write_text(json.dumps({"label_scheme": "mine"}))
    with pytest.raises(ConfigError, match="label_scheme must be one of"):
        datalist_label_scheme(tmp_path / "x.json")


def test_region_transform_maps_brats_labels() -> None:
    label = torch.tensor([[[[0, 1, 2, 3, 4]]]], dtype=torch.float32)
    core = TumourRegiond(keys=["label"], labels=target_labels("tumour_core", "brats"))
    assert core({"label": label})["label"].flatten().tolist() == [0, 1, 0, 1, 1]
    enhancing = TumourRegiond(keys=["label"], labels=(4,))
    assert enhancing({"label": label})["label"].flatten().tolist() == [0, 0, 0, 0, 1]
    whole = TumourRegiond(keys=["label"])
    assert whole({"label": label})["label"].flatten().tolist() == [0, 1, 1, 1, 1]


def test_preprocess_foreground_is_validated() -> None:
    assert PreprocessConfig(foreground=(4, 1, 3)).foreground == (1, 3, 4)
    for bad in ((0,), (1, 1), (256,), ("1",)):
        with pytest.raises(ConfigError, match=r"PreprocessConfig\.foreground"):
            PreprocessConfig(foreground=bad)  # type: ignore[arg-type]


def test_tumour_core_target_on_a_synthetic_case(tmp_path: Path) -> None:
    case = write_case(tmp_path / "c", seed=3)
    raw = _read(str(case.label))
    assert (raw == 1).any() and (raw == 2).any()
    cfg = PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16))
    whole = eval_transforms(cfg)(case.to_dict())["label"]
    core_cfg = PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16), foreground=(2,))
    core = eval_transforms(core_cfg)(case.to_dict())["label"]
    # The core is inside the whole tumour and strictly smaller; its share follows the raw one.
    assert bool((core <= whole).all()) and 0 < float(core.sum()) < float(whole.sum())
    native = float((raw == 2).sum()) / float((raw > 0).sum())
    assert float(core.sum()) / float(whole.sum()) == pytest.approx(native, rel=0.3)


def test_brats_sample_sub_regions_nest() -> None:
    case = scan_brats_folder(brats_sample_root(), sites=1)[0]
    raw = _read(str(case.label))
    assert set(np.unique(raw).tolist()) <= scheme_values("brats")
    grid = PreprocessConfig(grid=(48, 48, 48), patch=(32, 32, 32))
    sums = []
    for target in ("whole_tumour", "tumour_core", "enhancing_tumour"):
        cfg = PreprocessConfig(
            grid=grid.grid, patch=grid.patch, foreground=target_labels(target, "brats")
        )
        sums.append(float(eval_transforms(cfg)(case.to_dict())["label"].sum()))
    assert sums[0] > sums[1] > sums[2] > 0
