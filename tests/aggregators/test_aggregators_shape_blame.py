"""An update of the wrong shape blames the site that sent it, not whichever site came first."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl import aggregators
from secure_fl.aggregators.base import agreed_spec, prepare
from secure_fl.encoding import flatten
from secure_fl.errors import ConfigError, InvalidUpdateError


def _update(shape: tuple[int, ...] = (4, 3), dtype: type = np.float32) -> list[np.ndarray]:
    return [np.ones(shape, dtype=dtype), np.ones(5, dtype=np.float32)]


@pytest.mark.parametrize("name", ["plain", "secagg", "secagg+"])
def test_the_first_site_is_blamed_when_it_is_the_odd_one_out(name: str) -> None:
    # Adversarial for the old rule (first site = reference): site-0 is wrong, sites 1-3 agree.
    updates = {f"site-{i}": _update() for i in range(4)}
    updates["site-0"] = _update((3, 4))
    with pytest.raises(InvalidUpdateError) as excinfo:
        aggregators.create(name).aggregate(updates)
    message = str(excinfo.value)
    assert message.startswith(
        "1 of 4 sites sent an update that differs from the structure shared by 3 of 4 sites "
        "['site-1', 'site-2', 'site-3']: site-0 "
    )
    assert "site 'site-0': entry 0 has shape (3, 4) but the reference has (4, 3)" in message
    for honest in ("site-1':", "site-2':", "site-3':"):
        assert honest not in message


def test_every_site_that_differs_is_named() -> None:
    updates = {f"s{i}": _update() for i in range(5)}
    updates["s0"] = _update((2, 2))
    updates["s3"] = _update(dtype=np.float64)
    with pytest.raises(InvalidUpdateError) as excinfo:
        prepare(updates, None, ())
    message = str(excinfo.value)
    assert "2 of 5 sites sent an update that differs" in message and ": s0, s3 (" in message
    assert "entry 0 has dtype float64" in message and "entry 0 has shape (2, 2)" in message


def test_a_tie_names_every_group_and_blames_no_one() -> None:
    updates = {"a": _update(), "b": _update((3, 4))}
    with pytest.raises(InvalidUpdateError, match="cannot be told: \\['b'\\] vs \\['a'\\]"):
        prepare(updates, None, ())


def test_the_model_structure_wins_over_the_majority() -> None:
    model = flatten(_update())[1]
    updates = {"a": _update(), "b": _update((3, 4)), "c": _update((3, 4))}
    with pytest.raises(InvalidUpdateError) as excinfo:
        prepare(updates, None, (), expected=model)
    assert "2 of 3 sites sent an update that differs from the model's structure: b, c" in str(
        excinfo.value
    )
    good = {"a": _update(), "b": _update()}
    assert prepare(good, None, (), expected=model).spec == model
    with pytest.raises(InvalidUpdateError, match="model's structure: a, b"):
        prepare({"a": _update((3, 4)), "b": _update((3, 4))}, None, (), expected=model)
    with pytest.raises(ConfigError):
        agreed_spec({})


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=3, max_value=8),
    data=st.data(),
)
def test_property_the_minority_is_exactly_the_blamed_set(n: int, data: st.DataObject) -> None:
    wrong = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=(n - 1) // 2))
    updates = {f"site-{i}": _update((3, 4) if i in wrong else (4, 3)) for i in range(n)}
    with pytest.raises(InvalidUpdateError) as excinfo:
        prepare(updates, None, ())
    blamed = str(excinfo.value).split(": ", 1)[1].split(" (", 1)[0].split(", ")
    assert blamed == [f"site-{i}" for i in sorted(wrong)]
