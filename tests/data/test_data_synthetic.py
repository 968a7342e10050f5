"""The synthetic multi-institution federation: determinism, caching, institution effects, labels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from secure_fl.data.datalist import load_datalist, split_by_site
from secure_fl.data.synthetic import (
    DEFAULT_CASE_COUNTS,
    generate_federation,
    site_profiles,
    synthesize_case,
)
from secure_fl.errors import ConfigError

SMALL = {"sites": 2, "cases_per_site": 2, "shape": (24, 24, 24)}


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_different_seed_different_arrays(tmp_path: Path) -> None:
    a = generate_federation(tmp_path / "a", seed=7, **SMALL)
    b = generate_federation(tmp_path / "b", seed=7, **SMALL)
    c = generate_federation(tmp_path / "c", seed=8, **SMALL)
    assert _files(a.parent) == _files(b.parent)
    cases_a, cases_c = load_datalist(a), load_datalist(c)
    assert [x.case_id for x in cases_a] == [x.case_id for x in cases_c]
    for x, y in zip(cases_a, cases_c, strict=True):
        assert not np.array_equal(_array(x.image), _array(y.image))
        assert not np.array_equal(_array(x.label), _array(y.label))
    profile = site_profiles(3, seed=1)[2]
    one = synthesize_case((20, 24, 28), profile, np.random.default_rng(5))
    two = synthesize_case((20, 24, 28), profile, np.random.default_rng(5))
    assert one.image.tobytes() == two.image.tobytes() and one.image.shape == (20, 24, 28)
    assert np.array_equal(one.label, two.label) and np.array_equal(one.brainmask, two.brainmask)


def test_layout_nifti_and_datalist(tmp_path: Path) -> None:
    path = generate_federation(tmp_path, seed=0, **SMALL)
    assert path == tmp_path / "datalist.json"
    cases = load_datalist(path)
    assert [(c.case_id, c.site) for c in cases] == [
        ("site-A-000", "site-A"),
        ("site-A-001", "site-A"),
        ("site-B-000", "site-B"),
        ("site-B-001", "site-B"),
    ]
    image = nib.load(str(cases[0].image))
    assert image.get_data_dtype() == np.float32 and image.shape == (24, 24, 24)
    np.testing.assert_array_equal(image.affine, np.eye(4))
    assert nib.load(str(cases[0].label)).get_data_dtype() == np.uint8
    assert cases[0].brainmask is not None
    assert nib.load(str(cases[0].brainmask)).get_data_dtype() == np.uint8
    for case in cases:
        img, lab, mask = _array(case.image), _array(case.label), _array(case.brainmask)  # type: ignore[arg-type]
        brain = mask > 0
        assert set(np.unique(lab)) == {0, 1, 2}  # oedema and core in every case
        assert np.all(img[~brain] == 0) and np.all(img[brain] > 0)
        assert not np.any(lab[~brain])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["params"]["seed"] == 0
    assert len(manifest["files"]) == 4 * 3 + 1


def test_default_case_counts_and_other_site_counts(tmp_path: Path) -> None:
    cases = load_datalist(generate_federation(tmp_path / "d", shape=(16, 16, 16)))
    assert DEFAULT_CASE_COUNTS == (10, 8, 6, 12)
    assert Counter(c.site for c in cases) == {
        "site-A": 10,
        "site-B": 8,
        "site-C": 6,
        "site-D": 12,
    }
    split = split_by_site(cases)  # every default site can hold out cases
    assert all(val for _, val in split.values())
    six = load_datalist(
        generate_federation(
            tmp_path / "s", sites=6, cases_per_site=[1, 2, 3, 1, 2, 3], shape=(16, 16, 16)
        )
    )
    assert [Counter(c.site for c in six)[f"site-{x}"] for x in "ABCDEF"] == [1, 2, 3, 1, 2, 3]


def test_existing_federation_is_reused_and_repaired(tmp_path: Path) -> None:
    path = generate_federation(tmp_path, seed=1, **SMALL)
    before = _files(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert generate_federation(tmp_path, seed=1, **SMALL) == path
    assert path.stat().st_mtime_ns == stamp  # nothing rewritten
    victim = tmp_path / "site-B" / "site-B-001" / "flair.nii.gz"
    victim.write_bytes(b"corrupt")
    generate_federation(tmp_path, seed=1, **SMALL)  # same parameters: repaired in place
    assert _files(tmp_path) == before
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"incomplete"'))
    generate_federation(tmp_path, seed=1, **SMALL)  # an interrupted run is redone
    assert _files(tmp_path) == before


def test_other_parameters_need_overwrite(tmp_path: Path) -> None:
    generate_federation(tmp_path, seed=1, sites=2, cases_per_site=3, shape=(16, 16, 16))
    with pytest.raises(ConfigError, match=r"other parameters.*overwrite=True"):
        generate_federation(tmp_path, seed=2, sites=2, cases_per_site=3, shape=(16, 16, 16))
    (tmp_path / "notes.txt").write_text("mine")
    generate_federation(
        tmp_path, seed=2, sites=2, cases_per_site=2, shape=(16, 16, 16), overwrite=True
    )
    assert not (tmp_path / "site-A" / "site-A-002").exists()  # stale case removed
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files we did not write are kept
    assert len(load_datalist(tmp_path / "datalist.json")) == 4

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty and holds no synthetic-federation manifest"):
        generate_federation(foreign, **SMALL)
    generate_federation(foreign, overwrite=True, **SMALL)
    assert (foreign / "x.txt").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sites": 0}, r"sites must be an int \[1, 64\]"),
        ({"sites": 65}, r"sites must be an int \[1, 64\]"),
        ({"cases_per_site": 0}, r"cases_per_site must be an int \[1, 10000\]"),
        ({"cases_per_site": [2, 2, 2]}, "sequence of 4 ints"),
        ({"cases_per_site": [2, 2, 0, 2]}, r"cases_per_site\[2\] must be an int"),
        ({"shape": (8, 32, 32)}, r"shape\[0\] must be an int \[16, 256\]"),
        ({"shape": (32, 32)}, "shape must be three ints"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"overwrite": 1}, "overwrite must be a bool"),
    ],
)
def test_parameter_errors(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate_federation(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_institution_effects_differ_between_sites(tmp_path: Path) -> None:
    profiles = site_profiles(4, seed=0)
    for field in ("scale", "noise", "bias", "blur", "offset"):
        values = [getattr(p, field) for p in profiles]
        assert len(set(values)) == 4, field
    assert any(p.outliers for p in profiles) and not all(p.outliers for p in profiles)
    assert len({p.size_mix for p in profiles}) == 3

    cases = load_datalist(
        generate_federation(tmp_path, sites=4, cases_per_site=3, shape=(32, 32, 32), seed=0)
    )
    level: dict[str, float] = {}
    noise: dict[str, float] = {}
    for site in ("site-A", "site-B", "site-C", "site-D"):
        medians, noises = [], []
        for case in (c for c in cases if c.site == site):
            img, lab = _array(case.image), _array(case.label)
            normal = (_array(case.brainmask) > 0) & (lab == 0)  # type: ignore[arg-type]
            pairs = normal[1:] & normal[:-1]
            diffs = np.diff(img, axis=0)[pairs]
            medians.append(float(np.median(img[normal])))
            # Robust (MAD) noise estimate from first differences, immune to saturated voxels.
            noises.append(float(np.median(np.abs(diffs))) / 0.6745 / np.sqrt(2))
        level[site] = float(np.mean(medians))
        noise[site] = float(np.mean(noises))
    assert max(level.values()) / min(level.values()) > 1.5
    relative = {p.name: noise[p.name] / p.scale for p in profiles}
    # The measured noise follows each site's profile: same ranking, clearly different levels.
    assert sorted(relative, key=relative.__getitem__) == [
        p.name for p in sorted(profiles, key=lambda p: p.noise)
    ]
    assert max(relative.values()) / min(relative.values()) > 1.4


def test_tumour_sizes_vary_within_and_between_sites(tmp_path: Path) -> None:
    generate_federation(tmp_path, sites=3, cases_per_site=6, shape=(32, 32, 32), seed=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    classes = manifest["size_classes"]
    assert set(classes.values()) == {"small", "medium", "large"}
    mixes = {
        site: Counter(v for k, v in classes.items() if k.startswith(site)).most_common(1)[0][0]
        for site in ("site-A", "site-B", "site-C")
    }
    assert len(set(mixes.values())) >= 2  # sites favour different tumour sizes
    volumes = []
    for case in load_datalist(tmp_path / "datalist.json"):
        lab = _array(case.label)
        volumes.append(int((lab > 0).sum()))
        assert 0 < int((lab == 2).sum()) < volumes[-1]  # core inside a larger whole tumour
    volumes_arr = np.asarray(volumes, dtype=float)
    assert volumes_arr.std() / volumes_arr.mean() > 0.4
    assert volumes_arr.max() / volumes_arr.min() > 5
