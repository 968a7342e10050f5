"""The synthetic federation on disk: NIfTI files, ``datalist.json`` and a ``manifest.json`` that
makes :func:`generate_federation` idempotent (a complete folder with the same parameters is
reused, an interrupted one redone).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from secure_fl.atomic import atomic_write
from secure_fl.data.datalist import Case, write_datalist
from secure_fl.data.synthetic.phantom import (
    _MAX_SITES,
    GENERATOR_VERSION,
    _check_int,
    _check_shape,
    site_profiles,
    synthesize_case,
)
from secure_fl.errors import ConfigError

#: Cases per site for the default four sites; other site counts cycle through this tuple.
DEFAULT_CASE_COUNTS = (10, 8, 6, 12)

DATALIST_NAME = "datalist.json"

MANIFEST_NAME = "manifest.json"

_MANIFEST_FORMAT = "secure_fl.synthetic-federation"

# nibabel's constructor is untyped; calling it through a typed alias keeps mypy --strict quiet.
_NIFTI1_IMAGE: Callable[..., Any] = nib.Nifti1Image


def _nifti_bytes(array: npt.NDArray[Any]) -> bytes:
    image = _NIFTI1_IMAGE(array, affine=np.eye(4))
    image.header.set_xyzt_units("mm")
    image.header.set_data_dtype(array.dtype)
    # mtime=0 and no file name in the gzip header: the same array gives the same bytes.
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content_hash(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def _resolve_counts(sites: int, cases_per_site: int | Sequence[int] | None) -> list[int]:
    if cases_per_site is None:
        return [DEFAULT_CASE_COUNTS[i % len(DEFAULT_CASE_COUNTS)] for i in range(sites)]
    if isinstance(cases_per_site, int | np.integer) and not isinstance(cases_per_site, bool):
        return [_check_int("cases_per_site", cases_per_site, 1, 10_000)] * sites
    if not isinstance(cases_per_site, Sequence) or len(cases_per_site) != sites:
        raise ConfigError(
            f"cases_per_site must be an int >= 1 or a sequence of {sites} ints (one per site), "
            f"got {cases_per_site!r}"
        )
    return [_check_int(f"cases_per_site[{i}]", n, 1, 10_000) for i, n in enumerate(cases_per_site)]


def _describe_params(old: Any, new: Mapping[str, Any]) -> str:
    """``key: old -> new`` for each generator parameter that differs (the folder's -> asked)."""
    old = old if isinstance(old, Mapping) else {}
    diffs = [
        f"{key}: {old.get(key, '(absent)')} -> {value}"
        for key, value in new.items()
        if old.get(key) != value
    ]
    return "; ".join(diffs) or "unreadable parameters"


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        return None
    return manifest


def _is_complete(root: Path, manifest: dict[str, Any], params: dict[str, Any]) -> bool:
    files = manifest.get("files")
    if manifest.get("status") != "complete" or manifest.get("params") != params:
        return False
    if not isinstance(files, dict) or manifest.get("content_hash") != _content_hash(files):
        return False
    return all(
        (root / name).is_file() and _sha256_file(root / name) == digest
        for name, digest in files.items()
    )


def _remove_listed(root: Path, manifest: dict[str, Any] | None, keep: set[str]) -> None:
    """Delete the files an earlier manifest lists (and that we will not rewrite), then any folder
    they leave empty. Never touches files the manifest does not list."""
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return
    folders: set[Path] = set()
    for name in manifest["files"]:
        target = (root / name).resolve()
        if name in keep or root.resolve() not in target.parents:
            continue
        target.unlink(missing_ok=True)
        folders.update(p for p in target.parents if root.resolve() in p.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def generate_federation(
    out_dir: str | os.PathLike[str],
    *,
    sites: int = 4,
    cases_per_site: int | Sequence[int] | None = None,
    shape: tuple[int, int, int] = (48, 48, 48),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic multi-site federation under ``out_dir``; return its datalist path.

    Layout: ``out_dir/<site>/<case_id>/{flair,label,brainmask}.nii.gz`` (float32 image, uint8
    label 0/1/2, uint8 mask, 1 mm identity affine), ``out_dir/datalist.json`` (section
    ``training``, paths relative to ``out_dir``, a ``site`` and ``case_id`` per case) and
    ``out_dir/manifest.json`` (the parameters, the site profiles, a SHA-256 per file and a
    content hash). Sites are ``site-A``, ``site-B``, ...; case ids ``site-A-000``, ...
    ``cases_per_site`` defaults to (10, 8, 6, 12) cycled over the sites; an int gives every site
    that many cases; a sequence gives one count per site.

    Guarantees: deterministic (same parameters -> byte-identical files); if ``out_dir`` already
    holds a complete federation with the same parameters (every file present with its recorded
    hash), nothing is written and the existing datalist path is returned. An interrupted run
    (manifest marked incomplete, same parameters) is simply redone. Files are replaced
    atomically, so concurrent calls with the same parameters are safe. ``overwrite=True``
    regenerates, deleting only files that an earlier manifest in ``out_dir`` lists.

    Errors: ConfigError if a parameter is out of range (``sites`` in [1, 64], each case count in
    [1, 10000], ``shape`` three ints in [16, 256], ``seed`` >= 0), or if ``out_dir`` holds a
    different federation or other files and ``overwrite`` is False.
    """
    n_sites = _check_int("sites", sites, 1, _MAX_SITES)
    counts = _resolve_counts(n_sites, cases_per_site)
    grid = _check_shape(shape)
    seed = _check_int("seed", seed, 0, None)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be a bool, got {overwrite!r}")
    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "sites": n_sites,
        "cases_per_site": counts,
        "shape": list(grid),
        "seed": seed,
    }

    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir {str(root)!r} exists and is not a folder")
    manifest_path = root / MANIFEST_NAME
    previous = _read_manifest(manifest_path) if manifest_path.is_file() else None
    if previous is not None and _is_complete(root, previous, params):
        return root / DATALIST_NAME
    if not overwrite:
        if previous is not None and previous.get("params") != params:
            raise ConfigError(
                f"{root} holds a synthetic federation with other parameters "
                f"({_describe_params(previous.get('params'), params)}); choose another folder "
                f"(data.synthetic_dir in a config), or regenerate this one with `secure-fl data "
                f"synth {root} --overwrite` and the options you want (overwrite=True in Python)"
            )
        if previous is None and root.is_dir() and any(root.iterdir()):
            raise ConfigError(
                f"{root} is not empty and holds no synthetic-federation manifest ({MANIFEST_NAME}); "
                "choose an empty or new folder, or write into it anyway with `secure-fl data "
                "synth --overwrite` (overwrite=True in Python; its other files are kept)"
            )

    profiles = site_profiles(n_sites, seed=seed)
    base_manifest = {
        "format": _MANIFEST_FORMAT,
        "params": params,
        "profiles": [asdict(p) for p in profiles],
    }
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(
        manifest_path,
        (json.dumps({**base_manifest, "status": "incomplete"}, indent=2) + "\n").encode(),
    )

    files: dict[str, str] = {}
    cases: list[Case] = []
    size_classes: dict[str, str] = {}
    for site_index, (profile, count) in enumerate(zip(profiles, counts, strict=True)):
        for case_index in range(count):
            case_id = f"{profile.name}-{case_index:03d}"
            rng = np.random.default_rng(np.random.SeedSequence([seed, site_index, case_index]))
            case = synthesize_case(grid, profile, rng)
            size_classes[case_id] = case.size_class
            paths = {}
            for key, array in (
                ("flair", case.image),
                ("label", case.label),
                ("brainmask", case.brainmask),
            ):
                relative = f"{profile.name}/{case_id}/{key}.nii.gz"
                payload = _nifti_bytes(array)
                atomic_write(root / relative, payload)
                files[relative] = hashlib.sha256(payload).hexdigest()
                paths[key] = root / relative
            cases.append(
                Case(
                    case_id=case_id,
                    site=profile.name,
                    image=paths["flair"],
                    label=paths["label"],
                    brainmask=paths["brainmask"],
                )
            )

    datalist = write_datalist(
        cases,
        root / DATALIST_NAME,
        relative_to=root,
        extra={
            "name": "secure_fl synthetic federation",
            "labels": {"0": "background", "1": "oedema", "2": "tumour core"},
        },
    )
    files[DATALIST_NAME] = _sha256_file(datalist)
    _remove_listed(root, previous, keep=set(files))
    manifest = {
        **base_manifest,
        "status": "complete",
        "size_classes": size_classes,
        "files": files,
        "content_hash": _content_hash(files),
    }
    atomic_write(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return datalist
