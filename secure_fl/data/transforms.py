"""MONAI preprocessing for whole-tumour segmentation on T2-FLAIR, fit for real scans.

Pipeline (dictionaries with ``image``, ``label`` and optionally ``brainmask`` paths, as produced by
:meth:`secure_fl.data.datalist.Case.to_dict`)::

    load (NIfTI, channel first) -> RAS orientation -> whole tumour (label > 0)
    -> brain mask (the file's, else image above background; always united with the tumour)
    -> crop to the brain -> clip to intensity percentiles inside the brain (native resolution,
       where saturated outlier voxels are still sharp)
    -> resize to the fixed grid -> z-score inside the brain, 0 outside
    [train] -> foreground-aware random patches -> random flips, mild intensity scaling

Output per sample: ``image`` and ``label`` as plain float32 ``torch.Tensor`` of shape
(1, D, H, W) (``cfg.grid`` for evaluation, ``cfg.patch`` for training), label in {0, 1}; the
``site`` and ``case_id`` strings pass through; the brain mask and the sampling indices are
dropped so that batches collate. Spatial metadata is not kept: predictions live on the grid.

Kept as one module (about 440 lines, over the ~400 guideline): it has one job, this pipeline. Its
configuration, the five dictionary transforms (which exist only for these pipelines) and the two
pipelines that chain them are read together: the order of the steps above is the contract.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config.type_definitions import KeysCollection
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import CropForegroundd, RandCropByPosNegLabeld
from monai.transforms.intensity.dictionary import RandScaleIntensityd
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd, RandFlipd
from monai.transforms.transform import MapTransform
from monai.transforms.utility.dictionary import DeleteItemsd, EnsureTyped, FgBgToIndicesd
from torch.nn import functional

from secure_fl.errors import ConfigError

__all__ = [
    "BrainMaskd",
    "ClipPercentilesd",
    "PreprocessConfig",
    "ResizeToGridd",
    "WholeTumourd",
    "ZScoreInMaskd",
    "eval_transforms",
    "train_transforms",
]

IMAGE, LABEL, MASK = "image", "label", "brainmask"
_FG, _BG = f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"
_MIN_GRID, _MAX_GRID = 8, 512
_MAX_SAMPLES = 64


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings.

    ``grid``: the (D, H, W) every brain is resized to after cropping, each in [8, 512].
    ``patch``: the training patch size, each in [4, grid]. ``samples_per_volume``: patches per
    volume and epoch, in [1, 64]. ``pos_fraction``: the share of patches centred on tumour, in
    [0, 1] (the rest are centred on tumour-free brain). ``percentiles``: (low, high) intensity
    percentiles inside the brain to clip to, 0 <= low < high <= 100. ``use_brainmask``: use the
    case's brain-mask file when it has one (else the brain is the image above background).

    Errors: ConfigError naming the field and its allowed range.
    """

    grid: tuple[int, int, int] = (48, 48, 48)
    patch: tuple[int, int, int] = (32, 32, 32)
    samples_per_volume: int = 2
    pos_fraction: float = 0.5
    percentiles: tuple[float, float] = (0.5, 99.5)
    use_brainmask: bool = True

    def __post_init__(self) -> None:
        grid = self.grid
        if (
            not isinstance(grid, tuple | list)
            or len(grid) != 3
            or not all(_is_int(g) and _MIN_GRID <= g <= _MAX_GRID for g in grid)
        ):
            raise ConfigError(
                f"PreprocessConfig.grid must be three ints in [{_MIN_GRID}, {_MAX_GRID}], got {grid!r}"
            )
        object.__setattr__(self, "grid", tuple(grid))
        patch = self.patch
        if (
            not isinstance(patch, tuple | list)
            or len(patch) != 3
            or not all(_is_int(p) and 4 <= p <= g for p, g in zip(patch, self.grid, strict=True))
        ):
            raise ConfigError(
                f"PreprocessConfig.patch must be three ints in [4, grid] with grid={self.grid}, "
                f"got {patch!r}"
            )
        object.__setattr__(self, "patch", tuple(patch))
        if not _is_int(self.samples_per_volume) or not 1 <= self.samples_per_volume <= _MAX_SAMPLES:
            raise ConfigError(
                f"PreprocessConfig.samples_per_volume must be an int in [1, {_MAX_SAMPLES}], "
                f"got {self.samples_per_volume!r}"
            )
        if not _is_real(self.pos_fraction) or not 0.0 <= self.pos_fraction <= 1.0:
            raise ConfigError(
                f"PreprocessConfig.pos_fraction must be a number in [0, 1], got {self.pos_fraction!r}"
            )
        pct = self.percentiles
        if (
            not isinstance(pct, tuple | list)
            or len(pct) != 2
            or not all(_is_real(p) for p in pct)
            or not 0.0 <= pct[0] < pct[1] <= 100.0
        ):
            raise ConfigError(
                "PreprocessConfig.percentiles must be (low, high) with 0 <= low < high <= 100, "
                f"got {pct!r}"
            )
        object.__setattr__(self, "percentiles", (float(pct[0]), float(pct[1])))
        if not isinstance(self.use_brainmask, bool):
            raise ConfigError(
                f"PreprocessConfig.use_brainmask must be a bool, got {self.use_brainmask!r}"
            )


