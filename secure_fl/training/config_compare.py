"""Comparing two resolved experiment configurations (``ExperimentConfig.to_dict()`` or a run
folder's config.json) key by key, and describing the differences on one line (used to refuse or
explain a resume, :mod:`secure_fl.training.run_folder`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_ABSENT = "(absent)"


def config_diff(
    old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    """The keys whose values differ between two resolved configurations (``to_dict()`` /
    config.json), as (dotted key, old, new); a key missing on one side shows ``"(absent)"``.

    ``defaults`` (a default configuration's ``to_dict()``): a key absent from ``old`` whose new
    value equals its default is not a difference - an option added to the product after ``old``
    was written, left at the behaviour ``old`` ran with."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, d: Any, where: str) -> None:
        if a is _ABSENT and d is not _ABSENT and b == d:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b), key=str):
                sub = f"{where}.{key}" if where else str(key)
                dk = d.get(key, _ABSENT) if isinstance(d, Mapping) else _ABSENT
                walk(a.get(key, _ABSENT), b.get(key, _ABSENT), dk, sub)
        elif a != b:
            out.append((where, a, b))

    walk(old, new, defaults if defaults is not None else _ABSENT, "")
    return out


def describe_diff(diff: Sequence[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``key: old -> new; ...`` on one line (values as JSON), at most ``limit`` keys."""
    parts = [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"and {len(diff) - limit} more")
    return "; ".join(parts)


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)
