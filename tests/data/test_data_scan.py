"""scan_brats_folder on fake BraTS folders (tiny NIfTI files written to tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_testutils import write_nifti

from secure_fl.data.datalist import load_datalist, scan_brats_folder, write_datalist
from secure_fl.errors import ConfigError

TINY = np.zeros((4, 4, 4), dtype=np.float32)


def _brats_case(root: Path, name: str, *, seg: bool = True, mask: bool = False) -> None:
    folder = root / name
    for modality in ("t1", "t1ce", "t2", "flair"):
        write_nifti(folder / f"{name}_{modality}.nii.gz", TINY)
    if seg:
        write_nifti(folder / f"{name}_seg.nii.gz", TINY.astype(np.uint8))
    if mask:
        write_nifti(folder / f"{name}_brainmask.nii.gz", TINY.astype(np.uint8))


def test_sites_from_brats_names(tmp_path: Path) -> None:
    names = [
        "Brats18_TCIA01_123_1",
        "Brats18_TCIA01_180_1",
        "BraTS19_CBICA_AAB_1",
        "Brats18_2013_10_1",
        "BraTS20_TCIA08_113_1",
    ]
    for name in names:
        _brats_case(tmp_path, name, mask=name.startswith("BraTS19"))
    (tmp_path / "README.txt").write_text("ignored: not a folder")
    (tmp_path / ".cache").mkdir()  # hidden folders are ignored
    cases = scan_brats_folder(tmp_path)
    assert [c.case_id for c in cases] == sorted(names)
    sites = {c.case_id: c.site for c in cases}
    assert sites == {
        "Brats18_TCIA01_123_1": "TCIA01",
        "Brats18_TCIA01_180_1": "TCIA01",
        "BraTS19_CBICA_AAB_1": "CBICA",
        "Brats18_2013_10_1": "2013",
        "BraTS20_TCIA08_113_1": "TCIA08",
    }
    by_id = {c.case_id: c for c in cases}
    assert by_id["BraTS19_CBICA_AAB_1"].brainmask is not None
    assert by_id["Brats18_TCIA01_123_1"].brainmask is None
    assert by_id["Brats18_TCIA01_123_1"].image.name == "Brats18_TCIA01_123_1_flair.nii.gz"
    assert by_id["Brats18_TCIA01_123_1"].label.name == "Brats18_TCIA01_123_1_seg.nii.gz"
    assert all(c.image.is_absolute() for c in cases)
    # Round trip through a datalist.
    assert load_datalist(write_datalist(cases, tmp_path / "dl.json", relative_to=tmp_path)) == cases


def test_names_without_institution_need_sites(tmp_path: Path) -> None:
    names = [f"BraTS2021_{i:05d}" for i in range(5)] + ["BraTS20_Training_001"]
    for name in names:
        _brats_case(tmp_path, name)
    with pytest.raises(ConfigError, match=r"6 case name\(s\) carry no institution.*sites=K"):
        scan_brats_folder(tmp_path)
    cases = scan_brats_folder(tmp_path, sites=2)
    assert [c.case_id for c in cases] == sorted(names)
    assert [c.site for c in cases] == ["site-A", "site-B"] * 3  # round-robin over sorted ids
    assert scan_brats_folder(tmp_path, sites=2) == cases
    for bad in (0, 7, True, "2"):
        with pytest.raises(ConfigError, match=r"sites must be an int in \[1, 6\]"):
            scan_brats_folder(tmp_path, sites=bad)  # type: ignore[arg-type]


def test_explicit_sites_override_names_and_custom_pattern(tmp_path: Path) -> None:
    for name in ("Brats18_TCIA01_1_1", "Brats18_CBICA_2_1", "Brats18_TCIA02_3_1"):
        _brats_case(tmp_path, name)
    assert {c.site for c in scan_brats_folder(tmp_path, sites=1)} == {"site-A"}
    cases = scan_brats_folder(tmp_path, site_pattern=r"^Brats18_([A-Z]+)")
    assert [c.site for c in cases] == ["CBICA", "TCIA", "TCIA"]
    with pytest.raises(ConfigError, match="not a valid regex"):
        scan_brats_folder(tmp_path, site_pattern="(")


def test_sample_layout(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        folder = tmp_path / f"brats_2013_pat000{i}_1"
        for name in ("flair", "label", "brainmask", "t1c"):
            write_nifti(folder / f"{name}.nii.gz", TINY)
    cases = scan_brats_folder(tmp_path, sites=3)
    assert [(c.case_id, c.site) for c in cases] == [
        ("brats_2013_pat0001_1", "site-A"),
        ("brats_2013_pat0002_1", "site-B"),
        ("brats_2013_pat0003_1", "site-C"),
    ]
    assert all(c.brainmask is not None and c.brainmask.name == "brainmask.nii.gz" for c in cases)
    assert all(c.label.name == "label.nii.gz" for c in cases)


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        scan_brats_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no case folders"):
        scan_brats_folder(tmp_path)
    _brats_case(tmp_path, "Brats18_TCIA01_1_1", seg=False)
    with pytest.raises(ConfigError, match=r"Brats18_TCIA01_1_1' has no segmentation"):
        scan_brats_folder(tmp_path)
    write_nifti(tmp_path / "Brats18_TCIA01_1_1" / "Brats18_TCIA01_1_1_seg.nii.gz", TINY)
    write_nifti(tmp_path / "Brats18_TCIA01_1_1" / "other_seg.nii.gz", TINY)
    with pytest.raises(ConfigError, match="more than one segmentation file"):
        scan_brats_folder(tmp_path)
    (tmp_path / "Brats18_TCIA01_1_1" / "other_seg.nii.gz").unlink()
    (tmp_path / "empty_case").mkdir()
    with pytest.raises(ConfigError, match="empty_case' has no FLAIR image"):
        scan_brats_folder(tmp_path)
