"""The data check: every bad scan named with its file and reason, before MONAI ever sees it.

Bad NIfTI files are made in tmp_path from tiny synthetic cases (16^3 voxels).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_testutils import brats_sample_root, write_case, write_nifti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_fl.data.checks import (
    DEFAULT_LABEL_VALUES,
    check_cases,
    parse_label_values,
    require_valid,
)
from secure_fl.data.datalist import Case, load_datalist, scan_brats_folder, write_datalist
from secure_fl.errors import ConfigError, DataError, SecureFLError

SHAPE = (16, 16, 16)


def _case(folder: Path, name: str = "c0", **kwargs: object) -> Case:
    return write_case(folder / name, shape=SHAPE, case_id=name, **kwargs)  # type: ignore[arg-type]


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _reasons(case: Case, **kwargs: object) -> list[str]:
    report = check_cases([case], **kwargs)  # type: ignore[arg-type]
    return [f"{p.role}: {p.reason}" for p in report.problems]


# --- corruptions: each takes a good case and breaks one file, returning (file, reason) --------


def _truncate_half(case: Case) -> tuple[Path, str]:
    raw = case.image.read_bytes()
    case.image.write_bytes(raw[: len(raw) // 2])
    return case.image, "truncated gzip file (the compressed stream ends early)"


def _four_d(case: Case) -> tuple[Path, str]:
    data = _array(case.image)
    write_nifti(case.image, np.stack([data, data], axis=-1))
    return case.image, "image is 4-D with shape (16, 16, 16, 2); expected one 3-D volume"


def _label_shape(case: Case) -> tuple[Path, str]:
    write_nifti(case.label, _array(case.label)[:, :, :12])
    return case.label, "label shape (16, 16, 12) differs from the image's (16, 16, 16)"


def _nan(case: Case) -> tuple[Path, str]:
    data = _array(case.image).copy()
    data[1, 2, 3] = data[4, 5, 6] = np.nan
    write_nifti(case.image, data)
    return case.image, "image holds 2 NaN voxels (of 4096)"


def _fractional_label(case: Case) -> tuple[Path, str]:
    data = _array(case.label).astype(np.float32)
    data[0, 0, :3] = 0.5
    write_nifti(case.label, data)
    return case.label, "label holds 3 non-integer voxels (e.g. 0.5); labels must be integers"


CORRUPTIONS: dict[str, Callable[[Case], tuple[Path, str]]] = {
    "truncated": _truncate_half,
    "4-D": _four_d,
    "label shape": _label_shape,
    "NaN": _nan,
    "non-integer label": _fractional_label,
}


def test_good_cases_pass(tmp_path: Path) -> None:
    cases = [_case(tmp_path, f"c{i}", seed=i) for i in range(3)]
    report = check_cases(cases)
    assert report.ok and report.problems == () and report.lines() == []
    assert report.summary() == "ok: 3 cases"
    assert report.cases == 3 and report.bytes_read > 3 * 3 * 4096
    assert require_valid(cases).ok


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_bad_scan_is_named_with_its_reason(tmp_path: Path, kind: str) -> None:
    good = _case(tmp_path, "good", seed=1)
    bad = _case(tmp_path, "bad", seed=2)
    path, reason = CORRUPTIONS[kind](bad)
    report = check_cases([good, bad])
    assert report.bad_cases == ("bad",)
    (line,) = report.lines()
    assert line.startswith(f"{path}: {reason}")
    assert line.endswith("(case bad, site site-A)")
    with pytest.raises(DataError) as excinfo:
        require_valid([good, bad])
    message = str(excinfo.value)
    assert f"error: {path}: {reason}" in message
    assert str(good.image) not in message and str(good.label) not in message
    assert isinstance(excinfo.value, SecureFLError) and not isinstance(excinfo.value, RuntimeError)


def test_every_bad_case_is_listed_not_just_the_first(tmp_path: Path) -> None:
    cases, expected = [], []
    for i, kind in enumerate(sorted(CORRUPTIONS)):
        case = _case(tmp_path, f"bad{i}", seed=i)
        expected.append(CORRUPTIONS[kind](case))
        cases.append(case)
    cases.insert(2, _case(tmp_path, "good", seed=99))
    with pytest.raises(DataError) as excinfo:
        require_valid(cases)
    lines = str(excinfo.value).splitlines()
    assert lines[0].startswith(f"{len(expected)} of {len(cases)} cases failed the data check")
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(expected) == len(lines) - 1
    for (path, reason), line in zip(expected, errors, strict=True):
        assert line.startswith(f"error: {path}: {reason}")


def test_several_problems_of_one_case_share_its_line(tmp_path: Path) -> None:
    case = _case(tmp_path)
    _nan(case)
    _label_shape(case)
    _fractional_label(case)  # rewrites the label with its original shape, then...
    _label_shape(case)  # ...shrinks it again: a non-integer label of another shape
    report = check_cases([case])
    assert [p.role for p in report.problems] == ["image", "label", "label"]
    (line,) = report.lines()
    assert line == (
        f"{case.image}: image holds 2 NaN voxels (of 4096); {case.label}: label shape "
        "(16, 16, 12) differs from the image's (16, 16, 16); label holds 3 non-integer voxels "
        "(e.g. 0.5); labels must be integers (case c0, site site-A)"
    )


def test_gzip_missing_only_its_trailer_is_refused(tmp_path: Path) -> None:
    # Adversarial: cutting the 8-byte CRC/length trailer leaves every voxel readable (nibabel alone
    # loads it); the check decompresses to the end of the stream and refuses the file.
    case = _case(tmp_path)
    raw = case.image.read_bytes()
    case.image.write_bytes(raw[:-8])
    assert _array(case.image).shape == SHAPE
    assert _reasons(case) == ["image: truncated gzip file (the compressed stream ends early)"]


def test_corrupt_gzip_and_non_nifti_files(tmp_path: Path) -> None:
    case = _case(tmp_path)
    raw = bytearray(case.image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    case.image.write_bytes(bytes(raw))
    (reason,) = _reasons(case)
    assert reason.startswith("image: corrupt gzip")
    case.image.write_bytes(gzip.compress(b"not a scan at all" * 40))
    assert _reasons(case) == ["image: not a NIfTI-1 or NIfTI-2 file (bad header size field)"]
    case.image.write_bytes(b"plain text, not gzip")
    (reason,) = _reasons(case)
    assert reason.startswith("image: corrupt gzip file (Not a gzipped file")


def test_truncated_uncompressed_nifti(tmp_path: Path) -> None:
    case = _case(tmp_path)
    plain = write_nifti(tmp_path / "plain.nii", _array(case.image))
    plain.write_bytes(plain.read_bytes()[:-100])
    bad = Case("c0", "site-A", plain, case.label)
    assert _reasons(bad) == [
        "image: truncated: the header promises 16384 bytes of voxel data from offset 352, the "
        "file holds 16284"
    ]


def test_missing_and_misnamed_files(tmp_path: Path) -> None:
    case = _case(tmp_path)
    case.label.unlink()
    other = case.image.with_name("flair.img")
    other.write_bytes(case.image.read_bytes())
    bad = Case("c0", "site-A", other, case.label, case.brainmask)
    assert _reasons(bad) == [
        "image: not a NIfTI file name (expected .nii or .nii.gz)",
        "label: file does not exist",
    ]


def test_a_single_volume_along_the_fourth_axis_is_accepted(tmp_path: Path) -> None:
    # Documented decision: (D, H, W, 1) is one 3-D volume; MONAI loads it as (1, D, H, W).
    from secure_fl.data.transforms import PreprocessConfig, eval_transforms

    case = _case(tmp_path)
    write_nifti(case.image, _array(case.image)[..., None])
    write_nifti(case.label, _array(case.label)[..., None])
    assert check_cases([case]).ok
    cfg = PreprocessConfig(grid=(8, 8, 8), patch=(8, 8, 8))
    assert tuple(eval_transforms(cfg)(case.to_dict())["image"].shape) == (1, 8, 8, 8)


def test_other_shapes_are_refused(tmp_path: Path) -> None:
    case = _case(tmp_path)
    image = _array(case.image)
    write_nifti(case.image, image[:, :, 0])
    assert _reasons(case) == [
        "image: image is 2-D with shape (16, 16); expected one 3-D volume (D, H, W) or (D, H, W, 1)"
    ]
    write_nifti(case.image, image[..., None, None])
    (reason,) = _reasons(case)
    assert reason.startswith("image: image is 5-D with shape (16, 16, 16, 1, 1)")
    write_nifti(case.image, image[:, :0])
    (reason,) = _reasons(case)
    assert reason.startswith("image: image is empty (shape (")


def test_inf_constant_and_complex_images(tmp_path: Path) -> None:
    case = _case(tmp_path)
    image = _array(case.image).copy()
    image[0, 0, 0], image[0, 0, 1] = np.nan, -np.inf
    write_nifti(case.image, image)
    assert _reasons(case) == ["image: image holds 1 NaN and 1 Inf voxels (of 4096)"]
    write_nifti(case.image, np.full(SHAPE, 3.0, dtype=np.float32))
    assert _reasons(case) == ["image: image is constant (every voxel = 3): no brain"]
    write_nifti(case.image, image.astype(np.complex64))
    assert _reasons(case) == ["image: voxel type complex64 is not a real number type"]


def test_label_values(tmp_path: Path) -> None:
    case = _case(tmp_path)
    label = _array(case.label).astype(np.int16)
    label[0, 0, 0], label[0, 0, 1] = 7, 255
    write_nifti(case.label, label)
    assert _reasons(case) == [
        "label: label values [7, 255] are outside the expected set [0, 1, 2, 3, 4]"
    ]
    assert _reasons(case, label_values={0, 1, 2, 7, 255}) == []
    assert _reasons(case, label_values=None) == []
    label[0, 0, 2] = -1
    write_nifti(case.label, label)
    assert _reasons(case, label_values=None) == ["label: label holds negative values (minimum -1)"]
    nan_label = label.astype(np.float32)
    nan_label[1, 1, 1] = np.nan
    write_nifti(case.label, nan_label)
    assert _reasons(case, label_values=None) == ["label: label holds 1 NaN voxels (of 4096)"]
    # Integral floats (the BraTS sample stores its labels as float32) are integers.
    write_nifti(case.label, np.clip(label, 0, 4).astype(np.float32))
    assert _reasons(case) == []


def test_affines(tmp_path: Path) -> None:
    case = _case(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    write_nifti(case.label, _array(case.label), affine=shifted)
    assert _reasons(case) == [
        "label: label affine differs from the image's (largest difference 2): they do not share "
        "one voxel grid"
    ]
    write_nifti(case.label, _array(case.label), affine=np.diag([1.0, 1.0, 1.0 + 1e-5, 1.0]))
    assert _reasons(case) == []  # float rounding is not a different grid
    # nibabel refuses to write a singular affine: patch the header's sform rows by hand.
    image = nib.Nifti1Image(_array(case.image), np.eye(4))
    image.header.set_qform(None, code=0)
    image.header.set_sform(np.eye(4), code=1)
    image.header["vox_offset"] = 352
    raw = bytearray(image.header.binaryblock)
    raw[312:328] = np.zeros(4, dtype=image.header.endianness + "f4").tobytes()  # srow_z = 0
    raw += b"\0" * (352 - len(raw)) + image.get_fdata(dtype=np.float32).tobytes(order="F")
    case.image.write_bytes(gzip.compress(bytes(raw)))
    assert _reasons(case) == ["image: affine is degenerate (its voxel axes are linearly dependent)"]


def test_brainmask(tmp_path: Path) -> None:
    case = _case(tmp_path)
    assert case.brainmask is not None
    mask = _array(case.brainmask)
    write_nifti(case.brainmask, np.zeros_like(mask))
    assert _reasons(case) == ["brainmask: brainmask is empty (no voxel > 0.5)"]
    write_nifti(case.brainmask, mask[:8])
    assert _reasons(case) == [
        "brainmask: brainmask shape (8, 16, 16) differs from the image's (16, 16, 16)"
    ]
    assert _reasons(case, check_brainmask=False) == []


def test_threads_give_the_same_report(tmp_path: Path) -> None:
    cases = [_case(tmp_path, f"c{i}", seed=i) for i in range(4)]
    _nan(cases[1])
    _label_shape(cases[3])
    one, two = check_cases(cases), check_cases(cases, workers=3)
    assert one.problems == two.problems and one.bad_cases == ("c1", "c3")


def test_bad_options(tmp_path: Path) -> None:
    case = _case(tmp_path)
    with pytest.raises(ConfigError, match=r"cases\[0\] must be a Case"):
        check_cases([str(case.image)])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"workers must be an int in \[1, 64\]"):
        check_cases([case], workers=0)
    with pytest.raises(ConfigError, match="label_values must be a non-empty collection"):
        check_cases([case], label_values=[])
    with pytest.raises(ConfigError, match="label_values"):
        check_cases([case], label_values=[0.5])  # type: ignore[list-item]
    assert parse_label_values("0, 1,2,4") == frozenset({0, 1, 2, 4})
    assert parse_label_values("any") is None
    with pytest.raises(ConfigError, match="--label-values"):
        parse_label_values("0,x")
    assert frozenset(range(5)) == DEFAULT_LABEL_VALUES


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kinds=st.lists(st.sampled_from([None, *sorted(CORRUPTIONS)]), min_size=1, max_size=5))
def test_property_exactly_the_corrupted_cases_are_reported(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str | None]
) -> None:
    root = tmp_path_factory.mktemp("prop")
    cases, bad = [], []
    for i, kind in enumerate(kinds):
        case = _case(root, f"c{i}", seed=i)
        if kind is not None:
            path, reason = CORRUPTIONS[kind](case)
            bad.append((case.case_id, f"{path}: {reason}"))
        cases.append(case)
    report = check_cases(cases)
    assert report.bad_cases == tuple(case_id for case_id, _ in bad)
    for (_, start), line in zip(bad, report.lines(), strict=True):
        assert line.startswith(start)


def test_datalist_without_existence_check_reports_missing_files(tmp_path: Path) -> None:
    cases = [_case(tmp_path, f"c{i}", seed=i) for i in range(2)]
    path = write_datalist(cases, tmp_path / "list.json")
    cases[0].label.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        load_datalist(path)
    loaded = load_datalist(path, must_exist=False)
    assert [p.reason for p in check_cases(loaded).problems] == ["file does not exist"]


def test_the_runner_refuses_bad_scans_before_training(tmp_path: Path) -> None:
    from secure_fl.training import run_experiment
    from secure_fl.training.config import DataConfig, ExperimentConfig

    cases = [
        _case(tmp_path, f"{site}{i}", seed=i, site=site)
        for site in ("site-A", "site-B")
        for i in range(2)
    ]
    _truncate_half(cases[1])
    _label_shape(cases[2])
    datalist = write_datalist(cases, tmp_path / "list.json")
    config = ExperimentConfig(name="bad", rounds=1, data=DataConfig(datalist=str(datalist)))
    logs: list[str] = []
    with pytest.raises(DataError) as excinfo:
        run_experiment(config, tmp_path / "run", log=logs.append)
    message = str(excinfo.value)
    assert message.count("\nerror: ") == 2
    assert f"error: {cases[1].image}: truncated gzip file" in message
    assert f"error: {cases[2].label}: label shape (16, 16, 12) differs" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_real_brats_sample_passes() -> None:
    cases = scan_brats_folder(brats_sample_root(), sites=3)
    report = require_valid(cases, workers=2)
    assert report.ok and report.cases == 6
