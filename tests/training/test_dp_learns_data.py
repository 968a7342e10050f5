"""DP that learns: synthetic cohorts of realistic size (``data.synthetic_cases``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from secure_fl.errors import ConfigError
from secure_fl.training import config_from_mapping
from secure_fl.training.runner import resolve_cases


def cohort(tmp_path: Path, counts: list[int], sites: int = 2) -> Counter[str]:
    config = config_from_mapping(
        {
            "data": {
                "synthetic_dir": str(tmp_path / f"fed-{'-'.join(map(str, counts))}"),
                "synthetic_sites": sites,
                "synthetic_shape": [16, 16, 16],
                "synthetic_cases": counts,
            },
            "preprocess": {"grid": [16, 16, 16], "patch": [8, 8, 8]},
            "model": {"channels": [4, 8]},
        }
    )
    return Counter(c.site for c in resolve_cases(config, log=lambda _: None))


def test_cases_per_site_come_from_the_config(tmp_path: Path) -> None:
    assert cohort(tmp_path, [9]) == {"site-A": 9, "site-B": 9}
    assert cohort(tmp_path, [3, 11]) == {"site-A": 3, "site-B": 11}
    assert sum(cohort(tmp_path, [], sites=2).values()) == 10 + 8  # the default counts


@pytest.mark.parametrize(
    "counts,match",
    [
        ([8, 8, 8], r"data\.synthetic_cases must list 0, 1 or data\.synthetic_sites=2"),
        ([0], r"data\.synthetic_cases\[0\] must be an int in \[1, 10000\]"),
        ([8, 10_001], r"data\.synthetic_cases\[1\]"),
    ],
)
def test_bad_case_counts_are_named(counts: list[int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_mapping({"data": {"synthetic_sites": 2, "synthetic_cases": counts}})
