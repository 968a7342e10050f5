"""What a malicious server or peer can and cannot do, and what the server sees."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from harness import modular_sum, random_inputs
from scipy import stats

from secure_fl.crypto import DeterministicRandom, SigningKey
from secure_fl.errors import LocalProtocolError, RemoteProtocolError, ThresholdError
from secure_fl.secagg import (
    ClientPhase,
    KeyRoster,
    MaskedInput,
    Phase,
    SecAggClient,
    SecAggServer,
    ShareDelivery,
    SitePolicy,
    UnmaskRequest,
    make_config,
    run_round,
)

SEMI = SitePolicy(require_active=False)  # these tests exercise the semi-honest variant by name


def _drive_to_unmask(n: int = 5, seed: str = "adv", length: int = 8):
    """Run phases 0-2 by hand; return config, inputs, clients, server and the unmask requests."""
    rand = DeterministicRandom(seed.encode())
    config = make_config(list(range(1, n + 1)), vector_length=length, bits=32, threshold=3)
    inputs = random_inputs(config, 11)
    clients = {
        i: SecAggClient(i, config, policy=SEMI, input_vector=inputs[i], randbytes=rand)
        for i in config.site_ids
    }
    server = SecAggServer(config)
    for c in clients.values():
        server.receive(c.start())
    for _ in range(2):
        for site, message in server.close_phase().items():
            server.receive(clients[site].handle(message))
    return config, inputs, clients, server


def test_refuses_unmask_request_naming_a_peer_dropped_and_surviving() -> None:
    _, _, clients, server = _drive_to_unmask()
    requests = server.close_phase()
    honest = requests[1]
    assert isinstance(honest, UnmaskRequest)
    attack = dataclasses.replace(honest, dropped=frozenset({2}))  # 2 is also a survivor
    with pytest.raises(RemoteProtocolError, match="both dropped and surviving"):
        clients[1].handle(attack)
    assert clients[1].phase is ClientPhase.ERROR
    # the error state is permanent: even the honest request is refused now
    with pytest.raises(LocalProtocolError, match="error state"):
        clients[1].handle(honest)


def test_refuses_unmask_request_that_omits_a_peer() -> None:
    _, _, clients, server = _drive_to_unmask()
    honest = server.close_phase()[1]
    attack = dataclasses.replace(honest, survivors=honest.survivors - {4})
    with pytest.raises(RemoteProtocolError, match="neither dropped nor surviving"):
        clients[1].handle(attack)


def test_tampered_share_is_rejected() -> None:
    def tamper(phase: Phase, site: int, message):
        if isinstance(message, ShareDelivery) and site == 2:
            sender, sealed = message.ciphertexts[0]
            flipped = bytes([sealed[-1] ^ 1])
            bad = ((sender, sealed[:-1] + flipped), *message.ciphertexts[1:])
            return dataclasses.replace(message, ciphertexts=bad)
        return message

    rand = DeterministicRandom(b"tamper")
    config = make_config(list(range(1, 7)), vector_length=8, bits=32, threshold=3)
    inputs = random_inputs(config, 5)
    result = run_round(config, inputs, randbytes=rand, intercept=tamper)
    assert isinstance(result.client_errors[2], RemoteProtocolError)
    assert "failed authentication" in str(result.client_errors[2])
    # site 2 refused to go on; the others' sum is still exact
    assert result.survivors == frozenset({1, 3, 4, 5, 6})
    np.testing.assert_array_equal(result.total, modular_sum(inputs, result.survivors, 32))


def test_share_redirected_to_another_site_is_rejected() -> None:
    captured: dict[int, ShareDelivery] = {}

    def redirect(phase: Phase, site: int, message):
        if isinstance(message, ShareDelivery):
            captured[site] = message
            if site == 3 and 2 in captured:
                # deliver to site 3 the ciphertext from site 1 that was addressed to site 2
                stolen = dict(captured[2].ciphertexts)[1]
                bad = tuple((s, stolen if s == 1 else c) for s, c in message.ciphertexts)
                return dataclasses.replace(message, ciphertexts=bad)
        return message

    rand = DeterministicRandom(b"redirect")
    config = make_config(list(range(1, 6)), vector_length=8, bits=32, threshold=3)
    result = run_round(config, random_inputs(config, 6), randbytes=rand, intercept=redirect)
    assert "failed authentication" in str(result.client_errors[3])


def test_share_replayed_from_another_round_is_rejected() -> None:
    rand = DeterministicRandom(b"replay")
    old: dict[int, ShareDelivery] = {}

    def record(phase: Phase, site: int, message):
        if isinstance(message, ShareDelivery):
            old[site] = message
        return message

    def replay(phase: Phase, site: int, message):
        if isinstance(message, ShareDelivery) and site == 1:
            return dataclasses.replace(old[1], round_id=message.round_id)
        return message

    ids = list(range(1, 6))
    first = make_config(ids, vector_length=8, bits=32, threshold=3, round_id=0)
    run_round(first, random_inputs(first, 1), randbytes=rand, intercept=record)
    second = make_config(ids, vector_length=8, bits=32, threshold=3, round_id=1)
    result = run_round(second, random_inputs(second, 2), randbytes=rand, intercept=replay)
    assert "failed authentication" in str(result.client_errors[1])


def test_wrong_round_and_wrong_phase_are_refused() -> None:
    rand = DeterministicRandom(b"phase")
    config = make_config(list(range(1, 4)), vector_length=4, bits=32, threshold=2)
    inputs = random_inputs(config, 0)
    client = SecAggClient(1, config, policy=SEMI, input_vector=inputs[1], randbytes=rand)
    advert = client.start()
    with pytest.raises(RemoteProtocolError, match="round"):
        client.handle(KeyRoster(round_id=config.round_id + 1, adverts=(advert,)))
    assert client.phase is ClientPhase.ERROR

    other = SecAggClient(2, config, policy=SEMI, input_vector=inputs[2], randbytes=rand)
    other.start()
    request = UnmaskRequest(config.round_id, frozenset({1, 2}), frozenset())
    with pytest.raises(RemoteProtocolError, match="not allowed in phase"):
        other.handle(request)
    assert other.phase is ClientPhase.ERROR


def test_server_rejects_bad_messages_without_disturbing_the_round() -> None:
    rand = DeterministicRandom(b"server")
    config = make_config(list(range(1, 5)), vector_length=6, bits=32, threshold=3)
    inputs = random_inputs(config, 4)
    clients = {
        i: SecAggClient(i, config, policy=SEMI, input_vector=inputs[i], randbytes=rand)
        for i in range(1, 5)
    }
    server = SecAggServer(config)
    adverts = {i: c.start() for i, c in clients.items()}
    for advert in adverts.values():
        server.receive(advert)
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        server.receive(adverts[1])
    with pytest.raises(RemoteProtocolError, match="not allowed in phase"):
        server.receive(MaskedInput(0, 1, np.zeros(6, dtype=np.uint32)))
    for site, message in server.close_phase().items():
        server.receive(clients[site].handle(message))
    for site, message in server.close_phase().items():
        reply = clients[site].handle(message)
        if site == 1:
            with pytest.raises(RemoteProtocolError, match="masked input must be"):
                server.receive(MaskedInput(0, 1, np.zeros(5, dtype=np.uint32)))
            with pytest.raises(RemoteProtocolError, match="masked input must be"):
                server.receive(MaskedInput(0, 1, np.zeros(6, dtype=np.uint64)))
        server.receive(reply)
    for site, message in server.close_phase().items():
        server.receive(clients[site].handle(message))
    server.close_phase()
    np.testing.assert_array_equal(server.result(), modular_sum(inputs, frozenset(inputs), 32))


def test_server_below_threshold_has_no_result() -> None:
    rand = DeterministicRandom(b"abort")
    config = make_config(list(range(1, 5)), vector_length=4, bits=32, threshold=3)
    server = SecAggServer(config)
    clients = [SecAggClient(i, config, policy=SEMI, randbytes=rand) for i in (1, 2)]
    for c in clients:
        server.receive(c.start())
    with pytest.raises(ThresholdError):
        server.close_phase()
    with pytest.raises(LocalProtocolError):
        server.result()
    with pytest.raises(RemoteProtocolError):
        server.receive(SecAggClient(3, config, policy=SEMI, randbytes=rand).start())


def test_active_variant_detects_equivocating_server() -> None:
    rand = DeterministicRandom(b"active")
    keys = {i: SigningKey.generate(rand) for i in range(1, 6)}
    config = make_config(
        list(range(1, 6)),
        vector_length=8,
        bits=32,
        threshold=3,
        active=True,
        verify_keys={i: k.public_bytes for i, k in keys.items()},
    )
    inputs = random_inputs(config, 9)

    def equivocate(phase: Phase, site: int, message):
        # tell site 1 that site 5 dropped while everyone else signed that it survived
        if isinstance(message, UnmaskRequest) and site == 1:
            return dataclasses.replace(
                message, survivors=message.survivors - {5}, dropped=message.dropped | {5}
            )
        return message

    result = run_round(config, inputs, signing_keys=keys, randbytes=rand, intercept=equivocate)
    assert "differ from the signed set" in str(result.client_errors[1])
    np.testing.assert_array_equal(result.total, modular_sum(inputs, result.survivors, 32))


def test_active_variant_rejects_forged_advert() -> None:
    rand = DeterministicRandom(b"forge")
    keys = {i: SigningKey.generate(rand) for i in range(1, 5)}
    config = make_config(
        list(range(1, 5)),
        vector_length=4,
        bits=32,
        threshold=3,
        active=True,
        verify_keys={i: k.public_bytes for i, k in keys.items()},
    )
    mallory = SigningKey.generate(rand)

    def forge(phase: Phase, site: int, message):
        if isinstance(message, KeyRoster) and site == 1:
            adverts = tuple(
                dataclasses.replace(a, signature=mallory.sign(b"x")) if a.sender == 2 else a
                for a in message.adverts
            )
            return dataclasses.replace(message, adverts=adverts)
        return message

    result = run_round(
        config, random_inputs(config, 1), signing_keys=keys, randbytes=rand, intercept=forge
    )
    assert "bad signature" in str(result.client_errors[1])


def _masked_view(value: int, seed: str, length: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """The server's view of site 1's message, for an input of constant ``value``."""
    captured: dict[int, np.ndarray] = {}
    rand = DeterministicRandom(seed.encode())
    config = make_config(list(range(1, 5)), vector_length=length, bits=32, threshold=3)
    inputs = random_inputs(config, 0)
    inputs[1] = np.full(length, value, dtype=np.uint32)
    clients = {
        i: SecAggClient(i, config, policy=SEMI, input_vector=inputs[i], randbytes=rand)
        for i in range(1, 5)
    }
    server = SecAggServer(config)
    for c in clients.values():
        server.receive(c.start())
    for _ in range(2):
        for site, message in server.close_phase().items():
            reply = clients[site].handle(message)
            if isinstance(reply, MaskedInput):
                captured[site] = reply.vector
            server.receive(reply)
    return inputs[1], captured[1]


def _top_byte_histogram(vector: np.ndarray) -> np.ndarray:
    return np.bincount((vector >> np.uint32(24)).astype(np.int64), minlength=256)


def test_masked_input_is_uniform_and_differs_from_the_input() -> None:
    encoded, masked = _masked_view(5, "uniform")
    assert not np.array_equal(masked, encoded)
    assert np.mean(masked == encoded) < 0.001
    _, p_masked = stats.chisquare(_top_byte_histogram(masked))
    _, p_plain = stats.chisquare(_top_byte_histogram(encoded))
    assert p_masked > 1e-4, "masked input deviates from uniform"
    assert p_plain < 1e-12, "the test cannot tell a structured input from uniform"
    # low bits too: the masked vector carries no trace of the constant input
    _, p_low = stats.chisquare(
        np.bincount((masked & np.uint32(255)).astype(np.int64), minlength=256)
    )
    assert p_low > 1e-4


def test_server_view_does_not_depend_on_the_input() -> None:
    _, masked_a = _masked_view(0, "view-a")
    _, masked_b = _masked_view(2**31 + 12345, "view-b")
    table = np.vstack([_top_byte_histogram(masked_a), _top_byte_histogram(masked_b)])
    _, p_value, _, _ = stats.chi2_contingency(table)
    assert p_value > 1e-4


def test_server_rejects_share_keys_that_skip_a_neighbour() -> None:
    rand = DeterministicRandom(b"skip")
    config = make_config(list(range(1, 5)), vector_length=4, bits=32, threshold=3)
    clients = {i: SecAggClient(i, config, policy=SEMI, randbytes=rand) for i in range(1, 5)}
    server = SecAggServer(config)
    for c in clients.values():
        server.receive(c.start())
    rosters = server.close_phase()
    share_keys = clients[1].handle(rosters[1])
    partial = dataclasses.replace(share_keys, ciphertexts=share_keys.ciphertexts[1:])
    with pytest.raises(RemoteProtocolError, match="once to each neighbour"):
        server.receive(partial)
    server.receive(share_keys)  # the honest message is still accepted
