"""Fixtures for the transport tests: a federation factory whose processes die with the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from transport_helpers import Federation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    created: list[Federation] = []

    def make(sites: list[str], **kwargs: Any) -> Federation:
        fed = Federation(tmp_path / f"fed{len(created)}", sites, **kwargs)
        created.append(fed)
        return fed

    yield make
    for fed in created:
        fed.kill_all()
