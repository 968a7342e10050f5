"""Grouping cases by site and the deterministic per-site train/validation split
(:func:`split_by_site`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from secure_fl.data.datalist.cases import Case, _check_unique_ids
from secure_fl.errors import ConfigError


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
    least one for training), and 0 when ``val_fraction == 0``. A site with a single case trains
    on it and holds out none (its held-out list is empty: it has no validation metric, which the
    runner reports as absent rather than inventing one). The choice depends only on
    ``seed``, the site name and the site's case ids (not on input order or on other sites);
    both lists are sorted by case id. Sites come in sorted order.

    Errors: ConfigError if ``cases`` is empty, holds duplicate case ids, ``val_fraction`` is not
    in [0, 1), or ``seed`` is not an int >= 0.
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
        if val_fraction == 0 or n < 2:
            out[site] = (ordered, [])
            continue
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        chosen = set(_site_rng(seed, site).permutation(n)[:n_val].tolist())
        train = [c for j, c in enumerate(ordered) if j not in chosen]
        val = [c for j, c in enumerate(ordered) if j in chosen]
        out[site] = (train, val)
    return out
