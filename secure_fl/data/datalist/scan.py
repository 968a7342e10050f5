"""Building a datalist from a BraTS-style folder: the files of each case found by name and the
institution read from the case name (:func:`scan_brats_folder`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from secure_fl.data.datalist.cases import Case, site_name
from secure_fl.errors import ConfigError

#: Institution code in BraTS 2017-2020 case names: ``Brats18_TCIA01_123_1`` -> ``TCIA01``,
#: ``BraTS19_CBICA_AAB_1`` -> ``CBICA``, ``Brats18_2013_10_1`` -> ``2013``. Names that carry no
#: institution (``BraTS20_Training_001``, ``BraTS2021_00000``, ``BraTS-GLI-00000-000``) do not match.
DEFAULT_SITE_PATTERN = (
    r"(?i)^brats\d{2}_(?!training_|validation_|testing_)(?P<site>[a-z]+\d*|\d{4})_"
)

# File names accepted in one case folder, in order of preference.
_IMAGE_GLOBS = (
    "*_flair.nii.gz",
    "*_flair.nii",
    "*-t2f.nii.gz",
    "*-t2f.nii",
    "flair.nii.gz",
    "flair.nii",
)

_LABEL_GLOBS = (
    "*_seg.nii.gz",
    "*_seg.nii",
    "*-seg.nii.gz",
    "*-seg.nii",
    "label.nii.gz",
    "label.nii",
    "seg.nii.gz",
    "seg.nii",
)

_MASK_GLOBS = ("*_brainmask.nii.gz", "*_brainmask.nii", "brainmask.nii.gz", "brainmask.nii")


def _globs(*stems: str) -> tuple[str, ...]:
    return tuple(f"{stem}{suffix}" for stem in stems for suffix in (".nii.gz", ".nii"))


# The further MRI sequences (Case.modalities), optional: BraTS 2017-2020 ``<case>_t1``,
# ``<case>_t1ce``, ``<case>_t2``; BraTS 2023 ``<case>-t1n``, ``-t1c``, ``-t2w``; plain names.
_MODALITY_GLOBS = {
    "t1": _globs("*_t1", "*-t1n", "t1"),
    "t1c": _globs("*_t1ce", "*_t1c", "*-t1c", "t1c", "t1ce"),
    "t2": _globs("*_t2", "*-t2w", "t2"),
}


def _find_one(folder: Path, globs: Iterable[str], what: str) -> Path | None:
    for pattern in globs:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(hits) > 1:
            names = [h.name for h in hits]
            raise ConfigError(f"case folder {str(folder)!r}: more than one {what} file: {names}")
        if hits:
            return hits[0]
    return None


def scan_brats_folder(
    root: str | os.PathLike[str],
    *,
    site_pattern: str | re.Pattern[str] = DEFAULT_SITE_PATTERN,
    sites: int | None = None,
) -> list[Case]:
    """Find the cases of a BraTS-style folder: one sub-folder per case.

    A case folder holds a FLAIR image (``<case>_flair.nii[.gz]``, BraTS 2023 ``<case>-t2f.nii[.gz]``
    or ``flair.nii[.gz]``), a segmentation (``<case>_seg``, ``<case>-seg``, ``label`` or ``seg``)
    and optionally a brain mask (``<case>_brainmask`` or ``brainmask``) and the further sequences
    T1 (``<case>_t1``, ``-t1n``, ``t1``), T1c (``<case>_t1ce``, ``_t1c``, ``-t1c``, ``t1c``) and
    T2 (``<case>_t2``, ``-t2w``, ``t2``), recorded in :attr:`Case.modalities`. The case id is the
    folder name. Files directly in ``root`` and hidden folders are ignored.

    Sites: with ``sites=None``, each case's institution is read from its folder name with
    ``site_pattern`` (the named group ``site``, else the first group); the default pattern reads
    BraTS 2017-2020 names (``Brats18_TCIA01_123_1`` -> ``TCIA01``, ``BraTS19_CBICA_AAB_1`` ->
    ``CBICA``). Names that carry no institution (``BraTS2021_00000``, the sample's
    ``brats_2013_pat0001_1``) need an explicit ``sites=K``: the cases, sorted by case id, are then
    dealt round-robin to sites ``site-A``, ``site-B``, ... (case ``j`` to site ``j mod K``). This
    is a simulated partition, not the true institutions; an explicit ``sites`` always takes
    precedence over names.

    Guarantee: cases sorted by case id, every path absolute and existing.

    Errors: ConfigError if ``root`` is not a folder or holds no case folder, a case folder lacks
    the FLAIR or the segmentation or holds two candidates for one, a name does not match
    ``site_pattern`` (when ``sites`` is None; the message lists the names and suggests
    ``sites=K``), ``sites`` is not an int in [1, number of cases], or ``site_pattern`` is not a
    valid regular expression.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(
            f"scan_brats_folder: root {str(folder)!r} does not exist or is not a folder"
        )
    case_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise ConfigError(f"scan_brats_folder: root {str(folder)!r} holds no case folders")

    found: list[tuple[str, Path, Path, Path | None]] = []
    extra: dict[str, dict[str, Path]] = {}
    for case_dir in case_dirs:
        image = _find_one(case_dir, _IMAGE_GLOBS, "FLAIR")
        label = _find_one(case_dir, _LABEL_GLOBS, "segmentation")
        if image is None or label is None:
            missing = "FLAIR image" if image is None else "segmentation"
            looked = _IMAGE_GLOBS if image is None else _LABEL_GLOBS
            raise ConfigError(
                f"case folder {str(case_dir)!r} has no {missing} (looked for {list(looked)})"
            )
        mask = _find_one(case_dir, _MASK_GLOBS, "brain mask")
        extra[case_dir.name] = {}
        for key, globs in _MODALITY_GLOBS.items():
            hit = _find_one(case_dir, globs, key.upper())
            if hit is not None:
                extra[case_dir.name][key] = hit.resolve()
        found.append((case_dir.name, image.resolve(), label.resolve(), mask and mask.resolve()))

    if sites is not None:
        if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= len(found):
            raise ConfigError(
                f"scan_brats_folder: sites must be an int in [1, {len(found)}] (the number of "
                f"cases), got {sites!r}"
            )
        return [
            Case(
                case_id=name,
                site=site_name(j % sites),
                image=img,
                label=lab,
                brainmask=msk,
                modalities=extra[name],
            )
            for j, (name, img, lab, msk) in enumerate(found)
        ]

    try:
        pattern = re.compile(site_pattern) if isinstance(site_pattern, str) else site_pattern
    except re.error as exc:
        raise ConfigError(f"scan_brats_folder: site_pattern is not a valid regex: {exc}") from exc
    cases: list[Case] = []
    unmatched: list[str] = []
    for name, img, lab, msk in found:
        match = pattern.search(name)
        site = None
        if match:
            site = match.groupdict().get("site") or (match.group(1) if pattern.groups else None)
        if not site:
            unmatched.append(name)
            continue
        cases.append(
            Case(
                case_id=name,
                site=site,
                image=img,
                label=lab,
                brainmask=msk,
                modalities=extra[name],
            )
        )
    if unmatched:
        shown = unmatched[:5] + (["..."] if len(unmatched) > 5 else [])
        raise ConfigError(
            f"scan_brats_folder: {len(unmatched)} case name(s) carry no institution matching "
            f"site_pattern {pattern.pattern!r}: {shown}; pass sites=K to assign the cases to K "
            "simulated sites round-robin"
        )
    return cases
