"""Multi-modal input: further MRI sequences in the datalist and the scan, stacked as channels."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from data_testutils import brats_sample_root, write_case, write_nifti

from secure_fl.data.datalist import Case, load_datalist, scan_brats_folder, write_datalist
from secure_fl.data.transforms import PreprocessConfig, eval_transforms, train_transforms
from secure_fl.errors import ConfigError


def _read(path: str) -> np.ndarray:
    image: Any = nib.load(path)
    return np.asanyarray(image.dataobj)


CFG = PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16), samples_per_volume=1)


def _config_error(excinfo: pytest.ExceptionInfo[BaseException]) -> ConfigError | None:
    """MONAI wraps a transform's exception in RuntimeError; find our ConfigError in the chain."""
    error: BaseException | None = excinfo.value
    while error is not None:
        if isinstance(error, ConfigError):
            return error
        error = error.__cause__
    return None


def _with_t1c(folder: Path, seed: int = 0) -> Case:
    """A synthetic case plus a T1c image (the FLAIR contrast inverted, with noise)."""
    case = write_case(folder, seed=seed)
    flair = _read(str(case.image)).astype(np.float32)
    rng = np.random.default_rng(seed)
    t1c = (flair.max() - flair + rng.normal(0, 0.05, flair.shape)).astype(np.float32)
    path = write_nifti(folder / "t1c.nii.gz", t1c)
    return dataclasses.replace(case, modalities={"t1c": path})


def test_case_modalities_round_trip_through_the_datalist(tmp_path: Path) -> None:
    case = _with_t1c(tmp_path / "a")
    assert case.to_dict()["t1c"] == str(tmp_path / "a" / "t1c.nii.gz")
    out = write_datalist([case], tmp_path / "dl.json", relative_to=tmp_path)
    (back,) = load_datalist(out)
    assert back == case and back.modalities == {"t1c": tmp_path / "a" / "t1c.nii.gz"}
    with pytest.raises(ConfigError, match="'flair' is not one of"):
        Case("x", "s", case.image, case.label, modalities={"flair": case.image})
    (tmp_path / "a" / "t1c.nii.gz").unlink()
    with pytest.raises(ConfigError, match=r"training\[0\]\.t1c: file .* does not exist"):
        load_datalist(out)


def test_scan_finds_the_further_sequences(tmp_path: Path) -> None:
    case = write_case(tmp_path / "Brats18_TCIA01_001_1", seed=1)
    folder = case.image.parent
    for name in ("Brats18_TCIA01_001_1_t1.nii.gz", "Brats18_TCIA01_001_1_t1ce.nii.gz"):
        write_nifti(folder / name, np.ones((32, 32, 32), np.float32))
    (found,) = scan_brats_folder(tmp_path)
    assert found.modalities == {
        "t1": folder / "Brats18_TCIA01_001_1_t1.nii.gz",
        "t1c": folder / "Brats18_TCIA01_001_1_t1ce.nii.gz",
    }


def test_two_modalities_stack_as_channels(tmp_path: Path) -> None:
    case = _with_t1c(tmp_path / "a", seed=2)
    cfg = dataclasses.replace(CFG, modalities=("flair", "t1c"))
    assert cfg.in_channels == 2
    out = eval_transforms(cfg)(case.to_dict())
    image = out["image"]
    assert image.shape == (2, 32, 32, 32) and "t1c" not in out
    flair_only = eval_transforms(CFG)(case.to_dict())["image"]
    assert torch.allclose(image[0], flair_only[0])  # channel 0 is the FLAIR, unchanged
    brain = image[0] != 0
    for c in range(2):  # each channel z-scored inside the brain on its own
        inside = image[c][brain].double()
        assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1) < 1e-2
    assert float((image[0][brain] * image[1][brain]).mean()) < -0.5  # inverted contrast kept
    patches = train_transforms(cfg)(case.to_dict())
    assert patches[0]["image"].shape == (2, 16, 16, 16)
    assert patches[0]["label"].shape == (1, 16, 16, 16)
    t1c_only = eval_transforms(dataclasses.replace(CFG, modalities=("t1c",)))(case.to_dict())
    assert torch.allclose(t1c_only["image"][0], image[1], atol=1e-5)


def test_a_missing_modality_names_the_case_and_the_modality(tmp_path: Path) -> None:
    case = _with_t1c(tmp_path / "a")
    cfg = dataclasses.replace(CFG, modalities=("flair", "t2"))
    with pytest.raises(RuntimeError) as excinfo:
        eval_transforms(cfg)(case.to_dict())
    error = _config_error(excinfo)
    assert error is not None
    assert "case a: no t2 image" in str(error) and "the case has ['flair', 't1c']" in str(error)
    for bad in ((), ("flair", "flair"), ("dwi",)):
        with pytest.raises(ConfigError, match=r"PreprocessConfig\.modalities"):
            PreprocessConfig(modalities=bad)


def test_brats_sample_flair_and_t1c() -> None:
    case = scan_brats_folder(brats_sample_root(), sites=1)[0]
    assert set(case.modalities) == {"t1c"}
    cfg = PreprocessConfig(grid=(48, 48, 48), patch=(32, 32, 32), modalities=("flair", "t1c"))
    out = eval_transforms(cfg)(case.to_dict())
    assert out["image"].shape == (2, 48, 48, 48) and out["label"].shape == (1, 48, 48, 48)
    # mm per grid voxel: the brain's bounding box (1 mm voxels, 2 voxels of margin each side)
    # over the 48 grid voxels.
    brain = _read(str(case.brainmask)) > 0.5
    brain |= _read(str(case.label)) > 0
    extent = [int(i.max() - i.min() + 1 + 4) for i in np.nonzero(brain)]
    expected = torch.tensor([e / 48 for e in extent], dtype=torch.float32)
    assert torch.allclose(out["spacing"], expected)
    with pytest.raises(RuntimeError) as excinfo:
        eval_transforms(dataclasses.replace(cfg, modalities=("flair", "t2")))(case.to_dict())
    error = _config_error(excinfo)
    assert error is not None and f"case {case.case_id}: no t2 image" in str(error)
