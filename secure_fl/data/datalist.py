"""Datalists: which NIfTI files make up each case, and which site (hospital) holds it.

A datalist is MONAI / Medical-Decathlon-style JSON::

    {"dataroot": "optional/base/folder",
     "training": [{"image": "a/flair.nii.gz", "label": "a/label.nii.gz", "site": "site-A",
                   "case_id": "a", "brainmask": "a/brainmask.nii.gz"}, ...]}

``image`` is the T2-FLAIR volume, ``label`` the tumour labels (whole tumour = ``label > 0``, as in
BraTS), ``brainmask`` an optional brain mask. Relative paths resolve against ``dataroot`` when the
file has one (itself relative to the JSON's folder), else against the JSON's folder.

Every check raises :class:`~secure_fl.errors.ConfigError` with a message that names the entry
(``training[3].label``) and what was expected; nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError

__all__ = [
    "DEFAULT_SITE_PATTERN",
    "Case",
    "group_by_site",
    "load_datalist",
    "scan_brats_folder",
    "site_name",
    "split_by_site",
    "write_datalist",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

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


def site_name(index: int) -> str:
    """Return the conventional name of the ``index``-th site: ``site-A`` ... ``site-Z``, ``site-AA``, ...

    Errors: ConfigError if ``index`` is not an int >= 0.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"site index must be an int >= 0, got {index!r}")
    letters = ""
    n = index + 1
    while n > 0:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"site-{letters}"


@dataclass(frozen=True)
class Case:
    """One patient scan held by one site.

    ``image`` (T2-FLAIR), ``label`` (tumour labels, whole tumour = ``label > 0``) and the optional
    ``brainmask`` are NIfTI paths; ``str`` values are converted to :class:`~pathlib.Path`. The paths
    are not checked here (:func:`load_datalist` and :func:`scan_brats_folder` check them).

    Errors: ConfigError if ``case_id`` or ``site`` is not a non-empty string.
    """

    case_id: str
    site: str
    image: Path
    label: Path
    brainmask: Path | None = None

    def __post_init__(self) -> None:
        for name in ("case_id", "site"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"Case.{name} must be a non-empty string, got {value!r}")
        for name in ("image", "label", "brainmask"):
            value = getattr(self, name)
            if value is None and name == "brainmask":
                continue
            if not isinstance(value, str | os.PathLike):
                raise ConfigError(f"Case.{name} must be a path, got {type(value).__name__}")
            object.__setattr__(self, name, Path(value))

    def to_dict(self) -> dict[str, str]:
        """The MONAI dictionary of this case: ``image``, ``label``, [``brainmask``], ``site``,
        ``case_id``; paths as strings."""
        out = {"image": str(self.image), "label": str(self.label)}
        if self.brainmask is not None:
            out["brainmask"] = str(self.brainmask)
        out["site"] = self.site
        out["case_id"] = self.case_id
        return out


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_unique_ids(cases: Sequence[Case], where: str) -> None:
    seen: dict[str, int] = {}
    for i, case in enumerate(cases):
        if case.case_id in seen:
            raise ConfigError(
                f"{where}[{i}].case_id: duplicate case id {case.case_id!r} "
                f"(also at index {seen[case.case_id]}); case ids must be unique"
            )
        seen[case.case_id] = i