def _case_name(data: Mapping[Hashable, Any]) -> str:
    """The best name for error messages: the case id, else the image file name."""
    if "case_id" in data:
        return str(data["case_id"])
    image = data.get(IMAGE)
    meta = getattr(image, "meta", None)
    if isinstance(meta, dict) and "filename_or_obj" in meta:
        return str(meta["filename_or_obj"])
    return "<unnamed case>"


def _plain(value: Any) -> torch.Tensor:
    """A plain torch tensor (MetaTensor metadata dropped)."""
    tensor = torch.as_tensor(value)
    as_tensor = getattr(tensor, "as_tensor", None)
    if callable(as_tensor):
        tensor = as_tensor()
    return tensor


class WholeTumourd(MapTransform):
    """Replace each label by the binary whole-tumour mask ``label > 0`` as float32 (BraTS labels
    1, 2, 4 or the synthetic 1, 2 all count as tumour)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            d[key] = (
                (label > 0).to(torch.float32)
                if isinstance(label, torch.Tensor)
                else (torch.as_tensor(np.asarray(label) > 0, dtype=torch.float32))
            )
        return d


class BrainMaskd(MapTransform):
    """Provide a binary brain mask under ``mask_key`` and check the case's arrays.

    The mask is the case's brain-mask file (``> 0.5``) when present and ``use_file`` is True,
    else the voxels above the image's background (its minimum: skull-stripped scans hold one
    constant background value, 0 raw or negative after z-scoring). It is always united with the
    tumour (``label > 0``): tumour is brain tissue, and expert labels can spill a few voxels past
    an automatic brain mask.

    Errors: ConfigError (naming the case) if the image is not a single-channel 3D volume, holds
    NaN or Inf, or its shape differs from the label's or the mask's, or the brain is empty.
    """

    def __init__(
        self,
        image_key: str = IMAGE,
        label_key: str = LABEL,
        mask_key: str = MASK,
        *,
        use_file: bool = True,
    ) -> None:
        super().__init__([image_key], allow_missing_keys=False)
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.use_file = use_file

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = _case_name(d)
        image = d[self.image_key]
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] != 1:
            shape = tuple(getattr(image, "shape", ()))
            raise ConfigError(
                f"case {name}: image must be one 3D volume (channel-first shape (1, D, H, W)), "
                f"got shape {shape}"
            )
        if not bool(torch.isfinite(image).all()):
            raise ConfigError(f"case {name}: image holds NaN or Inf values")
        for key in (self.label_key, self.mask_key):
            other = d.get(key)
            if other is not None and tuple(other.shape[1:]) != tuple(image.shape[1:]):
                raise ConfigError(
                    f"case {name}: {key} shape {tuple(other.shape[1:])} differs from image shape "
                    f"{tuple(image.shape[1:])}"
                )
        if self.use_file and d.get(self.mask_key) is not None:
            mask = d[self.mask_key] > 0.5
        else:
            low = image.min()
            span = image.max() - low
            mask = image > low + 1e-6 * span
        label = d.get(self.label_key)
        if label is not None:
            mask = mask | (label > 0)
        if not bool(mask.any()):
            raise ConfigError(f"case {name}: the brain mask is empty")
        d[self.mask_key] = mask.to(torch.float32)
        return d


class ClipPercentilesd(MapTransform):
    """Clip each image to its ``percentiles`` computed over the brain-mask voxels.

    Real scans carry saturated outlier voxels; clipping them before normalisation keeps them
    from inflating the standard deviation (and from being smeared by resampling, which is why
    this runs before the resize).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = MASK,
        percentiles: tuple[float, float] = (0.5, 99.5),
    ) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.percentiles = percentiles

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = _plain(d[self.mask_key]) > 0.5
        for key in self.key_iterator(d):
            image = d[key]
            inside = _plain(image)[mask].numpy()
            low, high = np.percentile(inside, self.percentiles)
            d[key] = torch.clamp(image, float(low), float(high))
        return d


