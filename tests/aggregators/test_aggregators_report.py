"""Every aggregator's report has the same keys; secagg's value clipping is logged at WARNING."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from secure_fl import aggregators
from secure_fl.aggregators.base import REPORT_KEYS, AggregationReport

NAMES = ("plain", "secagg", "secagg+", "ckks")


def _updates(n: int, seed: int = 0, scale: float = 0.01) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        f"site-{i}": [
            (scale * rng.standard_normal((4, 3))).astype(np.float32),
            (scale * rng.standard_normal(5)).astype(np.float32),
        ]
        for i in range(n)
    }


def _create(name: str) -> aggregators.Aggregator:
    return (
        aggregators.create(name) if name in ("plain", "ckks") else aggregators.create(name, seed=4)
    )


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    updates = _updates(4)
    out = {}
    for name in NAMES:
        result = _create(name).aggregate(updates, dropped=["site-3"])
        out[name] = dict(result.report)
    return out


def test_the_report_keys_are_one_documented_list() -> None:
    assert tuple(f.name for f in dataclasses.fields(AggregationReport)) == REPORT_KEYS
    assert len(set(REPORT_KEYS)) == len(REPORT_KEYS)
    for key in REPORT_KEYS:  # each key is documented in the class docstring
        assert f"``{key}``" in (AggregationReport.__doc__ or ""), key


@pytest.mark.parametrize("name", NAMES)
def test_every_aggregator_reports_exactly_the_same_keys(reports: dict, name: str) -> None:
    assert list(reports[name]) == list(REPORT_KEYS)


def test_keys_that_do_not_apply_are_none_and_common_ones_are_set(reports: dict) -> None:
    plain, secagg, secagg_plus, ckks = (reports[n] for n in NAMES)
    for name, report in reports.items():
        assert report["aggregator"] == name
        assert report["included"] == ["site-0", "site-1", "site-2"]
        assert report["dropped"] == ["site-3"]
        assert report["clipped_total"] == 0
        for key in ("clipped", "clipped_updates", "bytes_sent", "seconds", "max_error"):
            assert report[key] is not None, (name, key)
        assert report["expansion"] > 0
    for key in ("threshold", "k", "active", "excluded", "bits", "frac_bits", "clip_range"):
        assert plain[key] is None and ckks[key] is None
        assert secagg[key] is not None and secagg_plus[key] is not None
    for key in ("preset", "poly_modulus_degree", "fingerprint", "ciphertexts", "workers"):
        assert plain[key] is None and secagg[key] is None and secagg_plus[key] is None
        assert ckks[key] is not None
    assert plain["server_seconds"] is None and plain["site_seconds"] is None
    assert plain["max_error"] == 0.0 and plain["expansion"] == 1.0
    assert secagg["round"] == 0 and ckks["round"] == 0


def test_the_report_dataclass_is_frozen() -> None:
    report = AggregationReport(
        aggregator="plain",
        included=["a"],
        dropped=[],
        clipped={"a": 0},
        clipped_total=0,
        clipped_updates=[],
        bytes_sent={"a": 4},
        seconds=0.0,
        max_error=0.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.aggregator = "x"  # type: ignore[misc]
    assert list(report.as_dict()) == list(REPORT_KEYS)


@pytest.mark.parametrize("name", ["secagg", "secagg+"])
def test_clipping_is_a_warning_naming_the_site_and_the_count(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    updates = _updates(4)
    updates["site-1"][0][0, 0] = 50.0
    updates["site-1"][1][:2] = -70.0
    updates["site-2"][1][4] = 11.0
    with caplog.at_level(logging.WARNING, logger="secure_fl.aggregators"):
        result = aggregators.create(name, clip_range=10.0, seed=1).aggregate(updates)
    assert result.report["clipped"] == {"site-0": 0, "site-1": 3, "site-2": 1, "site-3": 0}
    records = [
        r
        for r in caplog.records
        if r.name.startswith("secure_fl.aggregators") and r.levelno == logging.WARNING
    ]
    messages = [r.getMessage() for r in records]
    assert len(messages) == 2, messages
    site1 = next(m for m in messages if "'site-1'" in m)
    assert "3 of 17 values" in site1 and name in site1 and "clip_range" in site1
    site2 = next(m for m in messages if "'site-2'" in m)
    assert "1 of 17 values" in site2
    assert not any("site-0" in m or "site-3" in m for m in messages)


def test_no_warning_when_nothing_is_clipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="secure_fl.aggregators"):
        aggregators.create("secagg", seed=1).aggregate(_updates(3))
        aggregators.create("plain").aggregate(_updates(3, scale=100.0))
    assert not [r for r in caplog.records if r.name.startswith("secure_fl.aggregators")]
