"""Check a datalist's NIfTI files before training, so that a bad scan is named, not a crash.

A truncated ``.nii.gz``, a 4-D image, a label on another grid or NaN voxels would otherwise
surface deep inside MONAI's caching threads as a long wrapped ``RuntimeError`` (for a truncated
file without its path), often followed by an abort. :func:`check_cases` reads every file of every
case once, directly with nibabel (no MONAI), and collects every problem of every case;
:func:`require_valid` raises one :class:`~secure_fl.errors.DataError` that lists them all.

What a case must satisfy (each file: ``image`` = T2-FLAIR, ``label``, optional ``brainmask``):

* the file exists and is a NIfTI-1 or NIfTI-2 file named ``.nii`` or ``.nii.gz`` (what MONAI's
  ``NibabelReader`` loads); a ``.gz`` file is one complete gzip stream (the whole stream is
  decompressed, so truncation and CRC errors are caught) and holds all the voxel data its
  header promises;
* one 3-D volume: shape (D, H, W), or (D, H, W, 1) - a 4-D file with a single volume along the
  4th axis is accepted because MONAI loads it as the same one-channel volume; any other 4-D
  (several volumes or modalities in one file), 5-D, 2-D or empty shape is refused;
* real-valued voxels, all finite (no NaN, no Inf);
* a sane affine: finite, with non-degenerate voxel axes;
* image: not constant (a constant image holds no brain to segment);
* label and brain mask: the image's spatial shape and (within 1e-3 of the smallest voxel size)
  its affine, so that voxel ``[i, j, k]`` of each file is the same point of the head;
* label: integer values (stored as integers or as integral floats) within ``label_values``
  (default BraTS 0..4; whole tumour is ``label > 0``);
* brain mask: at least one voxel > 0.5.

Cost: one read and decompression of each file plus a few vectorised passes over its voxels; no
resampling, no MONAI. Measured on this project's shared 2-core machine: the 36-case synthetic
federation (48^3) in 0.07 s, the six 240x240x155 BraTS 2013 sample cases (image, label, brain mask:
643 MB decompressed) in 2.3-2.4 s, about 0.4 of the time MONAI takes to cache the same cases for
evaluation. ``workers`` threads overlap the decompression (zlib and numpy release the GIL) where
cores are free.

Guarantee: every problem found is reported with its case, site, file and a reason; a case with
several problems lists them all; checking never raises on a bad file.

Layout (every name stays importable from ``secure_fl.data.checks``): :mod:`.report` (what is
reported), :mod:`.volumes` (reading one file safely) and :mod:`.cases` (checking cases).
"""

from secure_fl.data.checks.cases import (
    DEFAULT_LABEL_VALUES,
    check_cases,
    default_workers,
    parse_label_values,
    require_valid,
)
from secure_fl.data.checks.report import CheckReport, Problem

__all__ = [
    "DEFAULT_LABEL_VALUES",
    "CheckReport",
    "Problem",
    "check_cases",
    "default_workers",
    "parse_label_values",
    "require_valid",
]
