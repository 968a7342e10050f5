"""The data check of whole cases: every file of every case read once (:mod:`.volumes`), labels
against the allowed values, grids compared, and the report (:func:`check_cases`,
:func:`require_valid`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.data.checks.report import CheckReport, Problem
from secure_fl.data.checks.volumes import _NONE, _load, _non_finite, _same_grid, _Volume
from secure_fl.data.datalist import Case
from secure_fl.errors import ConfigError, DataError

#: Label values accepted by default: BraTS 2013-2023 use 0 (background) and 1..4 (tumour classes).
DEFAULT_LABEL_VALUES: frozenset[int] = frozenset({0, 1, 2, 3, 4})


def _format_values(values: Iterable[int], limit: int = 8) -> str:
    shown = sorted(values)
    text = ", ".join(str(v) for v in shown[:limit])
    return f"[{text}{', ...' if len(shown) > limit else ''}]"


def _check_label_values(
    data: npt.NDArray[Any], allowed: frozenset[int] | None, problems: list[str]
) -> None:
    if np.issubdtype(data.dtype, np.floating):
        fractional = data != np.rint(data)
        count = int(np.count_nonzero(fractional))
        if count:
            example = float(data[fractional].flat[0])
            problems.append(
                f"label holds {count} non-integer voxels (e.g. {example:g}); labels must be "
                "integers"
            )
            return
    if data.size == 0:
        return
    low, high = int(data.min()), int(data.max())
    if high - low <= 1 << 16:
        counts = np.bincount((np.asarray(data, dtype=np.int64) - low).ravel())
        present = {low + int(v) for v in np.flatnonzero(counts)}
    else:
        present = {int(v) for v in np.unique(data)}
    if allowed is not None:
        outside = present - allowed
        if outside:
            problems.append(
                f"label values {_format_values(outside)} are outside the expected set "
                f"{_format_values(allowed)}"
            )
    elif low < 0:
        problems.append(f"label holds negative values (minimum {low})")


def _check_case(
    case: Case, allowed: frozenset[int] | None, check_brainmask: bool
) -> tuple[list[Problem], int]:
    found: list[Problem] = []
    read = 0

    def report(role: str, path: Path, reasons: list[str]) -> None:
        found.extend(Problem(case.case_id, case.site, role, path, r) for r in reasons)

    reasons: list[str] = []
    image = _load(case.image, "image", reasons)
    if image is not None:
        read += image.nbytes
        bad = _non_finite(image.data)
        if bad:
            reasons.append(f"image {bad}")
        elif image.data.size and image.spatial is not None:
            low, high = image.data.min(), image.data.max()
            if low == high:
                reasons.append(f"image is constant (every voxel = {float(low):g}): no brain")
    report("image", case.image, reasons)
    # Keep the image's grid for the label and mask comparisons, not its voxels (memory).
    ref = None if image is None else _Volume(image.shape, image.spatial, image.affine, _NONE, 0)
    image = None

    reasons = []
    label = _load(case.label, "label", reasons)
    if label is not None:
        read += label.nbytes
        if ref is not None:
            _same_grid(ref, label, "label", reasons)
        bad = _non_finite(label.data)
        if bad:
            reasons.append(f"label {bad}")
        else:
            _check_label_values(label.data, allowed, reasons)
    report("label", case.label, reasons)
    label = None

    if check_brainmask and case.brainmask is not None:
        reasons = []
        mask = _load(case.brainmask, "brainmask", reasons)
        if mask is not None:
            read += mask.nbytes
            if ref is not None:
                _same_grid(ref, mask, "brainmask", reasons)
            bad = _non_finite(mask.data)
            if bad:
                reasons.append(f"brainmask {bad}")
            elif mask.data.size and not bool((mask.data > 0.5).any()):
                reasons.append("brainmask is empty (no voxel > 0.5)")
        report("brainmask", case.brainmask, reasons)
    return found, read


def _check_options(
    cases: Sequence[Case], label_values: Collection[int] | None, workers: int
) -> frozenset[int] | None:
    for i, case in enumerate(cases):
        if not isinstance(case, Case):
            raise ConfigError(f"check_cases: cases[{i}] must be a Case, got {type(case).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ConfigError(f"check_cases: workers must be an int in [1, 64], got {workers!r}")
    if label_values is None:
        return None
    values = list(label_values)
    if not values or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(
            f"check_cases: label_values must be a non-empty collection of ints or None, "
            f"got {label_values!r}"
        )
    return frozenset(int(v) for v in values)


def check_cases(
    cases: Iterable[Case],
    *,
    label_values: Collection[int] | None = DEFAULT_LABEL_VALUES,
    check_brainmask: bool = True,
    workers: int = 1,
) -> CheckReport:
    """Read every file of every case and report every problem (the rules: see
    :mod:`secure_fl.data.checks`); never stops at the first bad case or file.

    ``label_values``: the allowed label values (None: any integer >= 0). ``check_brainmask``:
    check the brain-mask files too (pass False when the preprocessing ignores them).
    ``workers``: threads reading cases in parallel, in [1, 64].

    Guarantee: protects the training run (and the operator reading its log) against bad scans:
    returns a report naming each bad file and the reason; a corrupt or hostile file is reported,
    never raised (files that decompress to more than 2 GiB are refused unread).

    Errors: ConfigError if ``cases`` holds a non-Case, ``label_values`` is not a non-empty
    collection of ints (or None) or ``workers`` is out of range.
    """
    cases = list(cases)
    allowed = _check_options(cases, label_values, workers)
    if not isinstance(check_brainmask, bool):
        raise ConfigError(f"check_cases: check_brainmask must be a bool, got {check_brainmask!r}")
    t0 = time.perf_counter()
    if workers == 1 or len(cases) <= 1:
        results = [_check_case(c, allowed, check_brainmask) for c in cases]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(cases))) as pool:
            results = list(pool.map(lambda c: _check_case(c, allowed, check_brainmask), cases))
    problems = tuple(p for found, _ in results for p in found)
    total = sum(read for _, read in results)
    return CheckReport(len(cases), problems, time.perf_counter() - t0, total)


def require_valid(
    cases: Iterable[Case],
    *,
    label_values: Collection[int] | None = DEFAULT_LABEL_VALUES,
    check_brainmask: bool = True,
    workers: int = 1,
) -> CheckReport:
    """:func:`check_cases`, raising when any case is bad; returns the (clean) report otherwise.

    Errors: DataError whose message is a summary line followed by one ``error: <file>: <reason>
    (case <id>, site <site>)`` line per bad case; ConfigError as :func:`check_cases`.
    """
    report = check_cases(
        cases, label_values=label_values, check_brainmask=check_brainmask, workers=workers
    )
    if not report.ok:
        lines = "\n".join(f"error: {line}" for line in report.lines())
        raise DataError(
            f"{report.summary()}; fix or remove these cases from the datalist:\n{lines}"
        )
    return report


def parse_label_values(text: str) -> frozenset[int] | None:
    """Parse a comma-separated list of label values (``"0,1,2,4"``); ``"any"`` gives None.

    Errors: ConfigError naming ``--label-values`` and the expected form.
    """
    if text.strip().lower() == "any":
        return None
    try:
        values = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = frozenset()
    if not values:
        raise ConfigError(
            f"--label-values must be comma-separated integers (e.g. 0,1,2,4) or 'any', got {text!r}"
        )
    return values


def default_workers() -> int:
    """Threads for checking on this machine: the usable CPUs, at most 4."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(4, usable))
