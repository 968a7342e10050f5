"""The datalist file: one :class:`Case` per entry, site names, and reading and writing the JSON
(:func:`load_datalist`, :func:`write_datalist`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: The MRI sequences a case may carry. ``flair`` is always the case's ``image``; the others are
#: optional datalist keys of the same names (paths), stacked as input channels on request
#: (``data.modalities``).
MODALITIES = ("flair", "t1", "t1c", "t2")
EXTRA_MODALITIES = MODALITIES[1:]


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
    ``brainmask`` are NIfTI paths; ``str`` values are converted to :class:`~pathlib.Path`.
    ``modalities`` maps further MRI sequences of the same patient (``t1``, ``t1c``, ``t2``) to
    their NIfTI paths (FLAIR is ``image``). The paths are not checked here
    (:func:`load_datalist` and :func:`scan_brats_folder` check them).

    Errors: ConfigError if ``case_id`` or ``site`` is not a non-empty string, a path is not a
    path, or ``modalities`` names a sequence outside ``t1``, ``t1c``, ``t2``.
    """

    case_id: str
    site: str
    image: Path
    label: Path
    brainmask: Path | None = None
    modalities: Mapping[str, Path] = field(default_factory=dict, hash=False)

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
        if not isinstance(self.modalities, Mapping):
            raise ConfigError(
                f"Case.modalities must be a mapping, got {type(self.modalities).__name__}"
            )
        extra: dict[str, Path] = {}
        for key, value in self.modalities.items():
            if key not in EXTRA_MODALITIES:
                raise ConfigError(
                    f"Case.modalities: {key!r} is not one of {list(EXTRA_MODALITIES)} "
                    "(FLAIR is the case's image)"
                )
            if not isinstance(value, str | os.PathLike):
                raise ConfigError(
                    f"Case.modalities[{key!r}] must be a path, got {type(value).__name__}"
                )
            extra[key] = Path(value)
        object.__setattr__(self, "modalities", {k: extra[k] for k in sorted(extra)})

    def to_dict(self) -> dict[str, str]:
        """The MONAI dictionary of this case: ``image``, ``label``, [``brainmask``], one key per
        extra modality (``t1``, ``t1c``, ``t2``), ``site``, ``case_id``; paths as strings."""
        out = {"image": str(self.image), "label": str(self.label)}
        if self.brainmask is not None:
            out["brainmask"] = str(self.brainmask)
        for key, value in self.modalities.items():
            out[key] = str(value)
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
    have ``case_id``, ``brainmask`` (a path or null) and the further MRI sequences ``t1``,
    ``t1c``, ``t2`` (paths or null; :attr:`Case.modalities`); other keys are ignored. Without
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
        modalities = {
            key: field_path(i, entry, key) for key in EXTRA_MODALITIES if entry.get(key) is not None
        }
        parsed.append(
            {
                "case_id": case_id,
                "site": site,
                "image": image,
                "label": label,
                "brainmask": brainmask,
                "modalities": modalities,
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
    test: Sequence[Case] = (),
) -> Path:
    """Write ``cases`` as a datalist JSON that :func:`load_datalist` reads back to equal cases.

    Paths are written absolute when ``relative_to`` is None; otherwise relative to
    ``relative_to`` (POSIX separators), with a ``dataroot`` entry pointing there (relative to the
    JSON's folder) unless it is the JSON's folder itself. ``extra`` adds top-level keys (for
    example ``labels`` or ``description``). The file is replaced atomically. Returns ``path``.

    ``test`` adds a ``test`` section (the held-out test set,
    :mod:`secure_fl.training.heldout`), written the same way.

    Errors: ConfigError if ``cases`` is empty, holds a non-Case or duplicate case ids, or
    ``extra`` tries to override ``section``, ``test`` or ``dataroot``; if ``test`` holds a
    non-Case or a case id that is also in ``cases`` (a test case is never trained on).
    """
    cases = list(cases)
    test = list(test)
    if not cases:
        raise ConfigError("write_datalist: cases must be a non-empty sequence of Case")
    for i, case in enumerate(cases):
        if not isinstance(case, Case):
            raise ConfigError(
                f"write_datalist: cases[{i}] must be a Case, got {type(case).__name__}"
            )
    _check_unique_ids(cases, "write_datalist: cases")
    for i, case in enumerate(test):
        if not isinstance(case, Case):
            raise ConfigError(
                f"write_datalist: test[{i}] must be a Case, got {type(case).__name__}"
            )
    if test:
        _check_unique_ids([*cases, *test], "write_datalist: cases + test")
        if section == "test":
            raise ConfigError("write_datalist: section must not be 'test' when test is given")
    out = Path(path)
    json_dir = out.resolve().parent
    document: dict[str, Any] = {}
    if extra:
        clash = {section, "dataroot", *(["test"] if test else [])} & set(extra)
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

    def entry(case: Case) -> dict[str, str]:
        row = {"case_id": case.case_id, "site": case.site}
        row["image"] = render(case.image)
        row["label"] = render(case.label)
        if case.brainmask is not None:
            row["brainmask"] = render(case.brainmask)
        for key, value in case.modalities.items():
            row[key] = render(value)
        return row

    document[section] = [entry(case) for case in cases]
    if test:
        document["test"] = [entry(case) for case in test]
    atomic_write(out, json.dumps(document, indent=2) + "\n")
    return out
