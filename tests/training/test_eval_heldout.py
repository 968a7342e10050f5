"""Held-out test set, held-out institutions, one-case sites, sub-region and multi-modal options of
an experiment (secure_fl.training.heldout and the runner)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from training_helpers import tiny_config

from secure_fl.data import Case, generate_federation, load_datalist, write_datalist
from secure_fl.errors import ConfigError
from secure_fl.training import DataConfig, ModelConfig
from secure_fl.training import runner as runner_module
from secure_fl.training.config import config_from_mapping
from secure_fl.training.heldout import model_factory, resolve_data
from secure_fl.training.model import build_unet, get_state
from secure_fl.training.runner import run_experiment
from secure_fl.training.trainer import SiteTrainer

LABELS = {"0": "background", "1": "oedema", "2": "tumour core"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 synthetic sites (4, 3, 1 cases) at 24^3, each case with a T1c image besides its FLAIR."""
    root = tmp_path_factory.mktemp("heldout")
    path = generate_federation(root, sites=3, cases_per_site=(4, 3, 1), shape=(24,) * 3, seed=5)
    cases = []
    for case in load_datalist(path):
        image: Any = nib.load(str(case.image))
        flair = np.asanyarray(image.dataobj).astype(np.float32)
        t1c = case.image.parent / f"{case.case_id}_t1c.nii.gz"
        nifti: Any = nib
        nib.save(nifti.Nifti1Image(flair.max() - flair, np.eye(4)), str(t1c))
        cases.append(dataclasses.replace(case, modalities={"t1c": t1c}))
    return write_datalist(cases, root / "with_t1c.json", extra={"labels": LABELS})


def _data(datalist: Path, **kwargs: Any) -> DataConfig:
    return DataConfig(datalist=str(datalist), val_fraction=0.34, **kwargs)


def test_holdout_sites_and_test_section_are_kept_out_of_training(
    federation: Path, tmp_path: Path
) -> None:
    cases = load_datalist(federation)
    config = tiny_config(federation, data=_data(federation, holdout_sites=("site-B",)))
    plan = resolve_data(config, cases)
    assert {c.site for c in plan.train_pool} == {"site-A", "site-C"}
    assert [c.case_id for c in plan.test] == [c.case_id for c in cases if c.site == "site-B"]
    assert plan.label_scheme == "synthetic" and plan.label_values == frozenset({0, 1, 2})
    # A datalist test section: its cases join the test set; sharing an id with training fails.
    doc = json.loads(federation.read_text())
    extra = {**doc["training"][0], "case_id": "new-patient", "site": "site-Z"}
    doc["test"] = [extra]
    with_test = tmp_path / "with_test.json"
    with_test.write_text(json.dumps({**doc, "dataroot": str(federation.parent)}))
    plan = resolve_data(tiny_config(with_test, data=_data(with_test)), load_datalist(with_test))
    assert [c.case_id for c in plan.test] == ["new-patient"]
    assert len(plan.train_pool) == len(cases)
    doc["test"] = [doc["training"][1]]
    with_test.write_text(json.dumps({**doc, "dataroot": str(federation.parent)}))
    with pytest.raises(ConfigError, match="test section shares case ids with training"):
        resolve_data(tiny_config(with_test, data=_data(with_test)), load_datalist(with_test))


def test_bad_holdout_and_missing_modalities_are_refused(federation: Path) -> None:
    cases = load_datalist(federation)
    with pytest.raises(ConfigError, match=r"\['site-X'\] are not sites of the datalist"):
        resolve_data(
            tiny_config(federation, data=_data(federation, holdout_sites=("site-X",))), cases
        )
    every = _data(federation, holdout_sites=("site-A", "site-B", "site-C"))
    with pytest.raises(ConfigError, match="holds out every site"):
        resolve_data(tiny_config(federation, data=every), cases)
    t2 = _data(federation, modalities=("flair", "t2"))
    with pytest.raises(ConfigError, match=r"case site-A-000 has no 't2' image"):
        resolve_data(tiny_config(federation, data=t2), cases)
    core = resolve_data(
        tiny_config(federation, data=_data(federation, target="tumour_core")), cases
    )
    assert core.preprocess.foreground == (2,)
    binary = _data(federation, target="tumour_core", label_scheme="binary")
    with pytest.raises(ConfigError, match="cannot be expressed with the 'binary' labels"):
        tiny_config(federation, data=binary)


