"""A datalist's held-out ``test`` section: written beside ``training``, read back, kept apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_testutils import write_case

from secure_fl.data.datalist import load_datalist, write_datalist
from secure_fl.errors import ConfigError


def test_test_section_round_trips_and_never_shares_a_case(tmp_path: Path) -> None:
    train = [write_case(tmp_path / f"t{i}", seed=i, case_id=f"t{i}") for i in range(2)]
    test = [write_case(tmp_path / "x0", seed=9, case_id="x0", site="site-X")]
    path = write_datalist(train, tmp_path / "dl.json", relative_to=tmp_path, test=test)
    assert load_datalist(path) == train
    assert load_datalist(path, section="test") == test
    with pytest.raises(ConfigError, match="duplicate case id 't1'"):
        write_datalist(train, tmp_path / "bad.json", test=[train[1]])
    with pytest.raises(ConfigError, match=r"extra must not set \['test'\]"):
        write_datalist(train, tmp_path / "bad.json", test=test, extra={"test": []})
    assert not (tmp_path / "bad.json").exists()