def load_datalist(
    path: str | os.PathLike[str], *, section: str = "training", must_exist: bool = True
) -> list[Case]:
    """Read the cases of ``section`` from a MONAI/Decathlon-style datalist JSON.

    Each entry needs ``image``, ``label`` (path strings) and ``site`` (non-empty string); it may
    have ``case_id`` and ``brainmask`` (a path or null); other keys are ignored. Without
    ``case_id``, the case id is the image file name without its ``.nii``/``.nii.gz`` suffix when
    those names are unique in the section, else the image path relative to the base folder.

    ``must_exist=False`` skips the check that the files exist (for
    :func:`secure_fl.data.checks.check_cases`, which reports every missing file instead of the
    first one).

    Guarantee: every returned path is absolute and (with ``must_exist``) names an existing file;
    case ids are unique; cases come in file order.

    Errors: ConfigError (naming the section, the entry index and the field) if the file is
    missing or not JSON, ``section`` is not in it or is not a non-empty list, an entry lacks a key
    or has a value of the wrong type, a file does not exist (with ``must_exist``), a site is
    empty, or two entries share a case id.
    """
    json_path = Path(path)
    if not json_path.is_file():
        raise ConfigError(f"datalist path {str(json_path)!r} does not exist or is not a file")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"datalist {json_path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(
            f"datalist {json_path} must hold a JSON object, got {type(document).__name__}"
        )
    if not isinstance(section, str) or section not in document:
        sections = sorted(k for k, v in document.items() if isinstance(v, list))
        raise ConfigError(
            f"datalist {json_path}: section {section!r} not found; sections present: {sections}"
        )
    entries = document[section]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"datalist {json_path}: section {section!r} must be a non-empty list")

    base = json_path.resolve().parent
    if "dataroot" in document:
        dataroot = document["dataroot"]
        if not isinstance(dataroot, str) or not dataroot:
            raise ConfigError(f"datalist {json_path}: dataroot must be a non-empty path string")
        base = (base / dataroot).resolve()
        if not base.is_dir():
            raise ConfigError(f"datalist {json_path}: dataroot {str(base)!r} is not a folder")

    def field_path(i: int, entry: Mapping[str, Any], key: str) -> Path:
        where = f"datalist {json_path}: {section}[{i}].{key}"
        value = entry[key]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a path string, got {value!r}")
        resolved = Path(os.path.normpath(base / value))
        if must_exist and not resolved.is_file():
            raise ConfigError(f"{where}: file {str(resolved)!r} does not exist")
        return resolved

    parsed: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        where = f"datalist {json_path}: {section}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object, got {type(entry).__name__}")
        for key in ("image", "label", "site"):
            if key not in entry:
                raise ConfigError(f"{where}.{key}: missing required key {key!r}")
        site = entry["site"]
        if not isinstance(site, str) or not site.strip():
            raise ConfigError(f"{where}.site must be a non-empty string, got {site!r}")
        case_id = entry.get("case_id")
        if case_id is not None and (not isinstance(case_id, str) or not case_id.strip()):
            raise ConfigError(f"{where}.case_id must be a non-empty string, got {case_id!r}")
        image = field_path(i, entry, "image")
        label = field_path(i, entry, "label")
        brainmask = None
        if entry.get("brainmask") is not None:
            brainmask = field_path(i, entry, "brainmask")
        parsed.append(
            {
                "case_id": case_id,
                "site": site,
                "image": image,
                "label": label,
                "brainmask": brainmask,
            }
        )

    stems = [_strip_nifti_suffix(p["image"].name) for p in parsed]
    use_stems = len(set(stems)) == len(stems)
    for p, stem in zip(parsed, stems, strict=True):
        if p["case_id"] is None:
            if use_stems:
                p["case_id"] = stem
            else:
                rel = os.path.relpath(p["image"], base)
                p["case_id"] = _strip_nifti_suffix(Path(rel).as_posix())
    cases = [Case(**p) for p in parsed]
    _check_unique_ids(cases, f"datalist {json_path}: {section}")
    return cases


