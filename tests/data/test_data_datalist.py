"""Datalists: Case, load_datalist / write_datalist round trips and every error path, split_by_site."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secure_fl.data.datalist import (
    Case,
    group_by_site,
    load_datalist,
    site_name,
    split_by_site,
    write_datalist,
)
from secure_fl.errors import ConfigError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Empty placeholder files for three cases (load_datalist checks existence, not content)."""
    for name in ("a", "b", "c"):
        for kind in ("flair", "label", "brainmask"):
            _touch(tmp_path / "cases" / name / f"{kind}.nii.gz")
    return tmp_path


def _entry(name: str, site: str = "site-A", **extra: Any) -> dict[str, Any]:
    return {
        "image": f"cases/{name}/flair.nii.gz",
        "label": f"cases/{name}/label.nii.gz",
        "site": site,
        **extra,
    }


def _write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_site_names() -> None:
    assert [site_name(i) for i in (0, 1, 25, 26, 27)] == [
        "site-A",
        "site-B",
        "site-Z",
        "site-AA",
        "site-AB",
    ]
    with pytest.raises(ConfigError, match="site index"):
        site_name(-1)


def test_case_to_dict_and_validation(tmp_path: Path) -> None:
    case = Case("p1", "site-A", tmp_path / "i.nii.gz", str(tmp_path / "l.nii.gz"))  # type: ignore[arg-type]
    assert isinstance(case.label, Path)
    assert case.to_dict() == {
        "image": str(tmp_path / "i.nii.gz"),
        "label": str(tmp_path / "l.nii.gz"),
        "site": "site-A",
        "case_id": "p1",
    }
    with_mask = Case("p1", "s", tmp_path / "i", tmp_path / "l", tmp_path / "m")
    assert with_mask.to_dict()["brainmask"] == str(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"Case\.site"):
        Case("p1", "  ", tmp_path / "i", tmp_path / "l")
    with pytest.raises(ConfigError, match=r"Case\.case_id"):
        Case("", "s", tmp_path / "i", tmp_path / "l")


def test_load_resolves_relative_paths_and_defaults_case_ids(files: Path) -> None:
    path = _write_json(
        files / "dl.json",
        {
            "training": [
                _entry("a", brainmask="cases/a/brainmask.nii.gz"),
                _entry("b", site="site-B", case_id="bee"),
                _entry("c", brainmask=None),
            ]
        },
    )
    cases = load_datalist(path)
    assert [c.case_id for c in cases] == ["cases/a/flair", "bee", "cases/c/flair"]
    assert cases[0].image == (files / "cases/a/flair.nii.gz").resolve()
    assert cases[0].brainmask == (files / "cases/a/brainmask.nii.gz").resolve()
    assert cases[2].brainmask is None
    assert [c.site for c in cases] == ["site-A", "site-B", "site-A"]


def test_load_uses_image_stems_as_ids_when_unique(tmp_path: Path) -> None:
    for name in ("BRATS_001", "BRATS_002"):
        _touch(tmp_path / "imagesTr" / f"{name}.nii.gz")
        _touch(tmp_path / "labelsTr" / f"{name}.nii.gz")
    entries = [
        {"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz", "site": "s"}
        for n in ("BRATS_001", "BRATS_002")
    ]
    cases = load_datalist(_write_json(tmp_path / "dataset.json", {"training": entries}))
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]


def test_dataroot_and_round_trips(files: Path, tmp_path: Path) -> None:
    sub = files / "lists"
    sub.mkdir()
    path = _write_json(
        sub / "dl.json", {"dataroot": "..", "training": [_entry("a"), _entry("b", site="B")]}
    )
    cases = load_datalist(path)
    assert cases[1].label == (files / "cases/b/label.nii.gz").resolve()

    for relative_to in (None, files, files / "cases", sub):
        out = write_datalist(cases, sub / "out.json", relative_to=relative_to)
        assert load_datalist(out) == cases
        text = out.read_text()
        assert (str(files) in text) == (relative_to is None)
        assert ("dataroot" in json.loads(text)) == (relative_to not in (None, sub))

    other = write_datalist(cases, sub / "val.json", section="validation", extra={"name": "x"})
    assert load_datalist(other, section="validation") == cases
    assert json.loads(other.read_text())["name"] == "x"


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ([1, 2], "must hold a JSON object"),
        (
            {"validation": [_entry("a")]},
            r"section 'training' not found; sections present: \['validation'\]",
        ),
        ({"training": []}, "non-empty list"),
        ({"training": [_entry("a"), 3]}, r"training\[1\] must be an object"),
        (
            {"training": [{"label": "cases/a/label.nii.gz", "site": "s"}]},
            r"training\[0\]\.image: missing",
        ),
        (
            {"training": [_entry("a"), {"image": "cases/b/flair.nii.gz", "site": "s"}]},
            r"training\[1\]\.label: missing",
        ),
        (
            {"training": [{"image": "cases/a/flair.nii.gz", "label": "cases/a/label.nii.gz"}]},
            r"training\[0\]\.site: missing",
        ),
        ({"training": [_entry("a", site="")]}, r"training\[0\]\.site must be a non-empty string"),
        ({"training": [_entry("a", site=None)]}, r"training\[0\]\.site must be a non-empty string"),
        (
            {"training": [_entry("a", case_id=7)]},
            r"training\[0\]\.case_id must be a non-empty string",
        ),
        (
            {"training": [_entry("a", image=["x", "y"])]},
            r"training\[0\]\.image must be a path string",
        ),
        (
            {"training": [_entry("a", image="cases/zz/flair.nii.gz")]},
            r"training\[0\]\.image: file .*zz/flair\.nii\.gz' does not exist",
        ),
        (
            {"training": [_entry("a"), _entry("b", label="nope.nii.gz")]},
            r"training\[1\]\.label: file .* does not exist",
        ),
        (
            {"training": [_entry("a", brainmask="cases/a/missing.nii.gz")]},
            r"training\[0\]\.brainmask: file",
        ),
        (
            {"training": [_entry("a", case_id="x"), _entry("b", case_id="x")]},
            r"training\[1\]\.case_id: duplicate case id 'x' \(also at index 0\)",
        ),
        ({"dataroot": "nowhere", "training": [_entry("a")]}, "dataroot .* is not a folder"),
        ({"dataroot": 3, "training": [_entry("a")]}, "dataroot must be a non-empty path string"),
    ],
)
def test_load_errors_name_the_field(files: Path, document: Any, match: str) -> None:
    path = _write_json(files / "bad.json", document)
    with pytest.raises(ConfigError, match=match):
        load_datalist(path)


