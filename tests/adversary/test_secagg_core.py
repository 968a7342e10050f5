"""A malicious server (and malicious sites) against the SecAgg / SecAgg+ core.

The adversary here drives honest :class:`SecAggClient` objects directly (the core is sans-IO): it
may withhold share ciphertexts from any site, show every site a different survivor / dropped set,
collude with corrupt sites (which hand it every share they hold and sign anything), and tamper
with replies. What it obtains is then checked against what would reveal an honest site's input:
``t`` shares of the site's self-mask seed together with the pairwise mask of every peer the site
masked with (through ``t`` shares of a mask key, or a corrupt endpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_fl.crypto import DeterministicRandom, Share, SigningKey
from secure_fl.errors import (
    PolicyError,
    ProtocolError,
    RemoteProtocolError,
    ThresholdError,
)
from secure_fl.secagg import (
    ClientPhase,
    ConsistencyRequest,
    KeyRoster,
    MaskedInput,
    Phase,
    RevealSet,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ServerPhase,
    ShareDelivery,
    ShareKeys,
    SitePolicy,
    UnmaskRequest,
    UnmaskResponse,
    derive_graph,
    make_config,
    minimum_threshold,
    run_round,
)
from secure_fl.secagg.client import advert_payload, consistency_payload

View = tuple[frozenset[int], frozenset[int]]  # (survivors, dropped) shown to one site


@dataclass
class Obtained:
    """What the adversary ends up with."""

    config: SecAggConfig
    graph: dict[int, frozenset[int]]
    corrupt: frozenset[int]
    delivered: dict[int, frozenset[int]]  # site -> owners whose shares it was given
    masked: set[int] = field(default_factory=set)  # honest sites whose masked input it holds
    seed_shares: dict[int, set[int]] = field(default_factory=dict)  # owner -> holders
    key_shares: dict[int, set[int]] = field(default_factory=dict)
    errors: dict[int, ProtocolError] = field(default_factory=dict)

    def maskset(self, site: int) -> frozenset[int]:
        """The peers ``site`` added a pairwise mask with (its own U2 within its neighbours)."""
        return self.delivered[site] & self.graph[site]

    def seed_known(self, owner: int) -> bool:
        return (
            owner in self.corrupt or len(self.seed_shares.get(owner, ())) >= self.config.threshold
        )

    def key_known(self, owner: int) -> bool:
        return owner in self.corrupt or len(self.key_shares.get(owner, ())) >= self.config.threshold

    def input_revealed(self, target: int) -> bool:
        """True when the adversary can strip every mask off ``target``'s masked input."""
        if target not in self.masked or not self.seed_known(target):
            return False
        if self.key_known(target):
            return True
        return all(self.key_known(peer) for peer in self.maskset(target))

    def both_secrets(self, target: int) -> bool:
        return self.seed_known(target) and self.key_known(target)


def _setup(
    n: int, protocol: str, k: int | None, threshold: int, active: bool, seed: int
) -> tuple[SecAggConfig, dict[int, SigningKey]]:
    rand = DeterministicRandom(seed)
    keys = {i: SigningKey.generate(rand) for i in range(1, n + 1)}
    config = make_config(
        list(range(1, n + 1)),
        vector_length=4,
        bits=32,
        protocol=protocol,
        k=k,
        threshold=threshold,
        active=active,
        verify_keys={i: key.public_bytes for i, key in keys.items()} if active else None,
    )
    return config, keys