def write_datalist(
    cases: Sequence[Case],
    path: str | os.PathLike[str],
    *,
    relative_to: str | os.PathLike[str] | None = None,
    section: str = "training",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``cases`` as a datalist JSON that :func:`load_datalist` reads back to equal cases.

    Paths are written absolute when ``relative_to`` is None; otherwise relative to
    ``relative_to`` (POSIX separators), with a ``dataroot`` entry pointing there (relative to the
    JSON's folder) unless it is the JSON's folder itself. ``extra`` adds top-level keys (for
    example ``labels`` or ``description``). The file is replaced atomically. Returns ``path``.

    Errors: ConfigError if ``cases`` is empty, holds a non-Case or duplicate case ids, or
    ``extra`` tries to override ``section`` or ``dataroot``.
    """
    cases = list(cases)
    if not cases:
        raise ConfigError("write_datalist: cases must be a non-empty sequence of Case")
    for i, case in enumerate(cases):
        if not isinstance(case, Case):
            raise ConfigError(
                f"write_datalist: cases[{i}] must be a Case, got {type(case).__name__}"
            )
    _check_unique_ids(cases, "write_datalist: cases")
    out = Path(path)
    json_dir = out.resolve().parent
    document: dict[str, Any] = {}
    if extra:
        clash = {section, "dataroot"} & set(extra)
        if clash:
            raise ConfigError(f"write_datalist: extra must not set {sorted(clash)}")
        document.update(extra)

    root = None if relative_to is None else Path(relative_to).resolve()
    if root is not None and root != json_dir:
        document["dataroot"] = Path(os.path.relpath(root, json_dir)).as_posix()

    def render(p: Path) -> str:
        absolute = p.resolve()
        if root is None:
            return str(absolute)
        return Path(os.path.relpath(absolute, root)).as_posix()

    entries = []
    for case in cases:
        entry = {"case_id": case.case_id, "site": case.site}
        entry["image"] = render(case.image)
        entry["label"] = render(case.label)
        if case.brainmask is not None:
            entry["brainmask"] = render(case.brainmask)
        entries.append(entry)
    document[section] = entries
    atomic_write(out, json.dumps(document, indent=2) + "\n")
    return out


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
    and optionally a brain mask (``<case>_brainmask`` or ``brainmask``). The case id is the folder
    name. Files directly in ``root`` and hidden folders are ignored.

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
        found.append((case_dir.name, image.resolve(), label.resolve(), mask and mask.resolve()))

    if sites is not None:
        if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= len(found):
            raise ConfigError(
                f"scan_brats_folder: sites must be an int in [1, {len(found)}] (the number of "
                f"cases), got {sites!r}"
            )
        return [
            Case(case_id=name, site=site_name(j % sites), image=img, label=lab, brainmask=msk)
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
        cases.append(Case(case_id=name, site=site, image=img, label=lab, brainmask=msk))
    if unmatched:
        shown = unmatched[:5] + (["..."] if len(unmatched) > 5 else [])
        raise ConfigError(
            f"scan_brats_folder: {len(unmatched)} case name(s) carry no institution matching "
            f"site_pattern {pattern.pattern!r}: {shown}; pass sites=K to assign the cases to K "
            "simulated sites round-robin"
        )
    return cases


def group_by_site(cases: Iterable[Case]) -> dict[str, list[Case]]:
    """Cases per site, sites in sorted order, cases in input order."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.site, []).append(case)
    return {site: groups[site] for site in sorted(groups)}


def _site_rng(seed: int, site: str) -> np.random.Generator:
    # A stable digest of the site name, not hash() (which is salted per process).
    digest = hashlib.sha256(site.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def split_by_site(
    cases: Sequence[Case], *, val_fraction: float = 0.25, seed: int = 0
) -> dict[str, tuple[list[Case], list[Case]]]:
    """Split each site's cases into (train, held-out) lists, deterministically.

    Per site with ``n`` cases, ``n_val = round(val_fraction * n)`` clamped to [1, n - 1] when
    ``val_fraction > 0`` (so every site with >= 2 cases holds out at least one case and keeps at
    least one for training), and 0 when ``val_fraction == 0``. The choice depends only on
    ``seed``, the site name and the site's case ids (not on input order or on other sites);
    both lists are sorted by case id. Sites come in sorted order.

    Errors: ConfigError if ``cases`` is empty, holds duplicate case ids, ``val_fraction`` is not
    in [0, 1), ``seed`` is not an int >= 0, or a site has a single case while ``val_fraction > 0``.
    """
    cases = list(cases)
    if not cases:
        raise ConfigError("split_by_site: cases must be non-empty")
    _check_unique_ids(cases, "split_by_site: cases")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0 <= val_fraction < 1
    ):
        raise ConfigError(f"split_by_site: val_fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"split_by_site: seed must be an int >= 0, got {seed!r}")

    out: dict[str, tuple[list[Case], list[Case]]] = {}
    for site, members in group_by_site(cases).items():
        ordered = sorted(members, key=lambda c: c.case_id)
        n = len(ordered)
        if val_fraction == 0:
            out[site] = (ordered, [])
            continue
        if n < 2:
            raise ConfigError(
                f"split_by_site: site {site!r} has 1 case; a held-out split needs >= 2 cases per "
                "site (or val_fraction=0)"
            )
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        chosen = set(_site_rng(seed, site).permutation(n)[:n_val].tolist())
        train = [c for j, c in enumerate(ordered) if j not in chosen]
        val = [c for j, c in enumerate(ordered) if j in chosen]
        out[site] = (train, val)
    return out
