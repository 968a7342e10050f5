"""Bytes for every round message: exact round trips, and malformed frames refused."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rounds_helpers import make_round

from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.rounds import (
    CkksResult,
    CkksSetup,
    CkksUpload,
    PlainSetup,
    PlainUpload,
    codec,
    run_local,
)
from secure_fl.rounds.codec import MAX_JSON_BYTES, decode, encode, register
from secure_fl.secagg import Phase


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if not (x.dtype == y.dtype and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _every_secagg_message() -> list[Any]:
    """Every message of a real active SecAgg+ round with a sparse graph and one dropout."""
    r = make_round("secagg+", 8, 12, seed=5, dropout_rate=0.0, l2_clip=2.0)
    assert r.plan.secagg is not None and r.plan.secagg.sparse
    seen: list[Any] = []

    def keep(_phase: Phase, _site: int, message: Any) -> Any:
        seen.append(message)
        return message

    run_local(
        r.plan,
        r.updates,
        dropouts={3: Phase.MASKED_INPUT},
        signing_keys=r.keys,
        intercept=keep,
        intercept_reply=keep,
    )
    return seen


def test_every_secagg_message_type_round_trips_exactly() -> None:
    messages = _every_secagg_message()
    kinds = {type(m).__name__ for m in messages}
    assert kinds == {
        "SecAggSetup",
        "AdvertiseKeys",
        "KeyRoster",
        "RevealNonce",
        "RevealSet",
        "ShareKeys",
        "ShareDelivery",
        "MaskedInput",
        "ConsistencyRequest",
        "ConsistencySignature",
        "UnmaskRequest",
        "UnmaskResponse",
    }
    for message in messages:
        data = encode(message)
        back = decode(data)
        assert _same(message, back), type(message).__name__
        assert encode(back) == data


@pytest.mark.parametrize(
    "message",
    [
        PlainSetup(3, (1, 2, 5), 9, {1: 1.5, 2: 2.0, 5: 1e-3}, l2_clip=0.25),
        PlainSetup(0, (1, 2), 1, {1: 1.0, 2: 3.0}),
        PlainUpload(3, 2, np.array([0.1, -2.5, 1e300]), clipped=True),
        CkksSetup(
            4, bytes(range(32)), 8192, 2.0**40, 0.25, 100, 64, {1: 2.0, 2: 6.0}, 1.0, 5.0, '{"a":1}'
        ),
        CkksUpload(4, 2, b"\x00\x01ciphertexts"),
        CkksResult(4, b"model"),
    ],
)
def test_plain_and_ckks_messages_round_trip_exactly(message: Any) -> None:
    assert _same(decode(encode(message)), message)


def test_malformed_frames_are_refused_with_one_error_type() -> None:
    good = encode(PlainUpload(1, 2, np.zeros(4)))
    for bad in (b"", b"SFR", b"XYZ\x01\x03" + good[5:], good[:3] + b"\x09" + good[4:], good[:-1]):
        with pytest.raises(RemoteProtocolError):
            decode(bad)
    with pytest.raises(RemoteProtocolError, match="unknown round message tag"):
        decode(b"SFR\x01\xfe")
    twice = encode(PlainSetup(1, (1, 2), 3, {1: 1.0, 2: 1.0})).replace(b"[1,2]", b"[1,1]")
    with pytest.raises(RemoteProtocolError, match="twice"):
        decode(twice)


@settings(max_examples=200, deadline=None)
@given(tag=st.integers(0, 255), body=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_a_protocol_error(tag: int, body: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(b"SFR\x01" + bytes([tag]) + body)


def test_extensions_register_their_own_tags() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register(PlainUpload, 200, lambda m: b"", lambda b: None)
    with pytest.raises(ConfigError, match="tag"):
        register(int, 0, lambda m: b"", lambda b: None)
    with pytest.raises(ConfigError, match="no codec"):
        encode(object())


def _plain_setup_body(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "round_id": 1,
        "site_ids": [1, 2],
        "vector_length": 2,
        "weights": [[1, 1.0], [2, 1.0]],
        "l2_clip": None,
    }
    body.update(changes)
    return b"SFR\x01\x02" + json.dumps(body).encode()


def test_nasty_json_bodies_give_a_protocol_error_and_nothing_else() -> None:
    # Attack a5: a deeply nested body raised RecursionError, a huge integer OverflowError;
    # a8: inf / negative weights decoded and crashed the site half later.
    deep = b"SFR\x01\x02" + b"[" * 100_000 + b"]" * 100_000
    nasty = {
        "nested": (deep, "nested deeper"),
        "huge weight": (_plain_setup_body(weights=[[1, 10**400], [2, 1.0]]), r"weights\[1\]"),
        "inf weight": (
            b"SFR\x01\x02"
            + b'{"l2_clip":null,"round_id":1,"site_ids":[1],"vector_length":1,'
            + b'"weights":[[1,1e999]]}',
            r"weights\[1\] must be finite and > 0",
        ),
        "negative weight": (_plain_setup_body(weights=[[1, 1.0], [2, -1.0]]), r"weights\[2\]"),
        "zero weight": (_plain_setup_body(weights=[[1, 1.0], [2, 0]]), r"weights\[2\]"),
        "huge site id": (_plain_setup_body(site_ids=[1, 10**30]), "site_ids"),
        "negative length": (_plain_setup_body(vector_length=-5), "vector_length"),
        "negative clip": (_plain_setup_body(l2_clip=-1.0), "l2_clip"),
        "bad pair": (_plain_setup_body(weights=[[1, 1.0, 3]]), "site_id, weight"),
        "too long": (b"SFR\x01\x02" + b" " * (MAX_JSON_BYTES + 1), "limit"),
        "not utf-8": (b"SFR\x01\x02\xff\xfe", "PlainSetup"),
    }
    for data, match in nasty.values():
        with pytest.raises(RemoteProtocolError, match=match):
            decode(data)


def test_any_failure_inside_a_decoder_becomes_a_protocol_error() -> None:
    class Odd:
        pass

    def explode(_body: bytes) -> Any:
        raise RecursionError("deep")

    register(Odd, 201, lambda m: b"", explode)
    try:
        with pytest.raises(RemoteProtocolError, match="RecursionError"):
            decode(b"SFR\x01" + bytes([201]))
    finally:  # the registry is global: leave it as it was
        codec._BY_TAG.pop(201)
        codec._BY_TYPE.pop(Odd)
