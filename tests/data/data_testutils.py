"""Helpers shared by the tests in tests/data (imported as a plain module, like tests/secagg/harness)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from secure_fl.data.datalist import Case
from secure_fl.data.synthetic import site_profiles, synthesize_case

ENV_SAMPLE = "SECURE_FL_BRATS_SAMPLE"


def brats_sample_root() -> Path:
    """The shared BraTS 2013 sample: $SECURE_FL_BRATS_SAMPLE, else ../shared/data/brats2013_sample
    beside the repository. Skips the calling test when it is absent."""
    override = os.environ.get(ENV_SAMPLE)
    root = (
        Path(override)
        if override
        else Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "brats2013_sample"
    )
    if not root.is_dir():
        pytest.skip(f"BraTS sample not found at {root} (set {ENV_SAMPLE} to point at it)")
    return root.resolve()


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def write_case(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (32, 32, 32),
    seed: int = 0,
    site_index: int = 0,
    brainmask: bool = True,
    image_edit: object = None,
    case_id: str | None = None,
    site: str = "site-A",
) -> Case:
    """Write one synthetic case (flair, label, [brainmask]) into ``folder``; ``image_edit`` is an
    optional callable that modifies the image array in place before it is written."""
    profile = site_profiles(2, seed=0)[site_index]
    case = synthesize_case(shape, profile, np.random.default_rng(seed))
    image = case.image.copy()
    if callable(image_edit):
        image_edit(image, case)
    img = write_nifti(folder / "flair.nii.gz", image)
    lab = write_nifti(folder / "label.nii.gz", case.label)
    mask = write_nifti(folder / "brainmask.nii.gz", case.brainmask) if brainmask else None
    return Case(case_id=case_id or folder.name, site=site, image=img, label=lab, brainmask=mask)
