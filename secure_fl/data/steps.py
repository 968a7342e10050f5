"""The dictionary transforms the preprocessing pipelines of :mod:`secure_fl.data.transforms` chain
(they exist only for those pipelines; the order of the steps is documented there).

Images may carry several channels (stacked MRI sequences, :class:`StackModalitiesd`); every
intensity step works channel by channel inside one brain mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config.type_definitions import KeysCollection
from monai.transforms.transform import MapTransform, Transform
from torch.nn import functional

from secure_fl.errors import ConfigError

__all__ = [
    "BrainMaskd",
    "ClipPercentilesd",
    "RequireModalitiesd",
    "ResizeToGridd",
    "StackModalitiesd",
    "TumourRegiond",
    "WholeTumourd",
    "ZScoreInMaskd",
]

IMAGE, LABEL, MASK, SPACING = "image", "label", "brainmask", "spacing"


def _case_name(data: Mapping[Hashable, Any]) -> str:
    """The best name for error messages: the case id, else the image file name."""
    if "case_id" in data:
        return str(data["case_id"])
    image = data.get(IMAGE)
    meta = getattr(image, "meta", None)
    if isinstance(meta, dict) and "filename_or_obj" in meta:
        return str(meta["filename_or_obj"])
    if isinstance(image, str):
        return image
    return "<unnamed case>"


def _plain(value: Any) -> torch.Tensor:
    """A plain torch tensor (MetaTensor metadata dropped)."""
    tensor = torch.as_tensor(value)
    as_tensor = getattr(tensor, "as_tensor", None)
    if callable(as_tensor):
        tensor = as_tensor()
    return tensor


def modality_key(name: str) -> str:
    """The case-dictionary key holding modality ``name`` (FLAIR is ``image``)."""
    return IMAGE if name == "flair" else name


class RequireModalitiesd(Transform):
    """Check, before anything is loaded, that the case dictionary holds every modality asked.

    Errors: ConfigError naming the case and each missing modality (and those it has).
    """

    def __init__(self, modalities: Sequence[str]) -> None:
        self.modalities = tuple(modalities)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        missing = [m for m in self.modalities if d.get(modality_key(m)) is None]
        if missing:
            present = [m for m in ("flair", "t1", "t1c", "t2") if d.get(modality_key(m))]
            raise ConfigError(
                f"case {_case_name(d)}: no {', '.join(missing)} image (data.modalities asks "
                f"for {list(self.modalities)}; the case has {present})"
            )
        return d


class StackModalitiesd(Transform):
    """Stack the loaded modalities, in the order given, as the channels of ``image``; their own
    keys are removed.

    Errors: ConfigError naming the case and the modality when a volume is not single-channel or
    its spatial shape differs from the first modality's.
    """

    def __init__(self, modalities: Sequence[str]) -> None:
        self.modalities = tuple(modalities)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        volumes = [d[modality_key(m)] for m in self.modalities]
        first = tuple(volumes[0].shape[1:])
        for name, volume in zip(self.modalities, volumes, strict=True):
            if volume.ndim != 4 or volume.shape[0] != 1 or tuple(volume.shape[1:]) != first:
                raise ConfigError(
                    f"case {_case_name(d)}: {name} has shape {tuple(volume.shape)}, expected one "
                    f"3D volume of the {self.modalities[0]} grid (1, {', '.join(map(str, first))})"
                )
        for name in self.modalities:
            d.pop(modality_key(name), None)
        d[IMAGE] = torch.cat(volumes, dim=0)
        return d


class TumourRegiond(MapTransform):
    """Replace each label by a binary float32 mask of a tumour (sub-)region: ``label > 0`` when
    ``labels`` is empty (whole tumour), else ``label`` in ``labels``
    (:func:`secure_fl.data.regions.target_labels`)."""

    def __init__(
        self,
        keys: KeysCollection,
        labels: Sequence[int] = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.labels = tuple(int(v) for v in labels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if not isinstance(label, torch.Tensor):
                label = torch.as_tensor(np.asarray(label))
            if self.labels:
                chosen = torch.as_tensor(self.labels, dtype=label.dtype, device=label.device)
                mask = torch.isin(label, chosen)
            else:
                mask = label > 0
            d[key] = mask.to(torch.float32)
        return d


class WholeTumourd(TumourRegiond):
    """Replace each label by the binary whole-tumour mask ``label > 0`` as float32 (BraTS labels
    1, 2, 4 or the synthetic 1, 2 all count as tumour)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, (), allow_missing_keys)


