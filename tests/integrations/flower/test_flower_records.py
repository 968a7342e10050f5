"""The layout of a secure_fl round in Flower messages (records.py): round trips and hostile records."""

from __future__ import annotations

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from secure_fl.errors import ConfigError, RemoteProtocolError  # noqa: E402
from secure_fl.integrations.flower import records  # noqa: E402
from secure_fl.integrations.flower.records import Envelope  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    stage=st.sampled_from(records.STAGES),
    round_id=st.integers(1, records.ROUND_ID_LIMIT - 1),
    frame=st.none() | st.binary(max_size=64),
    site_id=st.none() | st.integers(1, (1 << 32) - 1),
    weight=st.none() | st.floats(min_value=1e-9, max_value=1e12),
    left=st.none() | st.text(max_size=20),
)
def test_envelope_round_trips(stage, round_id, frame, site_id, weight, left):
    env = Envelope(stage, round_id, frame=frame, site_id=site_id, weight=weight, left=left)
    got = records.read(RecordDict({records.KEY: records.to_record(env)}))
    assert got is not None
    assert (got.stage, got.round_id, got.frame, got.site_id) == (stage, round_id, frame, site_id)
    assert got.weight == weight
    if left is not None:
        assert got.left == left.replace("\n", " ")


def test_a_message_without_our_record_is_not_ours():
    assert records.read(RecordDict({"config": ConfigRecord({"lr": 0.1})})) is None


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"v": 2, "stage": "train", "round": 1}, "secure_fl.v"),
        ({"v": 1, "stage": "decrypt", "round": 1}, "secure_fl.stage"),
        ({"v": 1, "stage": "train", "round": 0}, "secure_fl.round"),
        ({"v": 1, "stage": "train", "round": 1 << 62}, "secure_fl.round"),
        ({"v": 1, "stage": "train", "round": True}, "secure_fl.round"),
        ({"v": 1, "stage": "train", "round": 1, "frame": "text"}, "secure_fl.frame"),
        ({"v": 1, "stage": "train", "round": 1, "site_id": 0}, "secure_fl.site_id"),
        ({"v": 1, "stage": "train", "round": 1, "site_id": 1 << 32}, "secure_fl.site_id"),
        ({"v": 1, "stage": "train", "round": 1, "weight": float("nan")}, "secure_fl.weight"),
        ({"v": 1, "stage": "train", "round": 1, "weight": -1.0}, "secure_fl.weight"),
        ({"v": 1, "stage": "train", "round": 1, "weight": float("inf")}, "secure_fl.weight"),
        ({"v": 1, "stage": "train", "round": 1, "protocol": "plain"}, "unknown fields"),
    ],
)
def test_hostile_records_are_refused_naming_the_field(fields, named):
    with pytest.raises(RemoteProtocolError, match=named.replace(".", r"\.")):
        records.read(RecordDict({records.KEY: ConfigRecord(fields)}))


def test_a_long_reason_is_cut_and_kept_on_one_line():
    env = Envelope("setup", 7, left="PolicyError: " + "x\n" * 500)
    got = records.read(RecordDict({records.KEY: records.to_record(env)}))
    assert got is not None and got.left is not None
    assert len(got.left) == records.MAX_REASON and "\n" not in got.left


def test_local_envelope_errors_name_the_field():
    with pytest.raises(ConfigError, match="stage"):
        Envelope("nope", 1)
    with pytest.raises(ConfigError, match="weight"):
        Envelope("train", 1, weight=0.0)


def test_flatten_unflatten_keeps_keys_shapes_and_dtypes():
    arrays = ArrayRecord(
        {
            "conv.weight": Array(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
            "conv.bias": Array(np.array([0.5, -0.25])),
            "steps": Array(np.array([3], dtype=np.int64)),
        }
    )
    vector, layout = records.flatten(arrays)
    assert vector.dtype == np.float64 and vector.size == layout.size == 27
    back = records.unflatten(vector, layout)
    assert list(back.keys()) == list(arrays.keys())
    for key in arrays:
        a, b = arrays[key].numpy(), back[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_flatten_refuses_non_finite_and_empty_records():
    with pytest.raises(RemoteProtocolError, match=r"arrays\['w'\]"):
        records.flatten(ArrayRecord({"w": Array(np.array([1.0, np.nan]))}))
    with pytest.raises(RemoteProtocolError, match="no array"):
        records.flatten(ArrayRecord({}))


def test_unflatten_refuses_a_vector_of_another_length():
    _, layout = records.flatten(ArrayRecord({"w": Array(np.zeros(4))}))
    with pytest.raises(ConfigError, match="4"):
        records.unflatten(np.zeros(5), layout)
