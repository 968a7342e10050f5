"""MONAI preprocessing for tumour segmentation on T2-FLAIR (and further MRI sequences), fit for
real scans.

Pipeline (dictionaries with ``image``, ``label`` and optionally ``brainmask`` paths, and ``t1``,
``t1c``, ``t2`` paths when those modalities are asked, as produced by
:meth:`secure_fl.data.datalist.Case.to_dict`)::

    [check every asked modality is there] -> load (NIfTI, channel first) -> RAS orientation
    -> [stack the modalities as channels] -> target region (label > 0, or label in foreground)
    -> brain mask (the file's, else first channel above background; always united with tumour)
    -> crop to the brain -> clip each channel to intensity percentiles inside the brain (native
       resolution, where saturated outlier voxels are still sharp)
    -> resize to the fixed grid -> z-score each channel inside the brain, 0 outside
    [train] -> foreground-aware random patches -> random flips, mild intensity scaling

Output per sample: ``image`` (C, D, H, W), one channel per modality, and ``label`` (1, D, H, W)
as plain float32 ``torch.Tensor`` (``cfg.grid`` for evaluation, ``cfg.patch`` for training),
label in {0, 1}; evaluation adds ``spacing`` (mm per grid voxel); the ``site`` and ``case_id``
strings pass through; the brain mask and the sampling indices are dropped so that batches
collate. Spatial metadata is not kept: predictions live on the grid.

The dictionary transforms live in :mod:`secure_fl.data.steps` (re-exported here); this module
holds the two pipelines that chain them (the order above is the contract) and re-exports
:class:`PreprocessConfig`, which lives in the torch-free :mod:`secure_fl.data.preprocess_config`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import CropForegroundd, RandCropByPosNegLabeld
from monai.transforms.intensity.dictionary import RandScaleIntensityd
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd, RandFlipd
from monai.transforms.utility.dictionary import DeleteItemsd, EnsureTyped, FgBgToIndicesd

from secure_fl.data.preprocess_config import PreprocessConfig as PreprocessConfig
from secure_fl.data.steps import SPACING as SPACING
from secure_fl.data.steps import BrainMaskd as BrainMaskd
from secure_fl.data.steps import ClipPercentilesd as ClipPercentilesd
from secure_fl.data.steps import RequireModalitiesd as RequireModalitiesd
from secure_fl.data.steps import ResizeToGridd as ResizeToGridd
from secure_fl.data.steps import StackModalitiesd as StackModalitiesd
from secure_fl.data.steps import TumourRegiond as TumourRegiond
from secure_fl.data.steps import WholeTumourd as WholeTumourd
from secure_fl.data.steps import ZScoreInMaskd as ZScoreInMaskd
from secure_fl.data.steps import modality_key
from secure_fl.errors import ConfigError

__all__ = [
    "BrainMaskd",
    "ClipPercentilesd",
    "PreprocessConfig",
    "RequireModalitiesd",
    "ResizeToGridd",
    "StackModalitiesd",
    "TumourRegiond",
    "WholeTumourd",
    "ZScoreInMaskd",
    "eval_transforms",
    "train_transforms",
]

IMAGE, LABEL, MASK = "image", "label", "brainmask"
_FG, _BG = f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"


def _common(cfg: PreprocessConfig, *, spacing: bool = False) -> list[Any]:
    stacked = cfg.modalities != ("flair",)
    images = [modality_key(m) for m in cfg.modalities]
    keys = [*images, LABEL, MASK]
    steps: list[Any] = []
    if stacked:
        steps.append(RequireModalitiesd(cfg.modalities))
        if "flair" not in cfg.modalities:
            steps.append(DeleteItemsd(keys=[IMAGE]))  # the FLAIR is not asked: not loaded
    if not cfg.use_brainmask:
        steps.append(DeleteItemsd(keys=[MASK]))  # not even loaded
    steps += [
        LoadImaged(
            keys=keys,
            reader="NibabelReader",
            dtype=np.float32,
            ensure_channel_first=True,
            image_only=True,
            allow_missing_keys=True,
        ),
        Orientationd(keys=keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        *([StackModalitiesd(cfg.modalities)] if stacked else []),
        TumourRegiond(keys=[LABEL], labels=cfg.foreground, allow_missing_keys=True),
        BrainMaskd(IMAGE, LABEL, MASK, use_file=cfg.use_brainmask),
        CropForegroundd(
            keys=[IMAGE, LABEL, MASK],
            source_key=MASK,
            margin=2,
            allow_smaller=True,
            allow_missing_keys=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        ClipPercentilesd(keys=[IMAGE], mask_key=MASK, percentiles=cfg.percentiles),
        ResizeToGridd(
            keys=[IMAGE, LABEL, MASK],
            spatial_size=cfg.grid,
            binary_keys=[LABEL, MASK],
            allow_missing_keys=True,
            spacing_key=SPACING if spacing else None,
        ),
        ZScoreInMaskd(keys=[IMAGE], mask_key=MASK),
    ]
    return steps


def _finish() -> list[Any]:
    return [
        DeleteItemsd(keys=[MASK, _FG, _BG]),
        EnsureTyped(
            keys=[IMAGE, LABEL],
            data_type="tensor",
            dtype=torch.float32,
            track_meta=False,
            allow_missing_keys=True,
        ),
    ]


def eval_transforms(cfg: PreprocessConfig) -> Compose:
    """Deterministic preprocessing of whole volumes for evaluation and inference.

    Input: a case dictionary (``image``, ``label``, optional ``brainmask`` NIfTI paths; other
    keys pass through). Output: ``image`` float32 (C, *cfg.grid), one channel per modality of
    ``cfg.modalities``, each z-scored inside the brain and 0 outside; ``label`` float32
    (1, *cfg.grid) in {0, 1} (the target region, ``cfg.foreground``); ``spacing`` float32 (3,),
    the size in mm of one grid voxel along each axis (for Hausdorff distances in mm). Without a
    ``label`` key (inference on unlabelled scans) the output has no ``label`` either.

    Errors: ConfigError if ``cfg`` is not a PreprocessConfig; per case (wrapped by MONAI in a
    RuntimeError whose cause is the ConfigError): a missing modality
    (:class:`RequireModalitiesd`, naming the case and the modality), see also
    :class:`BrainMaskd` and :class:`ZScoreInMaskd`.
    """
    _check_cfg(cfg)
    return Compose([*_common(cfg, spacing=True), *_finish()])


def train_transforms(cfg: PreprocessConfig) -> Compose:
    """Preprocessing plus foreground-aware patch sampling and light augmentation for training.

    Each input case yields a list of ``cfg.samples_per_volume`` dictionaries with ``image``
    float32 of shape (C, *cfg.patch) (C modalities) and ``label`` float32 of shape
    (1, *cfg.patch). A patch is centred on a tumour voxel with
    probability ``cfg.pos_fraction``, else on a tumour-free brain voxel (never on background
    outside the brain); a patch that would leave the volume is shifted inside. Cases without
    tumour yield negative patches only (MONAI warns). Augmentation: independent random flips
    along each axis (p = 0.5) and intensity scaling by a factor in [0.9, 1.1] (p = 0.5), which
    keeps the outside of the brain at 0. Random state: call ``.set_random_state(seed)`` on the
    result, or let :func:`secure_fl.data.loaders.make_loader` seed it.

    Errors: as :func:`eval_transforms`.
    """
    _check_cfg(cfg)
    pos = float(cfg.pos_fraction)
    sampling = [
        FgBgToIndicesd(keys=[LABEL], image_key=MASK, image_threshold=0.5),
        DeleteItemsd(keys=[MASK]),  # before the cache boundary: not kept in memory
        RandCropByPosNegLabeld(
            keys=[IMAGE, LABEL],
            label_key=LABEL,
            spatial_size=cfg.patch,
            pos=pos,
            neg=1.0 - pos,
            num_samples=cfg.samples_per_volume,
            fg_indices_key=_FG,
            bg_indices_key=_BG,
        ),
        RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=0),
        RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=1),
        RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys=[IMAGE], factors=0.1, prob=0.5),
    ]
    return Compose([*_common(cfg), *sampling, *_finish()])


def _check_cfg(cfg: object) -> None:
    if not isinstance(cfg, PreprocessConfig):
        raise ConfigError(f"cfg must be a PreprocessConfig, got {type(cfg).__name__}")
