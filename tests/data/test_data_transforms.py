"""Preprocessing on synthetic NIfTI: config checks, shapes, binary labels, normalisation, outliers,
orientation, patch sampling, and the per-case errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from data_testutils import write_case, write_nifti
from monai.data import MetaTensor

from secure_fl.data.datalist import Case
from secure_fl.data.synthetic import site_profiles
from secure_fl.data.transforms import (
    BrainMaskd,
    PreprocessConfig,
    ZScoreInMaskd,
    eval_transforms,
    train_transforms,
)
from secure_fl.errors import ConfigError

CFG = PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16))
CLEAN_SITE = next(i for i, p in enumerate(site_profiles(2, seed=0)) if p.outliers == 0)


def _config_error(excinfo: pytest.ExceptionInfo[BaseException]) -> ConfigError | None:
    """MONAI wraps a transform's exception in RuntimeError; find our ConfigError in the chain."""
    error: BaseException | None = excinfo.value
    while error is not None:
        if isinstance(error, ConfigError):
            return error
        error = error.__cause__
    return None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": (7, 48, 48)}, r"PreprocessConfig\.grid must be three ints in \[8, 512\]"),
        ({"grid": (48, 48)}, r"PreprocessConfig\.grid"),
        ({"grid": (48.0, 48, 48)}, r"PreprocessConfig\.grid"),
        ({"patch": (64, 32, 32)}, r"PreprocessConfig\.patch must be three ints in \[4, grid\]"),
        ({"patch": (3, 32, 32)}, r"PreprocessConfig\.patch"),
        ({"samples_per_volume": 0}, r"samples_per_volume must be an int in \[1, 64\]"),
        ({"samples_per_volume": True}, r"samples_per_volume"),
        ({"pos_fraction": 1.5}, r"pos_fraction must be a number in \[0, 1\]"),
        ({"pos_fraction": float("nan")}, r"pos_fraction"),
        (
            {"percentiles": (50.0, 50.0)},
            r"percentiles must be \(low, high\) with 0 <= low < high <= 100",
        ),
        ({"percentiles": (-1.0, 99.0)}, r"percentiles"),
        ({"use_brainmask": "yes"}, r"use_brainmask must be a bool"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PreprocessConfig(**kwargs)


def test_config_defaults_and_lists() -> None:
    cfg = PreprocessConfig(grid=[40, 40, 40], patch=[16, 16, 16])  # type: ignore[arg-type]
    assert cfg.grid == (40, 40, 40) and cfg.patch == (16, 16, 16)
    assert PreprocessConfig().grid == (48, 48, 48)
    with pytest.raises(ConfigError, match="cfg must be a PreprocessConfig"):
        eval_transforms({"grid": (8, 8, 8)})  # type: ignore[arg-type]


def _inside_stats(image: torch.Tensor) -> tuple[float, float]:
    inside = image[image != 0].double()
    return float(inside.mean()), float(inside.std(unbiased=False))


def test_eval_shapes_binary_labels_and_normalisation(tmp_path: Path) -> None:
    case = write_case(tmp_path / "c0", site_index=CLEAN_SITE, seed=1)
    raw_label = np.asanyarray(nib.load(str(case.label)).dataobj)
    out = eval_transforms(CFG)(case.to_dict())
    assert set(out) == {"image", "label", "spacing", "site", "case_id"}
    assert out["spacing"].shape == (3,) and bool((out["spacing"] > 0).all())
    image, label = out["image"], out["label"]
    for tensor in (image, label):
        assert type(tensor) is torch.Tensor  # plain tensors, no MetaTensor
        assert tensor.shape == (1, 32, 32, 32) and tensor.dtype == torch.float32
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    mean, std = _inside_stats(image)
    assert abs(mean) < 1e-3 and abs(std - 1.0) < 1e-3
    # Whole-tumour share of the brain survives the crop and resize.
    raw_mask = np.asanyarray(nib.load(str(case.brainmask)).dataobj) > 0
    native_share = (raw_label > 0).sum() / raw_mask.sum()
    grid_share = float(label.sum()) / float((image != 0).sum())
    assert grid_share == pytest.approx(native_share, rel=0.3)
    assert out["site"] == "site-A" and out["case_id"] == "c0"


def test_without_brainmask_file_the_brain_comes_from_the_image(tmp_path: Path) -> None:
    with_mask = write_case(tmp_path / "m", site_index=CLEAN_SITE, seed=2)
    without = write_case(tmp_path / "n", site_index=CLEAN_SITE, seed=2, brainmask=False)
    assert without.brainmask is None
    a = eval_transforms(CFG)(with_mask.to_dict())
    b = eval_transforms(CFG)(without.to_dict())
    c = eval_transforms(
        PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16), use_brainmask=False)
    )(with_mask.to_dict())
    assert torch.equal(a["label"], b["label"]) and torch.equal(b["label"], c["label"])
    assert torch.allclose(a["image"], b["image"], atol=1e-4)
    assert torch.allclose(b["image"], c["image"], atol=1e-5)