def _resize(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resample a (C, D, H, W) volume to ``size``: area averaging along axes that shrink (exact
    anti-aliasing), then trilinear interpolation along axes that grow."""
    x = volume.to(torch.float32)[None]
    shape = tuple(int(s) for s in x.shape[2:])
    middle = tuple(min(s, t) for s, t in zip(shape, size, strict=True))
    if middle != shape:
        x = functional.adaptive_avg_pool3d(x, (middle[0], middle[1], middle[2]))
    if middle != size:
        x = functional.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x[0]


class ResizeToGridd(MapTransform):
    """Resample each key to ``spatial_size``; ``binary_keys`` are resampled the same way and then
    thresholded at 0.5 (a partial-volume majority vote, smoother than nearest neighbour when
    shrinking by 3-5x). Outputs are plain float32 tensors (spatial metadata is dropped)."""

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: tuple[int, int, int],
        binary_keys: Sequence[str] = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.binary_keys = set(binary_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        size = (self.spatial_size[0], self.spatial_size[1], self.spatial_size[2])
        for key in self.key_iterator(d):
            out = _resize(_plain(d[key]), size)
            d[key] = (out >= 0.5).to(torch.float32) if key in self.binary_keys else out
        return d


class ZScoreInMaskd(MapTransform):
    """Z-score each image over the brain-mask voxels; set voxels outside the brain to 0.

    Guarantee: inside the brain the output has mean 0 and standard deviation 1 (population std,
    up to float32 rounding).

    Errors: ConfigError (naming the case) if the brain holds fewer than 2 voxels or the image is
    constant there.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = MASK) -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = _plain(d[self.mask_key]) > 0.5
        for key in self.key_iterator(d):
            image = _plain(d[key]).to(torch.float32)
            inside = image[mask].to(torch.float64)
            std = float(inside.std(unbiased=False)) if inside.numel() >= 2 else 0.0
            if not std > 1e-8 * max(1.0, float(inside.abs().max()) if inside.numel() else 1.0):
                raise ConfigError(
                    f"case {_case_name(d)}: {key} is constant inside the brain; cannot normalise"
                )
            mean = float(inside.mean())
            d[key] = torch.where(mask, (image - mean) / std, torch.zeros_like(image))
        return d


def _common(cfg: PreprocessConfig) -> list[Any]:
    keys = [IMAGE, LABEL, MASK]
    steps: list[Any] = []
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
        WholeTumourd(keys=[LABEL], allow_missing_keys=True),
        BrainMaskd(IMAGE, LABEL, MASK, use_file=cfg.use_brainmask),
        CropForegroundd(
            keys=keys,
            source_key=MASK,
            margin=2,
            allow_smaller=True,
            allow_missing_keys=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        ClipPercentilesd(keys=[IMAGE], mask_key=MASK, percentiles=cfg.percentiles),
        ResizeToGridd(
            keys=keys, spatial_size=cfg.grid, binary_keys=[LABEL, MASK], allow_missing_keys=True
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
    keys pass through). Output: ``image`` float32 (1, *cfg.grid) z-scored inside the brain and 0
    outside; ``label`` float32 (1, *cfg.grid) in {0, 1} (whole tumour). Without a ``label`` key
    (inference on unlabelled scans) the output has no ``label`` either.

    Errors: ConfigError if ``cfg`` is not a PreprocessConfig; per case (wrapped by MONAI in a
    RuntimeError whose cause is the ConfigError): see :class:`BrainMaskd` and
    :class:`ZScoreInMaskd`.
    """
    _check_cfg(cfg)
    return Compose([*_common(cfg), *_finish()])


def train_transforms(cfg: PreprocessConfig) -> Compose:
    """Preprocessing plus foreground-aware patch sampling and light augmentation for training.

    Each input case yields a list of ``cfg.samples_per_volume`` dictionaries with ``image`` and
    ``label`` float32 of shape (1, *cfg.patch). A patch is centred on a tumour voxel with
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
