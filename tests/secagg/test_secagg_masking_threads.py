"""The chunked, multi-threaded masking and unmasking give the same bits as one thread.

Every party's masked input and the server's sum are compared between ``SECURE_FL_THREADS=1`` and
several threads, with the same deterministic randomness, with and without dropouts, for SecAgg
and SecAgg+ (vectors of > 1 MiB so that the work really is split over threads)."""

from __future__ import annotations

import numpy as np
import pytest
from harness import modular_sum, random_inputs

from secure_fl.crypto import DeterministicRandom
from secure_fl.crypto.parallel import THREADS_ENV
from secure_fl.secagg import Phase, make_config, run_round
from secure_fl.secagg.messages import ClientMessage, MaskedInput

LENGTH = 300_001  # 1.2 MB of uint32: above the single-thread cut-off, not a whole chunk count


def _round(
    protocol: str, bits: int, dropouts: dict[int, Phase]
) -> tuple[dict, np.ndarray, frozenset]:
    config = make_config(
        list(range(1, 7)),
        vector_length=LENGTH,
        bits=bits,
        protocol=protocol,
        dropout_rate=0.2,
        corrupt_fraction=0.0,
    )
    inputs = random_inputs(config, seed=3)
    masked: dict[int, np.ndarray] = {}

    def record(phase: Phase, site: int, reply: ClientMessage) -> ClientMessage:
        if isinstance(reply, MaskedInput):
            masked[site] = reply.vector.copy()
        return reply

    result = run_round(
        config,
        inputs,
        dropouts=dropouts,
        randbytes=DeterministicRandom(b"threads"),
        intercept_reply=record,
    )
    np.testing.assert_array_equal(result.total, modular_sum(inputs, result.survivors, bits))
    return masked, result.total, result.survivors, inputs


@pytest.mark.parametrize(
    ("protocol", "bits", "dropouts"),
    [
        ("secagg", 32, {}),
        ("secagg", 64, {2: Phase.MASKED_INPUT}),
        ("secagg+", 32, {5: Phase.MASKED_INPUT}),
    ],
)
def test_masked_inputs_and_sum_do_not_depend_on_threads(
    monkeypatch: pytest.MonkeyPatch, protocol: str, bits: int, dropouts: dict[int, Phase]
) -> None:
    monkeypatch.setenv(THREADS_ENV, "1")
    one = _round(protocol, bits, dropouts)
    monkeypatch.setenv(THREADS_ENV, "3")
    three = _round(protocol, bits, dropouts)
    assert one[2] == three[2]
    assert one[0].keys() == three[0].keys() and one[0]
    for site, vector in one[0].items():
        np.testing.assert_array_equal(vector, three[0][site])
        assert not np.array_equal(vector, one[3][site])  # really masked
    np.testing.assert_array_equal(one[1], three[1])