def test_saturated_voxels_do_not_wreck_the_zscores(tmp_path: Path) -> None:
    clean = write_case(tmp_path / "clean", site_index=CLEAN_SITE, seed=3)

    def saturate(image: np.ndarray, case: Any) -> None:
        brain = np.flatnonzero((case.brainmask > 0) & (case.label == 0))
        image.reshape(-1)[brain[:: max(1, brain.size // 12)][:12]] = 1e6  # scanner saturation

    dirty = write_case(tmp_path / "dirty", site_index=CLEAN_SITE, seed=3, image_edit=saturate)
    reference = eval_transforms(CFG)(clean.to_dict())["image"]
    robust = eval_transforms(CFG)(dirty.to_dict())["image"]
    naive_cfg = PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16), percentiles=(0.0, 100.0))
    naive = eval_transforms(naive_cfg)(dirty.to_dict())["image"]

    inside = reference != 0
    corr = np.corrcoef(reference[inside].numpy(), robust[inside].numpy())[0, 1]
    assert corr > 0.98
    assert float(robust.abs().max()) < 8.0  # sane z-scores
    assert float((robust - reference)[inside].abs().median()) < 0.1

    # Without clipping, a dozen saturated voxels squash all normal tissue towards one value.
    def iqr(x: torch.Tensor) -> float:
        return float(torch.quantile(x, 0.75) - torch.quantile(x, 0.25))

    assert iqr(naive[inside]) < 0.3 * iqr(robust[inside])
    assert float(naive.abs().max()) > 20.0


def test_orientation_is_normalised_to_ras(tmp_path: Path) -> None:
    ras = write_case(tmp_path / "ras", site_index=CLEAN_SITE, seed=4)
    n = 32
    lps = np.array([[-1, 0, 0, n - 1], [0, -1, 0, n - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flipped = {}
    for key in ("image", "label", "brainmask"):
        data = np.asanyarray(nib.load(str(getattr(ras, key))).dataobj)
        flipped[key] = write_nifti(
            tmp_path / "lps" / f"{key}.nii.gz", data[::-1, ::-1, :].copy(), lps
        )
    lps_case = Case("lps", "site-A", flipped["image"], flipped["label"], flipped["brainmask"])
    a = eval_transforms(CFG)(ras.to_dict())
    b = eval_transforms(CFG)(lps_case.to_dict())
    assert torch.equal(a["label"], b["label"])
    assert torch.allclose(a["image"], b["image"], atol=1e-5)


def _centre_has_tumour(label: torch.Tensor) -> bool:
    # Patch centre is index size//2; a flip moves it to size//2 - 1: look at the central 2^3 block.
    c = [s // 2 for s in label.shape[1:]]
    return bool(label[0, c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1].any())


@pytest.mark.parametrize("pos_fraction", [0.0, 0.5, 1.0])
def test_train_patches_follow_pos_fraction(tmp_path: Path, pos_fraction: float) -> None:
    case = write_case(tmp_path / "c", site_index=CLEAN_SITE, seed=5)
    cfg = PreprocessConfig(
        grid=(32, 32, 32), patch=(8, 8, 8), samples_per_volume=64, pos_fraction=pos_fraction
    )
    transform = train_transforms(cfg)
    transform.set_random_state(seed=0)
    patches = [p for _ in range(3) for p in transform(case.to_dict())]
    assert len(patches) == 192
    for p in patches[:5]:
        assert set(p) == {"image", "label", "site", "case_id"}
        assert p["image"].shape == (1, 8, 8, 8) and p["label"].shape == (1, 8, 8, 8)
        assert type(p["image"]) is torch.Tensor and p["image"].dtype == torch.float32
        assert set(torch.unique(p["label"]).tolist()) <= {0.0, 1.0}
    share = np.mean([_centre_has_tumour(p["label"]) for p in patches])
    if pos_fraction == 1.0:
        assert all(bool(p["label"].any()) for p in patches)
        assert share > 0.9
    elif pos_fraction == 0.0:
        assert share < 0.1
    else:
        assert 0.35 < share < 0.7


def test_train_default_patch_shapes(tmp_path: Path) -> None:
    case = write_case(tmp_path / "c", seed=6)
    samples = train_transforms(PreprocessConfig())(case.to_dict())
    assert len(samples) == 2
    assert all(s["image"].shape == (1, 32, 32, 32) for s in samples)
    assert all(s["label"].shape == (1, 32, 32, 32) for s in samples)


def test_bad_cases_raise_config_errors(tmp_path: Path) -> None:
    nan_case = write_case(
        tmp_path / "nan",
        seed=7,
        image_edit=lambda image, case: image.__setitem__((5, 5, 5), np.nan),
    )
    with pytest.raises(RuntimeError) as excinfo:
        eval_transforms(CFG)(nan_case.to_dict())
    error = _config_error(excinfo)
    assert error is not None and "case nan: image holds NaN or Inf" in str(error)

    ok = write_case(tmp_path / "ok", seed=7)
    wrong = write_nifti(tmp_path / "wrong_label.nii.gz", np.zeros((30, 32, 32), np.uint8))
    mismatched = Case("mm", "s", ok.image, wrong, ok.brainmask)
    with pytest.raises(RuntimeError) as excinfo:
        eval_transforms(CFG)(mismatched.to_dict())
    error = _config_error(excinfo)
    assert error is not None and "label shape (30, 32, 32) differs from image shape" in str(error)

    image = MetaTensor(torch.ones(1, 8, 8, 8))
    with pytest.raises(ConfigError, match=r"channel-first shape \(C, D, H, W\)"):
        BrainMaskd()({"image": torch.ones(8, 8, 8), "label": torch.zeros(1, 8, 8, 8)})
    with pytest.raises(ConfigError, match="brain mask is empty"):
        BrainMaskd()({"image": image, "brainmask": torch.zeros(1, 8, 8, 8), "case_id": "z"})
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, 2:6, 2:6, 2:6] = 1
    with pytest.raises(ConfigError, match="case flat: image is constant inside the brain"):
        ZScoreInMaskd(keys=["image"])({"image": image, "brainmask": mask, "case_id": "flat"})


def test_eval_without_label_for_inference(tmp_path: Path) -> None:
    case = write_case(tmp_path / "c", seed=8)
    out = eval_transforms(CFG)({"image": str(case.image), "brainmask": str(case.brainmask)})
    assert set(out) == {"image", "spacing"} and out["image"].shape == (1, 32, 32, 32)