def test_load_errors_for_the_file_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_datalist(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid UTF-8 JSON"):
        load_datalist(bad)
    ok = _write_json(tmp_path / "ok.json", {"training": []})
    with pytest.raises(ConfigError, match="section 'testing' not found"):
        load_datalist(ok, section="testing")


def test_write_errors(tmp_path: Path) -> None:
    case = Case("a", "s", tmp_path / "i", tmp_path / "l")
    with pytest.raises(ConfigError, match="non-empty"):
        write_datalist([], tmp_path / "x.json")
    with pytest.raises(ConfigError, match=r"cases\[1\] must be a Case"):
        write_datalist([case, "b"], tmp_path / "x.json")  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"cases\[1\]\.case_id: duplicate"):
        write_datalist([case, case], tmp_path / "x.json")
    with pytest.raises(ConfigError, match="extra must not set"):
        write_datalist([case], tmp_path / "x.json", extra={"training": []})


def _cases(counts: dict[str, int]) -> list[Case]:
    return [
        Case(
            f"{site}-{j:02d}", site, Path(f"/x/{site}/{j}.nii.gz"), Path(f"/x/{site}/{j}_l.nii.gz")
        )
        for site, n in counts.items()
        for j in range(n)
    ]


def test_split_by_site_is_deterministic_and_holds_out_per_site() -> None:
    cases = _cases({"site-B": 8, "site-A": 10, "site-C": 2, "site-D": 3})
    split = split_by_site(cases, val_fraction=0.25, seed=3)
    assert list(split) == ["site-A", "site-B", "site-C", "site-D"]
    sizes = {site: (len(tr), len(va)) for site, (tr, va) in split.items()}
    assert sizes == {"site-A": (8, 2), "site-B": (6, 2), "site-C": (1, 1), "site-D": (2, 1)}
    for site, (train, val) in split.items():
        assert {c.site for c in train + val} == {site}
        assert not {c.case_id for c in train} & {c.case_id for c in val}
        assert train == sorted(train, key=lambda c: c.case_id)
    assert split_by_site(list(reversed(cases)), val_fraction=0.25, seed=3) == split
    # One site's split does not depend on the other sites.
    alone = split_by_site([c for c in cases if c.site == "site-A"], val_fraction=0.25, seed=3)
    assert alone["site-A"] == split["site-A"]
    others = [split_by_site(cases, val_fraction=0.25, seed=s)["site-A"][1] for s in range(6)]
    assert len({tuple(c.case_id for c in v) for v in others}) > 1
    assert group_by_site(cases)["site-C"] == [c for c in cases if c.site == "site-C"]


def test_split_by_site_edge_cases() -> None:
    cases = _cases({"site-A": 4, "site-B": 1})
    # A one-case site trains on its case and has no validation case (no error, no fake one).
    assert split_by_site(cases)["site-B"] == (cases[4:], [])
    train_a, val_a = split_by_site(cases)["site-A"]
    assert len(train_a) == 3 and len(val_a) == 1
    all_train = split_by_site(cases, val_fraction=0)
    assert all_train["site-B"] == (cases[4:], [])
    assert (
        split_by_site(_cases({"s": 4}), val_fraction=0.99)["s"][0] != []
    )  # keeps one for training
    for bad in (-0.1, 1.0, float("nan"), True, "0.2"):
        with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
            split_by_site(cases, val_fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed must be an int >= 0"):
        split_by_site(cases, seed=-1)
    with pytest.raises(ConfigError, match="non-empty"):
        split_by_site([])
    with pytest.raises(ConfigError, match="duplicate"):
        split_by_site(cases + cases[:1])
