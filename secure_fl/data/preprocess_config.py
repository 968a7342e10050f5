"""The preprocessing settings (:class:`PreprocessConfig`), torch-free.

Kept apart from :mod:`secure_fl.data.transforms` (which imports torch and MONAI) so that reading an
experiment configuration imports no torch; :mod:`secure_fl.data.transforms` and
:mod:`secure_fl.data` re-export the class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secure_fl.data.datalist.cases import MODALITIES
from secure_fl.errors import ConfigError

__all__ = ["PreprocessConfig"]

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
    ``foreground``: the label values that make up the target region (empty: every label > 0,
    the whole tumour; :func:`secure_fl.data.regions.target_labels` gives them for a BraTS
    sub-region; set them through ``data.target`` in an experiment). ``modalities``: the MRI
    sequences stacked, in this order, as the image's channels (``flair``, ``t1``, ``t1c``,
    ``t2``; the model's ``in_channels`` is their number; ``data.modalities`` in an experiment).

    Errors: ConfigError naming the field and its allowed range.
    """

    grid: tuple[int, int, int] = (48, 48, 48)
    patch: tuple[int, int, int] = (32, 32, 32)
    samples_per_volume: int = 2
    pos_fraction: float = 0.5
    percentiles: tuple[float, float] = (0.5, 99.5)
    use_brainmask: bool = True
    foreground: tuple[int, ...] = ()
    modalities: tuple[str, ...] = ("flair",)

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
        fg = self.foreground
        if (
            not isinstance(fg, tuple | list)
            or not all(_is_int(v) and 1 <= v <= 255 for v in fg)
            or len(set(fg)) != len(fg)
        ):
            raise ConfigError(
                "PreprocessConfig.foreground must list distinct label values in [1, 255] (empty: "
                f"every label > 0), got {fg!r}"
            )
        object.__setattr__(self, "foreground", tuple(sorted(fg)))
        mods = self.modalities
        if (
            not isinstance(mods, tuple | list)
            or not mods
            or not all(m in MODALITIES for m in mods)
            or len(set(mods)) != len(mods)
        ):
            raise ConfigError(
                f"PreprocessConfig.modalities must list distinct names from {list(MODALITIES)}, "
                f"at least one, got {mods!r}"
            )
        object.__setattr__(self, "modalities", tuple(mods))

    @property
    def in_channels(self) -> int:
        """The number of input channels of the model: one per modality."""
        return len(self.modalities)
