"""Tiny federations for training tests: 3 sites, small volumes, a small UNet."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_fl.data import generate_federation


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    return generate_federation(out, sites=3, cases_per_site=(4, 3, 3), shape=(24, 24, 24), seed=5)