def test_config_refuses_what_the_data_cannot_express() -> None:
    with pytest.raises(ConfigError, match="'enhancing_tumour' cannot be expressed with the "):
        config_from_mapping({"data": {"target": "enhancing_tumour"}})  # synthetic labels
    with pytest.raises(ConfigError, match=r"set through data\.target and data\.modalities"):
        config_from_mapping({"preprocess": {"modalities": ["flair", "t1c"]}})
    with pytest.raises(ConfigError, match=r"data\.hd95_units must be 'mm' or 'voxel'"):
        config_from_mapping({"data": {"hd95_units": "cm"}})
    with pytest.raises(ConfigError, match=r"data\.modalities must list distinct names"):
        config_from_mapping({"data": {"modalities": ["flair", "dwi"]}})
    with pytest.raises(ConfigError, match=r"data\.holdout_sites must list distinct site names"):
        config_from_mapping({"data": {"holdout_sites": ["site-A", "site-A"]}})
    ok = config_from_mapping({"data": {"target": "tumour_core", "holdout_sites": ["site-D"]}})
    assert ok.to_dict()["data"]["holdout_sites"] == ["site-D"]


def test_model_input_channels_follow_the_modalities() -> None:
    model = ModelConfig(channels=(4, 8), num_res_units=1)
    assert model_factory(model, 1) is None
    factory = model_factory(model, 2)
    assert factory is not None
    net = factory()
    assert net(torch.zeros(1, 2, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    one, two = get_state(build_unet(model)), get_state(net)
    assert one.keys() == two.keys()
    assert sum(v.size for v in two.values()) > sum(v.size for v in one.values())
    with pytest.raises(ConfigError, match=r"in_channels must be an int in \[1, 4\]"):
        model_factory(model, 0)


def test_run_with_holdout_site_one_case_site_core_and_two_modalities(
    federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Case] = []

    class Recording(SiteTrainer):
        def __init__(self, name: str, train_cases: Any, val_cases: Any, **kw: Any) -> None:
            seen.extend([*train_cases, *val_cases])
            super().__init__(name, train_cases, val_cases, **kw)

    monkeypatch.setattr(runner_module, "SiteTrainer", Recording)
    data = _data(
        federation, holdout_sites=("site-B",), target="tumour_core", modalities=("flair", "t1c")
    )
    summary = run_experiment(
        tiny_config(federation, rounds=1, data=data), tmp_path / "run", log=lambda _: None
    )
    # The held-out institution's cases never reach a trainer; every other case does.
    assert seen and not [c.case_id for c in seen if c.site == "site-B"]
    assert {c.site for c in seen} == {"site-A", "site-C"}
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["dice"]["site-C"] is None  # one case: it trains, no validation Dice is invented
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert summary.evaluation is not None
    fedavg = evaluation["strategies"]["fedavg"]
    assert set(fedavg["validation"]["per_site"]) == {"site-A"}  # site-C: absent
    test = fedavg["test"]
    assert (
        test["per_site"]["site-B"]["cases"] == 3 and test["per_site"]["site-B"]["trained"] is False
    )
    assert {c["case_id"] for c in test["cases"]} == {"site-B-000", "site-B-001", "site-B-002"}
    for case in test["cases"]:
        assert 0.0 <= case["dice"] <= 1.0 and case["hd95"] >= 0.0
    assert evaluation["foreground_labels"] == [2] and evaluation["modalities"] == ["flair", "t1c"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Final evaluation" in report and "site-B (held out)" in report
    assert "Dice (tumour core)" in report


def _brats_sample() -> Path:
    """The shared BraTS 2013 sample ($SECURE_FL_BRATS_SAMPLE, else ../shared/data beside the
    repository); skips the test when it is absent."""
    override = os.environ.get("SECURE_FL_BRATS_SAMPLE")
    root = (
        Path(override)
        if override
        else Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "brats2013_sample"
    )
    if not root.is_dir():
        pytest.skip(f"BraTS sample not found at {root}")
    return root.resolve()


@pytest.mark.slow
def test_brats_sample_run_with_a_held_out_institution(tmp_path: Path) -> None:
    """Real scans: FLAIR + T1c, tumour core (BraTS labels 1, 3, 4), site-C held out (~25 s)."""
    from secure_fl.data import PreprocessConfig, scan_brats_folder

    cases = scan_brats_folder(_brats_sample(), sites=3)
    datalist = write_datalist(cases, tmp_path / "dl.json", extra={"label_scheme": "brats"})
    data = DataConfig(
        datalist=str(datalist),
        val_fraction=0.5,
        holdout_sites=("site-C",),
        target="tumour_core",
        modalities=("flair", "t1c"),
    )
    config = tiny_config(
        datalist,
        rounds=1,
        data=data,
        preprocess=PreprocessConfig(grid=(32, 32, 32), patch=(16, 16, 16), samples_per_volume=1),
    )
    summary = run_experiment(config, tmp_path / "run", log=lambda _: None)
    assert summary.evaluation is not None
    test = summary.evaluation["fedavg"]["test"]
    held = {c.case_id for c in cases if c.site == "site-C"}
    assert {c["case_id"] for c in test["cases"]} == held and len(held) == 2
    for case in test["cases"]:
        assert 0.0 <= case["dice"] <= 1.0 and 0.0 <= case["hd95"] < 400.0  # mm, finite
