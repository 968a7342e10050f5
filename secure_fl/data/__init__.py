"""Data layer: datalists, site partitioning, the synthetic multi-site generator, MONAI transforms.

* :mod:`~secure_fl.data.datalist` - :class:`Case`, :func:`load_datalist`, :func:`write_datalist`,
  :func:`scan_brats_folder`, :func:`split_by_site`.
* :mod:`~secure_fl.data.synthetic` - :func:`generate_federation`, the built-in default data.
* :mod:`~secure_fl.data.preprocess_config` - :class:`PreprocessConfig` (torch-free).
* :mod:`~secure_fl.data.transforms` - :func:`train_transforms`,
  :func:`eval_transforms`.
* :mod:`~secure_fl.data.loaders` - :func:`make_dataset`, :func:`make_loader`.
* :mod:`~secure_fl.data.checks` - :func:`check_cases`, :func:`require_valid` (every bad scan named
  with its file and reason, before training).
* :mod:`~secure_fl.data.regions` - label schemes and tumour sub-regions: :func:`target_labels`
  (whole tumour, tumour core, enhancing tumour as label values), :data:`TARGETS`.

Only the datalist names are imported eagerly; the others load on first use (torch and MONAI are
heavy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from secure_fl.data.datalist import (
    Case,
    group_by_site,
    load_datalist,
    scan_brats_folder,
    site_name,
    split_by_site,
    write_datalist,
)
from secure_fl.data.regions import LABEL_SCHEMES, TARGETS, target_labels

if TYPE_CHECKING:
    from secure_fl.data.checks import CheckReport, check_cases, require_valid
    from secure_fl.data.loaders import make_dataset, make_loader
    from secure_fl.data.preprocess_config import PreprocessConfig
    from secure_fl.data.synthetic import SiteProfile, generate_federation, site_profiles
    from secure_fl.data.transforms import eval_transforms, train_transforms

_LAZY = {
    "CheckReport": "secure_fl.data.checks",
    "check_cases": "secure_fl.data.checks",
    "require_valid": "secure_fl.data.checks",
    "SiteProfile": "secure_fl.data.synthetic",
    "generate_federation": "secure_fl.data.synthetic",
    "site_profiles": "secure_fl.data.synthetic",
    "PreprocessConfig": "secure_fl.data.preprocess_config",
    "eval_transforms": "secure_fl.data.transforms",
    "train_transforms": "secure_fl.data.transforms",
    "make_dataset": "secure_fl.data.loaders",
    "make_loader": "secure_fl.data.loaders",
}

__all__ = [
    "LABEL_SCHEMES",
    "TARGETS",
    "Case",
    "CheckReport",
    "PreprocessConfig",
    "SiteProfile",
    "check_cases",
    "eval_transforms",
    "generate_federation",
    "group_by_site",
    "load_datalist",
    "make_dataset",
    "make_loader",
    "require_valid",
    "scan_brats_folder",
    "site_name",
    "site_profiles",
    "split_by_site",
    "target_labels",
    "train_transforms",
    "write_datalist",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_fl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