class BrainMaskd(MapTransform):
    """Provide a binary brain mask under ``mask_key`` and check the case's arrays.

    The mask is the case's brain-mask file (``> 0.5``) when present and ``use_file`` is True,
    else the voxels above the background of the image's first channel (its minimum:
    skull-stripped scans hold one constant background value, 0 raw or negative after
    z-scoring). It is always united with the tumour (``label > 0``): tumour is brain tissue, and
    expert labels can spill a few voxels past an automatic brain mask.

    Errors: ConfigError (naming the case) if the image is not a channel-first 3D volume (shape
    (C, D, H, W)), holds NaN or Inf, or its spatial shape differs from the label's or the
    mask's, or the brain is empty.
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
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] < 1:
            shape = tuple(getattr(image, "shape", ()))
            raise ConfigError(
                f"case {name}: image must be a 3D volume (channel-first shape (C, D, H, W)), "
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
            first = image[:1]
            low = first.min()
            span = first.max() - low
            mask = first > low + 1e-6 * span
        label = d.get(self.label_key)
        if label is not None:
            mask = mask | (label > 0)
        if not bool(mask.any()):
            raise ConfigError(f"case {name}: the brain mask is empty")
        d[self.mask_key] = mask.to(torch.float32)
        return d


class ClipPercentilesd(MapTransform):
    """Clip each channel of each image to its ``percentiles`` computed over the brain-mask voxels.

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
        mask = _plain(d[self.mask_key])[0] > 0.5
        for key in self.key_iterator(d):
            image = d[key]
            plain = _plain(image)
            channels = []
            for c in range(int(plain.shape[0])):
                low, high = np.percentile(plain[c][mask].numpy(), self.percentiles)
                channels.append(torch.clamp(image[c : c + 1], float(low), float(high)))
            d[key] = channels[0] if len(channels) == 1 else torch.cat(channels, dim=0)
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
    shrinking by 3-5x). Outputs are plain float32 tensors (spatial metadata is dropped).

    ``spacing_key``: when set, the size in mm of one output voxel along each axis (the input's
    voxel size, from its affine, times input size / output size) is stored there as a float32
    tensor of shape (3,), computed from the first key (for Hausdorff distances in mm).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: tuple[int, int, int],
        binary_keys: Sequence[str] = (),
        allow_missing_keys: bool = False,
        spacing_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.binary_keys = set(binary_keys)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        size = (self.spatial_size[0], self.spatial_size[1], self.spatial_size[2])
        if self.spacing_key is not None:
            first = d[self.first_key(d)]
            pixdim = getattr(first, "pixdim", None)
            voxel = [1.0, 1.0, 1.0] if pixdim is None else [float(v) for v in pixdim][:3]
            shape = [int(s) for s in first.shape[1:]]
            spacing = [v * s / t for v, s, t in zip(voxel, shape, size, strict=True)]
            d[self.spacing_key] = torch.tensor(spacing, dtype=torch.float32)
        for key in self.key_iterator(d):
            out = _resize(_plain(d[key]), size)
            d[key] = (out >= 0.5).to(torch.float32) if key in self.binary_keys else out
        return d


class ZScoreInMaskd(MapTransform):
    """Z-score each channel of each image over the brain-mask voxels; set voxels outside the
    brain to 0.

    Guarantee: inside the brain every channel has mean 0 and standard deviation 1 (population
    std, up to float32 rounding).

    Errors: ConfigError (naming the case and the channel) if the brain holds fewer than 2 voxels
    or a channel is constant there.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = MASK) -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = _plain(d[self.mask_key])[0] > 0.5
        for key in self.key_iterator(d):
            image = _plain(d[key]).to(torch.float32)
            out = torch.zeros_like(image)
            for c in range(int(image.shape[0])):
                inside = image[c][mask].to(torch.float64)
                std = float(inside.std(unbiased=False)) if inside.numel() >= 2 else 0.0
                scale = max(1.0, float(inside.abs().max()) if inside.numel() else 1.0)
                if not std > 1e-8 * scale:
                    which = key if image.shape[0] == 1 else f"{key} channel {c}"
                    raise ConfigError(
                        f"case {_case_name(d)}: {which} is constant inside the brain; cannot "
                        "normalise"
                    )
                mean = float(inside.mean())
                out[c] = torch.where(mask, (image[c] - mean) / std, torch.zeros_like(image[c]))
            d[key] = out
        return d