def adversarial_round(
    config: SecAggConfig,
    signing_keys: dict[int, SigningKey],
    *,
    corrupt: frozenset[int] = frozenset(),
    keep: Callable[[int, int], bool] = lambda site, sender: True,
    view: Callable[[int, dict[int, frozenset[int]]], View],
    seed: int = 0,
) -> Obtained:
    """Run a round against a malicious server and return what it obtains.

    ``keep(site, sender)`` says whether the server forwards ``sender``'s share ciphertext to
    ``site``; ``view(site, graph)`` is the (survivors, dropped) pair shown to ``site`` in the
    consistency and unmasking phases. Every site is an honest client; the ``corrupt`` ones also
    give the server every share they hold and sign whatever it asks.
    """
    rand = DeterministicRandom(seed + 1)
    policy = SitePolicy(require_active=False)
    clients = {
        i: SecAggClient(
            i,
            config,
            policy=policy,
            input_vector=np.zeros(config.vector_length, dtype=np.uint32),
            signing_key=signing_keys[i] if config.active else None,
            randbytes=rand,
        )
        for i in config.site_ids
    }
    server = SecAggServer(config)
    for client in clients.values():
        server.receive(client.start())
    while server.phase is not ServerPhase.COLLECT_MASKED:
        for site, message in server.close_phase().items():
            if isinstance(message, ShareDelivery):
                message = dataclasses.replace(
                    message,
                    ciphertexts=tuple(c for c in message.ciphertexts if keep(site, c[0])),
                    commitments=tuple(c for c in message.commitments if keep(site, c[0])),
                )
                clients[site]._pending = message  # type: ignore[attr-defined]
                continue
            server.receive(clients[site].handle(message))
    graph = dict(server.graph or {})
    out = Obtained(config, graph, corrupt, {})
    for site, client in clients.items():
        delivery = client._pending  # type: ignore[attr-defined]
        out.delivered[site] = frozenset(s for s, _ in delivery.ciphertexts)
        try:
            reply = client.handle(delivery)
        except ProtocolError as exc:
            out.errors[site] = exc
            continue
        if isinstance(reply, MaskedInput) and site not in corrupt:
            out.masked.add(site)
    views = {site: view(site, graph) for site in clients if site not in out.errors}
    signatures: dict[int, tuple[tuple[int, bytes], ...]] = {}
    if config.active:
        signed: dict[frozenset[int], dict[int, bytes]] = {}
        for site, (survivors, _) in views.items():
            if site in corrupt:
                continue
            try:
                reply = clients[site].handle(ConsistencyRequest(config.round_id, survivors))
            except ProtocolError as exc:
                out.errors[site] = exc
                continue
            signed.setdefault(survivors, {})[site] = reply.signature
        for survivors, by_site in signed.items():
            payload = consistency_payload(config, survivors, server.graph_seed)
            for c in corrupt & survivors:
                by_site[c] = signing_keys[c].sign(payload)
        for site, (survivors, _) in views.items():
            signatures[site] = tuple(sorted(signed.get(survivors, {}).items()))
    for site, (survivors, dropped) in views.items():
        if site in corrupt or site in out.errors:
            continue
        request = UnmaskRequest(config.round_id, survivors, dropped, signatures.get(site, ()))
        try:
            response = clients[site].handle(request)
        except ProtocolError as exc:
            out.errors[site] = exc
            continue
        for owner, _, _ in response.self_mask_shares:
            out.seed_shares.setdefault(owner, set()).add(site)
        for owner, _, _ in response.mask_key_shares:
            out.key_shares.setdefault(owner, set()).add(site)
    for c in corrupt:  # corrupt holders hand over both shares of everything they hold
        for owner in out.delivered[c] | {c}:
            out.seed_shares.setdefault(owner, set()).add(c)
            out.key_shares.setdefault(owner, set()).add(c)
    return out


# -- finding 1: the server unmasks one site alone ----------------------------------------------

ATTACKS = [
    # (protocol, n, k, threshold): default-style thresholds where today's checks fall
    ("secagg", 5, None, 3),
    ("secagg", 7, None, 4),
    ("secagg+", 10, 4, 3),
    ("secagg+", 12, 6, 4),
]


def _isolate(target: int, peers: frozenset[int]):
    """The attack of finding 1: the target is given only ``peers``' ciphertexts, and the peers are
    declared dropped to everyone."""

    def keep(site: int, sender: int) -> bool:
        return site != target or sender in peers

    def view(site: int, graph: dict[int, frozenset[int]]) -> View:
        everyone = frozenset(graph)
        return everyone - peers, peers

    return keep, view


