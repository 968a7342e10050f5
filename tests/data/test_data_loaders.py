"""make_dataset / make_loader: caching, batch shapes, collation and seeded determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import CacheDataset, Dataset

from secure_fl.data.datalist import Case, load_datalist
from secure_fl.data.loaders import make_dataset, make_loader
from secure_fl.data.synthetic import generate_federation
from secure_fl.data.transforms import PreprocessConfig
from secure_fl.errors import ConfigError

CFG = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=2)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    root = tmp_path_factory.mktemp("federation")
    return load_datalist(generate_federation(root, sites=2, cases_per_site=3, shape=(24, 24, 24)))


def _batches(loader: torch.utils.data.DataLoader, epochs: int = 2) -> list[dict]:  # type: ignore[type-arg]
    return [batch for _ in range(epochs) for batch in loader]


def test_eval_dataset_cached_equals_uncached(cases: list[Case]) -> None:
    cached = make_dataset(cases, CFG, train=False)
    plain = make_dataset(cases, CFG, train=False, cache=False)
    assert isinstance(cached, CacheDataset) and type(plain) is Dataset
    assert len(cached) == len(plain) == 6
    for i in range(len(cases)):
        assert torch.equal(cached[i]["image"], plain[i]["image"])
        assert torch.equal(cached[i]["label"], plain[i]["label"])
    loader = make_loader(cached, batch_size=4, shuffle=False, seed=0)
    first, second = list(loader)
    assert first["image"].shape == (4, 1, 24, 24, 24) and second["image"].shape == (
        2,
        1,
        24,
        24,
        24,
    )
    assert first["case_id"] == [c.case_id for c in cases[:4]]
    assert first["site"] == ["site-A", "site-A", "site-A", "site-B"]


def test_train_loader_batches_and_determinism(cases: list[Case]) -> None:
    def run(seed: int) -> list[dict]:  # type: ignore[type-arg]
        dataset = make_dataset(cases, CFG, train=True)
        return _batches(make_loader(dataset, batch_size=2, shuffle=True, seed=seed))

    a, b, c = run(3), run(3), run(4)
    assert len(a) == 6  # 3 batches per epoch, 2 epochs
    batch = a[0]
    assert batch["image"].shape == (4, 1, 16, 16, 16)  # batch_size * samples_per_volume
    assert batch["label"].shape == (4, 1, 16, 16, 16) and batch["label"].dtype == torch.float32
    assert len(batch["site"]) == 4 and len(batch["case_id"]) == 4
    for x, y in zip(a, b, strict=True):
        assert x["case_id"] == y["case_id"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    # Successive epochs draw new patches.
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a[:3], a[3:], strict=True))


def test_dataset_seed_without_loader(cases: list[Case]) -> None:
    one = make_dataset(cases[:2], CFG, train=True, cache=False, seed=11)
    two = make_dataset(cases[:2], CFG, train=True, cache=False, seed=11)
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(one[0], two[0], strict=True))


def test_errors(cases: list[Case]) -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        make_dataset([], CFG, train=True)
    with pytest.raises(ConfigError, match=r"cases\[0\] must be a Case"):
        make_dataset([{"image": "x"}], CFG, train=True)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="cfg must be a PreprocessConfig"):
        make_dataset(cases, None, train=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed must be an int >= 0"):
        make_dataset(cases, CFG, train=True, seed=-1)
    dataset = make_dataset(cases[:1], CFG, train=False, cache=False)
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        make_loader(dataset, batch_size=0, shuffle=False, seed=0)
    with pytest.raises(ConfigError, match="seed must be an int >= 0"):
        make_loader(dataset, batch_size=1, shuffle=False, seed=-2)
    with pytest.raises(ConfigError, match="dataset must be a Dataset"):
        make_loader([1, 2], batch_size=1, shuffle=False, seed=0)  # type: ignore[arg-type]
    missing = Case(
        "gone", "s", Path("/nonexistent/flair.nii.gz"), Path("/nonexistent/label.nii.gz")
    )
    with pytest.raises(RuntimeError):
        make_dataset([missing], CFG, train=False, cache=False)[0]
