"""Datasets and loaders over a site's cases.

``make_dataset`` wraps the cases and the preprocessing of :mod:`secure_fl.data.transforms` in a
MONAI ``CacheDataset`` (the deterministic part, up to the patch sampling, is computed once and
kept in memory) or a plain ``Dataset``; ``make_loader`` wraps it in a seeded loader whose batches
are dictionaries of stacked tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing.pool import ThreadPool
from typing import Any

import torch
from monai.data.dataloader import DataLoader
from monai.data.dataset import CacheDataset, Dataset
from monai.data.utils import list_data_collate
from torch.utils.data import Dataset as TorchDataset

from secure_fl.data.datalist import Case
from secure_fl.data.transforms import PreprocessConfig, eval_transforms, train_transforms
from secure_fl.errors import ConfigError

__all__ = ["make_dataset", "make_loader"]


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class _CacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` whose caching progress bar is ours: named after the site, and
    drawn only when :func:`secure_fl.training.progress.progress_enabled` says so."""

    def __init__(self, *, progress: bool | None, progress_desc: str, **kwargs: Any) -> None:
        self._progress_enabled = progress
        self._progress_desc = progress_desc
        super().__init__(progress=False, **kwargs)

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list[Any]:
        from secure_fl.training.progress import track

        if self.cache_num <= 0:
            return []
        chosen = list(range(self.cache_num)) if indices is None else list(indices)
        with ThreadPool(self.num_workers) as pool:
            return list(
                track(
                    pool.imap(self._load_cache_item, chosen),
                    total=len(chosen),
                    desc=self._progress_desc,
                    unit="case",
                    enabled=self._progress_enabled,
                )
            )


def make_dataset(
    cases: Sequence[Case],
    cfg: PreprocessConfig,
    *,
    train: bool,
    cache: bool = True,
    seed: int | None = None,
    cache_workers: int = 1,
    progress: bool | None = None,
    progress_desc: str = "caching cases",
) -> Dataset:
    """A dataset of ``cases`` preprocessed by :func:`train_transforms` (``train=True``: each item
    is a list of ``cfg.samples_per_volume`` patch dictionaries) or :func:`eval_transforms` (each
    item one whole-grid dictionary).

    ``cache=True`` gives a MONAI ``CacheDataset`` that loads and preprocesses every case once, at
    construction, with ``cache_workers`` threads (memory per case at a 48^3 grid: about 0.9 MB
    for evaluation, 1.3 MB for training, which also keeps the patch-sampling indices);
    ``cache=False`` a plain ``Dataset`` that reads the files on every access. While caching, a
    progress bar labelled ``progress_desc`` counts the cases (``progress``: True/False, or None
    for only when stderr is a terminal; :mod:`secure_fl.training.progress`). ``seed`` seeds the random patch sampling and augmentation; without it, the sequence
    is fixed by :func:`monai.utils.set_determinism` or by the loader from :func:`make_loader`
    (which reseeds the transforms from its own seed). Evaluation datasets are deterministic.

    Errors: ConfigError if ``cases`` is empty or holds a non-Case, ``cfg`` is not a
    PreprocessConfig, ``seed`` is not an int >= 0 or ``cache_workers`` not an int >= 1. Failures
    while caching a case (a missing or corrupt file) surface as MONAI's RuntimeError, whose
    cause names the case; run :func:`secure_fl.data.checks.require_valid` first (the training
    runner does) to get one DataError that names every bad file and its reason instead.
    """
    cases = list(cases)
    if not cases:
        raise ConfigError("make_dataset: cases must be a non-empty sequence of Case")
    for i, case in enumerate(cases):
        if not isinstance(case, Case):
            raise ConfigError(f"make_dataset: cases[{i}] must be a Case, got {type(case).__name__}")
    if not isinstance(train, bool):
        raise ConfigError(f"make_dataset: train must be a bool, got {train!r}")
    if seed is not None:
        _check_int("make_dataset: seed", seed, 0)
    _check_int("make_dataset: cache_workers", cache_workers, 1)
    transform = train_transforms(cfg) if train else eval_transforms(cfg)
    if seed is not None:
        transform.set_random_state(seed=seed)
    data = [case.to_dict() for case in cases]
    if cache:
        return _CacheDataset(
            data=data,
            transform=transform,
            cache_rate=1.0,
            num_workers=cache_workers,
            copy_cache=True,
            progress=progress,
            progress_desc=progress_desc,
        )
    return Dataset(data=data, transform=transform)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A torch ``DataLoader`` (MONAI's subclass) over ``dataset``.

    Batches are dictionaries: ``image`` and ``label`` float32 tensors of shape (B, 1, D, H, W),
    ``site`` and ``case_id`` lists of strings. For a training dataset the patch lists are
    flattened (``monai.data.list_data_collate``), so ``B = batch_size * samples_per_volume``.

    Guarantee: the case order (``shuffle``) and the random patches and augmentations depend only
    on ``seed`` (and ``num_workers``): two loaders built the same way yield identical batches,
    epoch after epoch. The loader reseeds the dataset's random transforms from ``seed`` when it
    is built.

    Errors: ConfigError if ``batch_size`` is not an int >= 1, ``seed`` or ``num_workers`` not an
    int >= 0, or ``dataset`` is not a MONAI/torch dataset.
    """
    if not isinstance(dataset, TorchDataset):
        raise ConfigError(f"make_loader: dataset must be a Dataset, got {type(dataset).__name__}")
    _check_int("make_loader: batch_size", batch_size, 1)
    _check_int("make_loader: seed", seed, 0)
    _check_int("make_loader: num_workers", num_workers, 0)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(shuffle),
        num_workers=num_workers,
        generator=generator,
        collate_fn=list_data_collate,
        drop_last=bool(drop_last),
    )
