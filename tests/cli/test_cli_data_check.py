"""``secure-fl data check DATALIST``: ``ok: N cases``, or one ``error: <file>: <reason>`` line per
bad case on stderr and exit status 2; never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from secure_fl.cli import main

SHAPE = (12, 12, 12)


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def _datalist(root: Path, n: int = 3) -> tuple[Path, list[dict[str, str]]]:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        folder = root / f"case{i}"
        image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[4:8, 4:8, 4:8] = 1 + i % 2
        entries.append(
            {
                "case_id": f"case{i}",
                "site": f"site-{'AB'[i % 2]}",
                "image": str(_nifti(folder / "flair.nii.gz", image)),
                "label": str(_nifti(folder / "label.nii.gz", label)),
            }
        )
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path, entries


def test_a_clean_datalist_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _datalist(tmp_path)
    assert main(["data", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: 3 cases (") and err == ""


def test_each_bad_case_gets_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, entries = _datalist(tmp_path, n=5)
    truncated = Path(entries[0]["image"])
    truncated.write_bytes(truncated.read_bytes()[:200])
    four_d = Path(entries[1]["image"])
    _nifti(four_d, np.zeros((*SHAPE, 3), dtype=np.float32))
    other_shape = Path(entries[2]["label"])
    _nifti(other_shape, np.zeros((12, 12, 10), dtype=np.uint8))
    nan = Path(entries[4]["image"])
    data = np.asanyarray(nib.load(str(nan)).dataobj).copy()
    data[0, 0, 0] = np.nan
    _nifti(nan, data)
    Path(entries[3]["label"]).unlink()  # a missing file is one more bad case, not a stop

    assert main(["data", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines == [
        f"error: {truncated}: truncated gzip file (the compressed stream ends early) "
        "(case case0, site site-A)",
        f"error: {four_d}: image is 4-D with shape (12, 12, 12, 3); expected one 3-D volume "
        "(D, H, W) or (D, H, W, 1) (case case1, site site-B)",
        f"error: {other_shape}: label shape (12, 12, 10) differs from the image's (12, 12, 12) "
        "(case case2, site site-A)",
        f"error: {entries[3]['label']}: file does not exist (case case3, site site-B)",
        f"error: {nan}: image holds 1 NaN voxels (of 1728) (case case4, site site-A)",
    ]
    assert out.startswith("5 of 5 cases failed the data check")


def test_label_values_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, entries = _datalist(tmp_path, n=2)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:5, 2:5, 2:5] = 255
    _nifti(Path(entries[1]["label"]), label)
    assert main(["data", "check", str(path)]) == 2
    assert "label values [255] are outside the expected set [0, 1, 2, 3, 4]" in (
        capsys.readouterr().err
    )
    assert main(["data", "check", str(path), "--label-values", "0,1,255"]) == 0
    assert main(["data", "check", str(path), "--label-values", "any", "--workers", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(path), "--label-values", "one,two"]) == 2
    assert "error: --label-values must be comma-separated integers" in capsys.readouterr().err


def test_a_broken_datalist_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "list.json"
    bad.write_text("{not json")
    assert main(["data", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: datalist ") and "not valid UTF-8 JSON" in err
    assert main(["data", "check", str(tmp_path / "absent.json")]) == 2


def test_the_console_command_never_prints_a_traceback(tmp_path: Path) -> None:
    path, entries = _datalist(tmp_path, n=2)
    truncated = Path(entries[1]["label"])
    truncated.write_bytes(truncated.read_bytes()[:-8])  # only the gzip trailer is missing
    done = subprocess.run(
        [sys.executable, "-m", "secure_fl.cli", "data", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr == (
        f"error: {truncated}: truncated gzip file (the compressed stream ends early) "
        "(case case1, site site-B)\n"
    )
