"""The pipeline on real scans: the shared BraTS 2013 sample (skipped when it is absent).

The sample lives beside the repository (../shared/data/brats2013_sample) or at
$SECURE_FL_BRATS_SAMPLE; it is read in place, never copied.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from data_testutils import brats_sample_root

from secure_fl.data.datalist import scan_brats_folder, split_by_site
from secure_fl.data.loaders import make_dataset, make_loader
from secure_fl.data.transforms import PreprocessConfig, eval_transforms
from secure_fl.errors import ConfigError

CFG = PreprocessConfig(grid=(48, 48, 48), patch=(32, 32, 32))


def test_scan_the_sample_needs_explicit_sites() -> None:
    root = brats_sample_root()
    with pytest.raises(ConfigError, match="carry no institution"):
        scan_brats_folder(root)
    cases = scan_brats_folder(root, sites=3)
    assert len(cases) == 6
    assert [c.site for c in cases] == ["site-A", "site-B", "site-C"] * 2
    assert all(c.brainmask is not None and c.brainmask.name == "brainmask.nii.gz" for c in cases)
    split = split_by_site(cases, val_fraction=0.5)
    assert {site: (len(tr), len(va)) for site, (tr, va) in split.items()} == {
        "site-A": (1, 1),
        "site-B": (1, 1),
        "site-C": (1, 1),
    }


def test_real_case_through_eval_transforms() -> None:
    case = scan_brats_folder(brats_sample_root(), sites=1)[1]
    raw_label = np.asanyarray(nib.load(str(case.label)).dataobj)
    raw_flair = np.asanyarray(nib.load(str(case.image)).dataobj)
    assert raw_flair.shape == (240, 240, 155)
    out = eval_transforms(CFG)(case.to_dict())
    image, label = out["image"], out["label"]
    assert image.shape == (1, 48, 48, 48) and label.shape == (1, 48, 48, 48)
    assert image.dtype == torch.float32 and label.dtype == torch.float32
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    # Whole tumour survives the crop to the brain and the 240x240x155 -> 48^3 resize: its share of
    # the brain stays close to the native share.
    brain = image != 0
    native_share = (raw_label > 0).sum() / (
        np.asanyarray(nib.load(str(case.brainmask)).dataobj) > 0.5
    ).sum()
    assert float(label.sum()) / float(brain.sum()) == pytest.approx(native_share, rel=0.25)
    assert not bool(label[~brain].any())
    # Normalised inside the brain; the scan's saturated tail (max ~ 7 z-units above the brain's
    # mean, above the 99.5th percentile) is clipped.
    inside = image[brain].double()
    assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std(unbiased=False)) - 1) < 1e-3
    assert float(image.max()) < float(raw_flair.max())
    assert float(image.max()) < 6.0


@pytest.mark.slow
def test_all_sample_cases_train_loader() -> None:
    cases = scan_brats_folder(brats_sample_root(), sites=2)
    dataset = make_dataset(cases, CFG, train=True, cache_workers=2)
    batches = list(make_loader(dataset, batch_size=2, shuffle=True, seed=0))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 1, 32, 32, 32)
        assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}
    share = np.mean([bool(b["label"][i].any()) for b in batches for i in range(4)])
    assert share >= 0.5