@pytest.mark.parametrize("active", [True, False])
@pytest.mark.parametrize(("protocol", "n", "k", "threshold"), ATTACKS)
def test_server_cannot_unmask_a_site_by_starving_its_view(
    protocol: str, n: int, k: int | None, threshold: int, active: bool
) -> None:
    config, keys = _setup(n, protocol, k, threshold, active, seed=n)
    target = 1
    # the attack needs the graph: learn it from an honest dry run of phases 0-1 (deterministic)
    probe = adversarial_round(config, keys, view=lambda s, g: (frozenset(g), frozenset()), seed=3)
    peers = frozenset(sorted(probe.graph[target])[: threshold - 1])
    keep, view = _isolate(target, peers)
    got = adversarial_round(config, keys, keep=keep, view=view, seed=3)
    assert got.graph == probe.graph
    assert not got.input_revealed(target), "the server recovered the target's input"
    assert not any(got.both_secrets(s) for s in got.masked)
    # the target refuses with a clear error naming the strangers
    assert isinstance(got.errors[target], RemoteProtocolError)
    assert "never shared keys" in str(got.errors[target])


def test_server_cannot_get_both_secrets_by_equivocating() -> None:
    """Tell half the holders that site 1 survived and the other half that it dropped."""
    config, keys = _setup(7, "secagg", None, 4, True, seed=11)

    def view(site: int, graph: dict[int, frozenset[int]]) -> View:
        everyone = frozenset(graph)
        if site <= 4:
            return everyone, frozenset()
        return everyone - {1}, frozenset({1})

    got = adversarial_round(config, keys, view=view, seed=11)
    assert not got.both_secrets(1)
    assert not got.input_revealed(1)


# -- property: whatever the server does, no honest input is revealed ---------------------------


