"""Reading one NIfTI file for the data check without trusting it: bounded decompression of the whole
gzip stream, the header's promises against the data, and the shape, affine and voxel checks
that never raise on a bad file.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

_GZ_CHUNK = 1 << 20

# Files larger than this (decompressed) are refused before reading: 2 GiB is far above any
# single-channel MRI (a 512^3 float32 volume is 512 MiB) and bounds what a hostile file can cost.
_MAX_BYTES = 2 << 30

_NONE: npt.NDArray[Any] = np.empty(0)


@dataclass(frozen=True)
class _Volume:
    shape: tuple[int, ...]
    spatial: tuple[int, int, int] | None  # None when the shape is not one 3-D volume
    affine: npt.NDArray[np.float64]
    data: npt.NDArray[Any]
    nbytes: int


class _UnreadableError(Exception):
    """Internal: a file could not be read; the message is the reason."""


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (each bad case gets exactly one report line)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _read_raw(path: Path) -> bytes:
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise _UnreadableError("not a NIfTI file name (expected .nii or .nii.gz)")
    if not name.endswith(".gz"):
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise _UnreadableError(f"file too large ({size} bytes > {_MAX_BYTES})")
        return path.read_bytes()
    chunks: list[bytes] = []
    total = 0
    try:
        # gzip checks the CRC and length trailer at the end of the stream: reading to the end
        # catches a truncated or corrupted file even when the voxel data itself is complete.
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_GZ_CHUNK):
                total += len(chunk)
                if total > _MAX_BYTES:
                    raise _UnreadableError(f"decompresses to more than {_MAX_BYTES} bytes")
                chunks.append(chunk)
    except EOFError as exc:
        raise _UnreadableError("truncated gzip file (the compressed stream ends early)") from exc
    except gzip.BadGzipFile as exc:
        raise _UnreadableError(f"corrupt gzip file ({' '.join(str(exc).split())})") from exc
    except zlib.error as exc:
        raise _UnreadableError(f"corrupt gzip data ({' '.join(str(exc).split())})") from exc
    return b"".join(chunks)


def _parse(raw: bytes) -> tuple[Any, int]:
    """The nibabel image of a single-file NIfTI held in ``raw``, and the bytes its voxels need."""
    if len(raw) < 348:
        raise _UnreadableError(f"too short for a NIfTI header ({len(raw)} bytes)")
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 348 in sizes:
        klass: Any = nib.Nifti1Image
    elif 540 in sizes:
        klass = nib.Nifti2Image
    else:
        raise _UnreadableError("not a NIfTI-1 or NIfTI-2 file (bad header size field)")
    try:
        image = klass.from_bytes(raw)
    except Exception as exc:  # nibabel raises many types on a malformed header
        raise _UnreadableError(f"bad NIfTI header ({_one_line(exc)})") from exc
    header = image.header
    shape = tuple(int(s) for s in header.get_data_shape())
    dtype = header.get_data_dtype()
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    # The proxy's offset is the file's vox_offset (the image's header copy resets it to 0).
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
    if offset + needed > len(raw):
        raise _UnreadableError(
            f"truncated: the header promises {needed} bytes of voxel data from offset {offset}, "
            f"the file holds {max(0, len(raw) - offset)}"
        )
    return image, needed


def _load(path: Path, what: str, problems: list[str]) -> _Volume | None:
    """Read one file; append reasons for what is wrong to ``problems``; None if unusable."""
    if not path.is_file():
        problems.append("file does not exist")
        return None
    try:
        raw = _read_raw(path)
        image, nbytes = _parse(raw)
        del raw
        dtype = image.header.get_data_dtype()
        if dtype.fields is not None or not (
            np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
        ):
            raise _UnreadableError(f"voxel type {dtype} is not a real number type")
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except _UnreadableError as exc:
        problems.append(str(exc))
        return None
    except OSError as exc:
        problems.append(f"cannot read ({_one_line(exc)})")
        return None
    except Exception as exc:  # a hostile file must produce a reason, never a traceback
        problems.append(f"cannot read NIfTI data ({_one_line(exc)})")
        return None
    shape = tuple(int(s) for s in data.shape)
    spatial: tuple[int, int, int] | None = None
    if data.size == 0:
        problems.append(f"{what} is empty (shape {shape})")
    elif len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        spatial = (shape[0], shape[1], shape[2])
    else:
        problems.append(
            f"{what} is {len(shape)}-D with shape {shape}; expected one 3-D volume (D, H, W) "
            "or (D, H, W, 1)"
        )
    if not np.all(np.isfinite(affine)):
        problems.append("affine holds NaN or Inf")
    elif abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        problems.append("affine is degenerate (its voxel axes are linearly dependent)")
    return _Volume(shape, spatial, affine, data, nbytes)


def _sane(affine: npt.NDArray[np.float64]) -> bool:
    return bool(np.all(np.isfinite(affine))) and abs(float(np.linalg.det(affine[:3, :3]))) >= 1e-12


def _non_finite(data: npt.NDArray[Any]) -> str | None:
    if not np.issubdtype(data.dtype, np.floating):
        return None
    finite = np.isfinite(data)
    if bool(finite.all()):
        return None
    nan = int(np.count_nonzero(np.isnan(data)))
    inf = int(data.size - np.count_nonzero(finite) - nan)
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return f"holds {' and '.join(p for p in parts if p)} voxels (of {data.size})"


def _same_grid(ref: _Volume, other: _Volume, what: str, problems: list[str]) -> None:
    if ref.spatial is None or other.spatial is None:
        return
    if other.spatial != ref.spatial:
        problems.append(f"{what} shape {other.spatial} differs from the image's {ref.spatial}")
        return
    if not (_sane(ref.affine) and _sane(other.affine)):
        return  # already reported; a comparison would only repeat it
    zooms = np.linalg.norm(ref.affine[:3, :3], axis=0)
    tol = 1e-3 * max(float(zooms.min()), 1e-6)
    diff = float(np.abs(other.affine[:3, :] - ref.affine[:3, :]).max())
    if diff > tol:
        problems.append(
            f"{what} affine differs from the image's (largest difference {diff:.4g}): they do "
            "not share one voxel grid"
        )