@st.composite
def adversaries(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(min_value=3, max_value=8))
    protocol = draw(st.sampled_from(["secagg", "secagg+"]))
    k = (
        draw(st.sampled_from(list(range(2, n - 1, 2))))
        if protocol == "secagg+" and n >= 5
        else n - 1
    )
    active = draw(st.booleans())
    corrupt_count = draw(st.integers(min_value=0, max_value=max(0, (n - 2) // 2)))
    fraction = corrupt_count / n
    # the corrupt sites may be anywhere, so the site policy assumes the worst case for them
    lowest = minimum_threshold(n, n - 1, fraction, active=True)
    lowest = max(lowest, (k + 1 + min(corrupt_count, k)) // 2 + 1)
    if lowest > k + 1:
        k, lowest = n - 1, minimum_threshold(n, n - 1, fraction, active=True)
    threshold = draw(st.integers(min_value=lowest, max_value=k + 1))
    ids = list(range(1, n + 1))
    corrupt = frozenset(draw(st.permutations(ids))[:corrupt_count])
    withheld = set(draw(st.sets(st.tuples(st.sampled_from(ids), st.sampled_from(ids)), max_size=n)))
    # per site: which sites it is told survived, and which it is told dropped
    equivocate = active and draw(st.booleans())
    base_survivors = frozenset(draw(st.sets(st.sampled_from(ids), min_size=1)))
    base_dropped = frozenset(draw(st.sets(st.sampled_from(ids)))) - base_survivors
    if draw(st.booleans()):
        # the shape of finding 1: starve one target's view down to a few peers, call them dropped
        target = draw(st.sampled_from(ids))
        others = [i for i in ids if i != target]
        peers = frozenset(draw(st.permutations(others))[: draw(st.integers(1, threshold - 1))])
        withheld |= {(target, s) for s in others if s not in peers}
        base_survivors, base_dropped = frozenset(ids) - peers, peers
    per_site = {
        i: (
            frozenset(draw(st.sets(st.sampled_from(ids), min_size=1))),
            frozenset(draw(st.sets(st.sampled_from(ids)))),
        )
        for i in ids
    }
    seed = draw(st.integers(min_value=0, max_value=2**16))
    return (
        n,
        protocol,
        k,
        threshold,
        active,
        corrupt,
        withheld,
        equivocate,
        (base_survivors, base_dropped),
        per_site,
        seed,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adversaries())
def test_no_server_behaviour_reveals_an_honest_input(scenario: tuple) -> None:
    (n, protocol, k, threshold, active, corrupt, withheld, equivocate, base, per_site, seed) = (
        scenario
    )
    config, keys = _setup(n, protocol, k, threshold, active, seed)

    def keep(site: int, sender: int) -> bool:
        return (site, sender) not in withheld

    def view(site: int, graph: dict[int, frozenset[int]]) -> View:
        # the semi-honest variant has no consistency check: the server is one that may lie
        # about who dropped, consistently; the active variant faces full equivocation
        return per_site[site] if equivocate else base

    got = adversarial_round(config, keys, corrupt=corrupt, keep=keep, view=view, seed=seed)
    honest = frozenset(config.site_ids) - corrupt
    for target in got.masked:
        assert not got.both_secrets(target)
        if config.sparse:
            continue  # SecAgg+ hides an input among its neighbours only w.h.p. (Bell et al.)
        if len(honest) >= 2:
            assert not got.input_revealed(target)


def test_honest_round_gives_the_exact_sum() -> None:
    config, keys = _setup(6, "secagg+", 2, 2, True, seed=5)
    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    result = run_round(config, inputs, signing_keys=keys)
    assert list(result.total) == [21] * 4
    assert not result.client_errors and not result.excluded


# -- finding 2: the SecAgg+ graph is not the server's choice -----------------------------------


def _sparse(seed: int = 0, active: bool = True) -> tuple[SecAggConfig, dict[int, SigningKey]]:
    return _setup(10, "secagg+", 4, 3, active, seed)


def test_graph_is_derived_from_the_reveals_and_is_the_same_everywhere() -> None:
    config, keys = _sparse()
    seen: dict[int, RevealSet] = {}

    def record(phase: Phase, site: int, message):
        if isinstance(message, RevealSet):
            seen[site] = message
        return message

    inputs = {i: np.zeros(4, dtype=np.uint32) for i in config.site_ids}
    first = run_round(config, inputs, signing_keys=keys, intercept=record)
    assert len({m.reveals for m in seen.values()}) == 1
    second = run_round(config, inputs, signing_keys=keys)
    assert first.graph != second.graph  # fresh nonces, fresh graph
    assert all(len(v) == 4 for v in first.graph.values())
    # determinism: the same seed gives the same graph; another seed another one
    assert derive_graph(config.site_ids, 4, b"\x01" * 32) == derive_graph(
        config.site_ids, 4, b"\x01" * 32
    )
    assert derive_graph(config.site_ids, 4, b"\x01" * 32) != derive_graph(
        config.site_ids, 4, b"\x02" * 32
    )


def test_a_forged_reveal_is_refused_by_the_site() -> None:
    config, keys = _sparse(1)

    def forge(phase: Phase, site: int, message):
        if isinstance(message, RevealSet) and site == 1:
            reveals = tuple((s, b"\x00" * 32 if s == 2 else n) for s, n in message.reveals)
            return dataclasses.replace(message, reveals=reveals)
        return message

    inputs = {i: np.zeros(4, dtype=np.uint32) for i in config.site_ids}
    result = run_round(config, inputs, signing_keys=keys, intercept=forge)
    assert "does not match its commitment" in str(result.client_errors[1])


def test_a_reveal_set_that_omits_a_site_is_refused() -> None:
    config, keys = _sparse(2)

    def omit(phase: Phase, site: int, message):
        if isinstance(message, RevealSet) and site == 1:
            return dataclasses.replace(message, reveals=message.reveals[1:])
        return message

    inputs = {i: np.zeros(4, dtype=np.uint32) for i in config.site_ids}
    result = run_round(config, inputs, signing_keys=keys, intercept=omit)
    assert "omits sites" in str(result.client_errors[1])


def test_the_server_cannot_drop_a_reveal_to_regrind_the_graph() -> None:
    config, keys = _sparse(3)
    inputs = {i: np.zeros(4, dtype=np.uint32) for i in config.site_ids}
    with pytest.raises(RemoteProtocolError, match="did not reveal"):
        run_round(config, inputs, signing_keys=keys, dropouts={4: Phase.REVEAL_NONCE})


def test_server_refuses_a_wrong_reveal() -> None:
    config, keys = _sparse(4)
    clients = {i: SecAggClient(i, config, signing_key=keys[i]) for i in config.site_ids}
    server = SecAggServer(config)
    for c in clients.values():
        server.receive(c.start())
    rosters = server.close_phase()
    reveal = clients[1].handle(rosters[1])
    with pytest.raises(RemoteProtocolError, match="graph commitment"):
        server.receive(dataclasses.replace(reveal, nonce=bytes(32)))
    server.receive(reveal)


def test_a_site_shown_another_reveal_set_is_caught_by_the_consistency_check() -> None:
    """Sites that derived different graph seeds sign different payloads: a site refuses the
    consistency signatures of sites that were shown another reveal set."""
    config, keys = _sparse(5)
    other_seed = bytes(range(32))

    def split_view(phase: Phase, site: int, message):
        if isinstance(message, UnmaskRequest) and site == 1:
            payload = consistency_payload(config, message.survivors, other_seed)
            forged = tuple((s, keys[s].sign(payload)) for s, _ in message.signatures)
            return dataclasses.replace(message, signatures=forged)
        return message

    inputs = {i: np.zeros(4, dtype=np.uint32) for i in config.site_ids}
    result = run_round(config, inputs, signing_keys=keys, intercept=split_view)
    assert "does not verify" in str(result.client_errors[1])
    assert consistency_payload(config, frozenset({1}), b"a" * 32) != consistency_payload(
        config, frozenset({1}), b"b" * 32
    )


# -- finding 3: one wrong Shamir share neither aborts nor corrupts the round -------------------


def _wrong_share(culprit: int):
    def tamper(phase: Phase, site: int, message):
        if isinstance(message, UnmaskResponse) and site == culprit and message.self_mask_shares:
            owner, raw, salt = message.self_mask_shares[0]
            share = Share.from_bytes(raw)
            bad = Share(share.x, (share.y + 1) % (2**256)).to_bytes()
            return dataclasses.replace(
                message, self_mask_shares=((owner, bad, salt), *message.self_mask_shares[1:])
            )
        return message

    return tamper


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_wrong_share_with_more_than_t_responders_is_excluded_and_the_sum_is_exact(
    protocol: str,
) -> None:
    k = None if protocol == "secagg" else 4
    config, keys = _setup(8 if protocol == "secagg" else 10, protocol, k, 3 if k else 5, True, 7)
    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    result = run_round(config, inputs, signing_keys=keys, intercept_reply=_wrong_share(2))
    assert result.excluded == frozenset({2})
    expected = sum(range(1, len(config.site_ids) + 1))
    assert list(result.total) == [expected] * 4


def test_wrong_share_with_exactly_t_responders_never_gives_a_wrong_sum() -> None:
    config, keys = _setup(5, "secagg", None, 3, True, 8)
    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    # sites 4 and 5 leave before unmasking: exactly t = 3 responders, one of them lies
    dropouts = {4: Phase.UNMASKING, 5: Phase.UNMASKING}
    with pytest.raises(ThresholdError, match=r"excluded holders: \[2\]"):
        run_round(
            config, inputs, signing_keys=keys, dropouts=dropouts, intercept_reply=_wrong_share(2)
        )


def test_exactly_t_good_responders_and_one_liar_gives_the_exact_sum() -> None:
    config, keys = _setup(5, "secagg", None, 3, True, 9)
    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    result = run_round(
        config,
        inputs,
        signing_keys=keys,
        dropouts={5: Phase.UNMASKING},
        intercept_reply=_wrong_share(2),
    )
    assert result.excluded == frozenset({2})
    assert list(result.total) == [15] * 4


def test_owner_dealing_a_share_that_breaks_its_commitment_cannot_frame_the_holder() -> None:
    config, keys = _setup(6, "secagg", None, 4, True, 10)

    def bad_commitment(phase: Phase, site: int, message):
        if isinstance(message, ShareKeys) and site == 1:
            commitments = tuple(
                (h, bytes(32), s) if h == 3 else (h, m, s) for h, m, s in message.commitments
            )
            return dataclasses.replace(message, commitments=commitments)
        return message

    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    result = run_round(
        config,
        inputs,
        signing_keys=keys,
        dropouts={1: Phase.MASKED_INPUT},  # site 1 drops: its mask key must be recovered
        intercept_reply=bad_commitment,
    )
    assert result.excluded == frozenset()  # site 3 withheld the bad share instead of lying
    assert list(result.total) == [2 + 3 + 4 + 5 + 6] * 4


# -- finding 4: cryptographic failures reach the error state -----------------------------------

LOW_ORDER = bytes(32)  # u = 0: a point of small order; X25519 with it gives the all-zero secret


def test_low_order_key_puts_the_client_in_the_error_state_with_secrets_dropped() -> None:
    config, _ = _setup(3, "secagg", None, 2, False, 12)
    policy = SitePolicy(require_active=False)
    clients = {i: SecAggClient(i, config, policy=policy) for i in config.site_ids}
    adverts = {i: c.start() for i, c in clients.items()}
    evil = dataclasses.replace(adverts[2], enc_public=LOW_ORDER)
    roster = KeyRoster(config.round_id, (adverts[1], evil, adverts[3]))
    with pytest.raises(ProtocolError, match="low-order"):
        clients[1].handle(roster)
    assert clients[1].phase is ClientPhase.ERROR
    assert clients[1]._enc_key is None and clients[1]._mask_key is None
    assert clients[1]._self_seed is None and not clients[1]._held


@pytest.mark.parametrize("field_name", ["enc_public", "mask_public"])
def test_server_refuses_a_low_order_key(field_name: str) -> None:
    config, keys = _setup(3, "secagg", None, 2, True, 13)
    client = SecAggClient(1, config, signing_key=keys[1])
    advert = client.start()
    evil = dataclasses.replace(advert, **{field_name: LOW_ORDER})
    # a malicious site signs its own low-order key: the signature is valid, the key is not
    payload = advert_payload(config, 1, evil.enc_public, evil.mask_public, evil.graph_commitment)
    evil = dataclasses.replace(evil, signature=keys[1].sign(payload))
    server = SecAggServer(config)
    with pytest.raises(RemoteProtocolError, match="not a valid X25519 public key"):
        server.receive(evil)
    server.receive(advert)


def test_server_refuses_an_advert_with_a_bad_signature() -> None:
    config, keys = _setup(3, "secagg", None, 2, True, 14)
    advert = SecAggClient(1, config, signing_key=keys[1]).start()
    forged = dataclasses.replace(advert, signature=keys[2].sign(b"other"))
    with pytest.raises(RemoteProtocolError, match="signature"):
        SecAggServer(config).receive(forged)


# -- finding 1 (threshold) and 5: the site's own policy --------------------------------------


def test_site_refuses_a_threshold_below_its_minimum() -> None:
    config, keys = _setup(9, "secagg", None, 3, True, 15)
    with pytest.raises(PolicyError, match="below this site's minimum 5"):
        SecAggClient(1, config, signing_key=keys[1])
    stricter = SitePolicy(corrupt_fraction=0.3)  # 3 of 9 corrupt: t > (9 + 3) / 2
    ok, _ = _setup(9, "secagg", None, 7, True, 15)
    SecAggClient(1, ok, signing_key=keys[1], policy=stricter)
    with pytest.raises(PolicyError):
        SecAggClient(
            1, _setup(9, "secagg", None, 6, True, 15)[0], signing_key=keys[1], policy=stricter
        )


def test_semi_honest_must_be_asked_for_by_name() -> None:
    config, _ = _setup(4, "secagg", None, 3, False, 16)
    with pytest.raises(PolicyError, match="semi-honest"):
        SecAggClient(1, config)
    SecAggClient(1, config, policy=SitePolicy(require_active=False))
