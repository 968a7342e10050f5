"""A malicious server (and malicious sites) against the SecAgg / SecAgg+ core.

The adversary here drives honest :class:`SecAggClient` objects directly (the core is sans-IO): it
may withhold share ciphertexts from any site, show every site a different survivor / dropped set,
collude with corrupt sites (which hand it every share they hold and sign anything), and tamper
with replies. What it obtains is then checked against what would reveal an honest site's input:
``t`` shares of the site's self-mask seed together with the pairwise mask of every peer the site
masked with (through ``t`` shares of a mask key, or a corrupt endpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
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


@dataclass(frozen=True)
class _AssumeColluders(SitePolicy):
    """A site policy whose threshold minimum the scenario guarantees itself: every threshold used
    here meets ``2t > k + 1 + c`` for the actual colluders of every neighbourhood, a deterministic
    bound the statistical SecAgg+ minimum (sigma = 40) would refuse for such small rounds. The
    variant rule, ``n - c >= 2`` and the consistency quorum are the real ones."""

    def required_threshold(self, config: SecAggConfig) -> int:
        return 2


def adversarial_round(
    config: SecAggConfig,
    signing_keys: dict[int, SigningKey],
    *,
    corrupt: frozenset[int] = frozenset(),
    keep: Callable[[int, int, dict[int, frozenset[int]]], bool] = lambda site, sender, graph: True,
    view: Callable[[int, dict[int, frozenset[int]]], View],
    seed: int = 0,
) -> Obtained:
    """Run a round against a malicious server and return what it obtains.

    ``keep(site, sender, graph)`` says whether the server forwards ``sender``'s share ciphertext to
    ``site``; ``view(site, graph)`` is the (survivors, dropped) pair shown to ``site`` in the
    consistency and unmasking phases. Every site is an honest client; the ``corrupt`` ones also
    give the server every share they hold and sign whatever it asks. Every honest site assumes
    the actual number of colluders (its consistency quorum is more than ``(n + |corrupt|) / 2``);
    the caller chooses a threshold that is secure for them.
    """
    rand = DeterministicRandom(seed + 1)
    policy = _AssumeColluders(
        corrupt_fraction=len(corrupt) / len(config.site_ids), require_active=False
    )
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
                g = dict(server.graph or {})
                message = dataclasses.replace(
                    message,
                    ciphertexts=tuple(c for c in message.ciphertexts if keep(site, c[0], g)),
                    commitments=tuple(c for c in message.commitments if keep(site, c[0], g)),
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

    def keep(site: int, sender: int, graph: dict[int, frozenset[int]]) -> bool:
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


# -- the view split (SecAgg+): two survivor sets, each signed inside its own neighbourhoods -----


@dataclass
class SplitOutcome:
    recovered: bool  # the server stripped every mask off the target's masked input
    target: int
    peers: frozenset[int]
    seed_shares: int  # shares of the target's self-mask seed the server collected
    errors: dict[int, ProtocolError]
    answered: frozenset[int]  # sites that returned an UnmaskResponse


def _view_split_attack(n: int, k: int, seed: int) -> SplitOutcome:
    """The attacker review's view-split attack against honest sites with the default policy.

    The target T is given only the share ciphertexts of t - 1 peers P spread on both sides of it
    on the ring. T and P are shown one survivor set U3_T (P survived, T's other neighbours
    dropped), every other site U3' (P dropped). Each group signs its own set; each honest site
    sees at least t signatures on its set among its own holders. The server then asks T (and
    everybody but P) to unmask and tries to rebuild T's input from b_T and every s_sk_p.
    """
    from secure_fl.crypto import MaskPRG, X25519KeyPair, agree_key, combine
    from secure_fl.secagg.graph import _SeedStream, random_permutation

    ids = list(range(1, n + 1))
    rand = DeterministicRandom(seed)
    keys = {i: SigningKey.generate(rand) for i in ids}
    t = minimum_threshold(n, k, 0.0, active=True)
    config = make_config(
        ids,
        vector_length=8,
        bits=32,
        protocol="secagg+",
        k=k,
        threshold=t,
        active=True,
        verify_keys={i: key.public_bytes for i, key in keys.items()},
    )
    inputs = {i: np.frombuffer(rand(4 * config.vector_length), dtype=np.uint32).copy() for i in ids}
    clients = {
        i: SecAggClient(i, config, input_vector=inputs[i], signing_key=keys[i], randbytes=rand)
        for i in ids  # the default SitePolicy: active variant, no colluders assumed
    }
    server = SecAggServer(config)
    for client in clients.values():
        server.receive(client.start())
    sharekeys: dict[int, ShareKeys] = {}
    while server.phase is not ServerPhase.COLLECT_MASKED:  # phases 0-2 run honestly
        if server.phase is ServerPhase.COLLECT_SHARES:
            sharekeys = {s: m for s, m in server._got.items() if isinstance(m, ShareKeys)}
        for site, message in server.close_phase().items():
            if not isinstance(message, ShareDelivery):
                server.receive(clients[site].handle(message))
    graph = server.graph or {}
    ring = random_permutation(sorted(ids), _SeedStream(server.graph_seed))
    pos = {s: i for i, s in enumerate(ring)}
    half = k // 2
    a = half // 2

    def at(d: int, base: int) -> int:
        return ring[(pos[base] + d) % n]

    target = ring[0]
    peers = frozenset(
        {at(d, target) for d in range(-half, -half + a)}
        | {at(d, target) for d in range(a + 1, half + 1)}
    )
    assert len(peers) == t - 1 and peers <= graph[target]
    everyone = frozenset(ids)
    u3_target = everyone - (graph[target] - peers)
    u3_other = everyone - peers
    masked: dict[int, np.ndarray] = {}
    for site in ids:
        cts, coms = [], []
        for sender, message in sharekeys.items():
            if site == target and sender not in peers:
                continue
            cts += [
                (sender, sealed) for receiver, sealed in message.ciphertexts if receiver == site
            ]
            coms += [(sender, m, c) for holder, m, c in message.commitments if holder == site]
        reply = clients[site].handle(ShareDelivery(config.round_id, tuple(cts), tuple(coms)))
        masked[site] = reply.vector
    group = peers | {target}
    signatures: dict[int, bytes] = {}
    errors: dict[int, ProtocolError] = {}
    for site in ids:
        survivors = u3_target if site in group else u3_other
        try:
            reply = clients[site].handle(ConsistencyRequest(config.round_id, survivors))
        except ProtocolError as exc:
            errors[site] = exc
            continue
        signatures[site] = reply.signature
    sig_group = tuple(sorted((s, g) for s, g in signatures.items() if s in group))
    sig_other = tuple(sorted((s, g) for s, g in signatures.items() if s not in group))
    seed_shares: dict[int, list[Share]] = {}
    key_shares: dict[int, list[Share]] = {}
    answered = set()
    for site in ids:
        if site in peers or site in errors:
            continue  # the peers only had to sign; they are never asked to unmask
        request = (
            UnmaskRequest(config.round_id, u3_target, frozenset(), sig_group)
            if site == target
            else UnmaskRequest(config.round_id, u3_other, peers, sig_other)
        )
        try:
            response = clients[site].handle(request)
        except ProtocolError as exc:
            errors[site] = exc
            continue
        answered.add(site)
        for owner, raw, _ in response.self_mask_shares:
            seed_shares.setdefault(owner, []).append(Share.from_bytes(raw))
        for owner, raw, _ in response.mask_key_shares:
            key_shares.setdefault(owner, []).append(Share.from_bytes(raw))
    outcome = SplitOutcome(
        False, target, peers, len(seed_shares.get(target, [])), errors, frozenset(answered)
    )
    if outcome.seed_shares < t or any(len(key_shares.get(p, [])) < t for p in peers):
        return outcome
    prg = MaskPRG(config.vector_length, config.bits)
    x = masked[target].copy()
    prg.add_into(x, combine(seed_shares[target], threshold=t), -1)
    mask_public = server._adverts[target].mask_public
    for p in sorted(peers):
        sk_p = X25519KeyPair.from_private_bytes(combine(key_shares[p], threshold=t))
        seed_p = agree_key(sk_p, mask_public, context=config.context("pairwise-mask"))
        prg.add_into(x, seed_p, -1 if target > p else 1)
    outcome.recovered = bool(np.array_equal(x, inputs[target]))
    return outcome


@pytest.mark.parametrize(("n", "k"), [(10, 4), (30, 4), (40, 6)])
def test_server_cannot_unmask_a_site_by_splitting_views_in_secagg_plus(n: int, k: int) -> None:
    """Finding 1 of the second review: consistency signatures counted only among a site's own
    holders let a SecAgg+ server split the round into two survivor sets and recover the target's
    exact input with the default policy and no colluders. Every site now also needs signatures
    on its set from more than (n + c) / 2 sites of the round: the small group (T and its t - 1
    peers) cannot reach it, so T refuses, and T's other holders alone are fewer than t."""
    got = _view_split_attack(n, k, seed=1000 + n)
    assert not got.recovered, "the server recovered the target's input by splitting views"
    t = minimum_threshold(n, k, 0.0, active=True)
    assert got.seed_shares < t
    error = got.errors[got.target]
    assert isinstance(error, ThresholdError)
    assert "signed its survivor set" in str(error)
    # every honest site either refused with a clear protocol error or answered the one
    # survivor set that a majority of the round signed
    assert frozenset(got.errors) | got.answered | got.peers == frozenset(range(1, n + 1))
    assert all(isinstance(e, ProtocolError) for e in got.errors.values())


def test_the_consistency_quorum_keeps_honest_secagg_plus_rounds_exact() -> None:
    """The quorum costs nothing to an honest SecAgg+ round (all sites sign one set), and a site
    that drops before the consistency phase is tolerated as long as more than half sign."""
    config, keys = _setup(10, "secagg+", 4, 3, True, seed=21)
    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    result = run_round(config, inputs, signing_keys=keys)
    assert list(result.total) == [55] * 4
    dropped = run_round(config, inputs, signing_keys=keys, dropouts={7: Phase.CONSISTENCY_CHECK})
    assert list(dropped.total) == [55] * 4  # 7 sent its masked input: it is in the sum


def test_server_aborts_when_half_the_round_or_fewer_signed() -> None:
    config, keys = _setup(10, "secagg+", 4, 3, True, seed=22)
    inputs = {i: np.full(4, i, dtype=np.uint32) for i in config.site_ids}
    gone = {i: Phase.CONSISTENCY_CHECK for i in range(1, 6)}  # 5 of 10 sign: not more than half
    with pytest.raises(ThresholdError, match="signed the survivor set"):
        run_round(config, inputs, signing_keys=keys, dropouts=gone)


# -- property: whatever the server does, no honest input is revealed ---------------------------


@dataclass(frozen=True)
class Scenario:
    """One malicious-server behaviour for the property below."""

    n: int
    protocol: str
    k: int
    threshold: int
    active: bool
    corrupt: frozenset[int]
    withheld: frozenset[tuple[int, int]]  # (site, sender): sender's ciphertext not forwarded
    equivocate: bool  # show every site its own random (survivors, dropped)
    base: View  # else: this one view to everybody
    per_site: dict[int, View]
    # (target, peer count, peer preference order, prefer the target's farthest neighbours)
    split: tuple[int, int, tuple[int, ...], bool] | None
    seed: int


@st.composite
def adversaries(draw: st.DrawFn) -> Scenario:
    protocol = draw(st.sampled_from(["secagg", "secagg+"]))
    n = draw(st.integers(min_value=3, max_value=12 if protocol == "secagg+" else 8))
    k = (
        draw(st.sampled_from(list(range(2, n - 1, 2))))
        if protocol == "secagg+" and n >= 5
        else n - 1
    )
    active = draw(st.booleans())
    colluders = st.integers(min_value=0, max_value=max(0, (n - 2) // 2))
    corrupt_count = draw(st.one_of(st.just(0), colluders))
    fraction = corrupt_count / n
    # the colluders may sit anywhere, so every neighbourhood may hold all of them: a threshold
    # with 2t > k + 1 + c in every neighbourhood (for the complete graph 2t > n + c)
    if k == n - 1:
        lowest = minimum_threshold(n, n - 1, fraction, active=True)
    else:
        lowest = max(2, (k + 1 + min(corrupt_count, k)) // 2 + 1)
        if lowest > k + 1:
            k, lowest = n - 1, minimum_threshold(n, n - 1, fraction, active=True)
    # the smallest secure threshold is where attacks have the most room: draw it half the time
    threshold = draw(st.one_of(st.just(lowest), st.integers(min_value=lowest, max_value=k + 1)))
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
    # the view split (sparse_split.py): the target masks with a few of its neighbours only; it
    # and they see one survivor set, everybody else another one in which they dropped
    split = None
    if active and draw(st.booleans()):
        # t - 1 peers: with fewer the target refuses to mask at all
        split = (
            draw(st.sampled_from(ids)),
            threshold - 1,
            tuple(draw(st.permutations(ids))),
            draw(st.booleans()),
        )
        withheld = set()
    seed = draw(st.integers(min_value=0, max_value=2**16))
    return Scenario(
        n,
        protocol,
        k,
        threshold,
        active,
        corrupt,
        frozenset(withheld),
        equivocate,
        (base_survivors, base_dropped),
        per_site,
        split,
        seed,
    )


def _split_peers(
    split: tuple[int, int, tuple[int, ...], bool], graph: dict[int, frozenset[int]]
) -> tuple[int, frozenset[int]]:
    """The target and the peers it may mask with. Preferring far neighbours (fewest common
    neighbours with the target: both ends of its ring window) is the shape of sparse_split.py,
    where the other sites' neighbourhoods keep enough signers of the second survivor set."""
    target, count, order, far = split
    candidates = [p for p in order if p in graph[target]]
    if far:
        candidates.sort(key=lambda p: len(graph[p] & graph[target]))
    return target, frozenset(candidates[:count])


# a view split that recovers site 1's input when signatures are counted only among a site's own
# holders (found with the quorum check removed; the graph follows from the seed)
_SPLIT_EXAMPLE = Scenario(
    n=10,
    protocol="secagg+",
    k=4,
    threshold=3,
    active=True,
    corrupt=frozenset(),
    withheld=frozenset(),
    equivocate=False,
    base=(frozenset(range(1, 11)), frozenset()),
    per_site={},
    split=(1, 2, (9, 10, 1, 2, 3, 4, 5, 6, 7, 8), False),
    seed=7,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adversaries())
@example(_SPLIT_EXAMPLE)
def test_no_server_behaviour_reveals_an_honest_input(scenario: Scenario) -> None:
    """Whatever ciphertexts the server withholds, whatever survivor / dropped sets it shows each
    site (the active variant faces full equivocation and the view split; the semi-honest one a
    server that lies consistently), and with colluders signing anything and handing over every
    share: the server never holds both secrets of an honest site, and never strips every mask
    off an honest input that has an honest neighbour -- for the complete graph and for SecAgg+."""
    _assert_nothing_revealed(scenario)


@st.composite
def view_splits(draw: st.DrawFn) -> Scenario:
    """Only the view split, on SecAgg+ graphs large enough for it to have room (the general
    property above draws it too, but rarely on such graphs)."""
    n = draw(st.integers(min_value=7, max_value=14))
    k = draw(st.sampled_from(list(range(4, n - 1, 2))))
    corrupt_count = draw(st.one_of(st.just(0), st.integers(0, max(0, (n - 2) // 2))))
    lowest = max(2, (k + 1 + min(corrupt_count, k)) // 2 + 1)
    if lowest > k + 1:
        corrupt_count, lowest = 0, k // 2 + 1
    threshold = draw(st.one_of(st.just(lowest), st.integers(lowest, k + 1)))
    ids = list(range(1, n + 1))
    order = tuple(draw(st.permutations(ids)))
    return Scenario(
        n=n,
        protocol="secagg+",
        k=k,
        threshold=threshold,
        active=True,
        corrupt=frozenset(order[:corrupt_count]),
        withheld=frozenset(),
        equivocate=False,
        base=(frozenset(ids), frozenset()),
        per_site={},
        split=(draw(st.sampled_from(ids)), threshold - 1, order[::-1], draw(st.booleans())),
        seed=draw(st.integers(min_value=0, max_value=2**16)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(view_splits())
def test_no_view_split_reveals_an_honest_input_in_secagg_plus(scenario: Scenario) -> None:
    """The view split against SecAgg+ with any peers of the target, colluders among them or
    elsewhere: every honest site that unmasks has seen more than (n + c) / 2 signatures on one
    survivor set, so they all agree on it, and nothing is revealed."""
    _assert_nothing_revealed(scenario)


def _assert_nothing_revealed(sc: Scenario) -> None:
    config, keys = _setup(sc.n, sc.protocol, sc.k, sc.threshold, sc.active, sc.seed)

    def keep(site: int, sender: int, graph: dict[int, frozenset[int]]) -> bool:
        if sc.split is not None:
            target, peers = _split_peers(sc.split, graph)
            if site == target and sender not in peers:
                return False
        return (site, sender) not in sc.withheld

    def view(site: int, graph: dict[int, frozenset[int]]) -> View:
        if sc.split is not None:
            target, peers = _split_peers(sc.split, graph)
            everyone = frozenset(graph)
            if site in peers | {target}:
                return everyone - (graph[target] - peers), frozenset()
            return everyone - peers, peers
        # the semi-honest variant has no consistency check: the server is one that may lie
        # about who dropped, consistently; the active variant faces full equivocation
        return sc.per_site[site] if sc.equivocate else sc.base

    got = adversarial_round(config, keys, corrupt=sc.corrupt, keep=keep, view=view, seed=sc.seed)
    for target in got.masked:
        assert not got.both_secrets(target)
        # an input whose every neighbour colludes is lost whatever the protocol does
        if got.graph[target] - sc.corrupt:
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


# -- H1 / I1: every site's encoding parameters and the roster are bound into the round ----------


def _drive(
    configs: dict[int, SecAggConfig],
    server_config: SecAggConfig,
    inputs: dict[int, np.ndarray],
    keys: dict[int, SigningKey],
) -> tuple[np.ndarray | None, dict[int, ProtocolError]]:
    """A round in which each site was given its own configuration (as by a server that sends
    different sites different SecAggSetups) and the server forwards everything. Returns the
    server's output (None when the round aborted) and the sites' errors."""
    clients = {
        s: SecAggClient(
            s,
            configs[s],
            input_vector=inputs[s],
            signing_key=keys[s],
            policy=SitePolicy(require_active=server_config.active),
        )
        for s in server_config.site_ids
    }
    server = SecAggServer(server_config)
    errors: dict[int, ProtocolError] = {}
    for client in clients.values():
        with contextlib.suppress(ProtocolError):  # the server drops a bad advert, goes on
            server.receive(client.start())
    try:
        while server.phase not in (ServerPhase.DONE, ServerPhase.ABORTED):
            for s, message in sorted(server.close_phase().items()):
                if s in errors:
                    continue
                try:
                    reply = clients[s].handle(message)
                except ProtocolError as exc:
                    errors[s] = exc
                    continue
                with contextlib.suppress(ProtocolError):
                    server.receive(reply)
    except ThresholdError:
        return None, errors
    return server.result(), errors


def _binding(weights: dict[int, float], frac_bits: int = 24, clip: float = 10.0) -> bytes:
    from secure_fl.secagg.config import encoding_binding

    ids = sorted(weights)
    return encoding_binding(
        ids,
        [weights[s] for s in ids],
        bits=32,
        frac_bits=frac_bits,
        clip_range=clip,
        vector_length=10,
    )


@pytest.mark.parametrize("active", [True, False])
@pytest.mark.parametrize("lie", ["weights", "frac_bits", "clip_range"])
def test_sites_shown_other_encoding_parameters_never_isolate_one_input(
    active: bool, lie: str
) -> None:
    """Attacker finding H1 at the core: the server gives the target weight 1 and everyone else
    2**-30 (or frac_bits 0, or clip_range 2**-20), each in a self-consistent setup. The binding of
    those parameters into the round's context makes the target's keys, masks and signatures
    unrelated to its peers': the round aborts or sums garbage, never the target's update."""
    from secure_fl.encoding import FixedPointCodec

    n, target = 6, 3
    ids = list(range(1, n + 1))
    keys = {i: SigningKey.generate() for i in ids}
    honest = dict.fromkeys(ids, 1.0)
    rng = np.random.default_rng(7)
    updates = {i: rng.normal(0, 0.05, 10) for i in ids}
    codec = FixedPointCodec(bits=32, frac_bits=24, clip_range=10.0)
    if lie == "weights":
        target_view = {i: (1.0 if i == target else 2.0**-30) for i in ids}
        other_view = {i: (2.0**30 if i == target else 1.0) for i in ids}
        bind_t, bind_o = _binding(target_view), _binding(other_view)
        other_codec, w_t, w_o = codec, 1.0, 2.0**-30
    else:
        bind_t = _binding(honest)
        fb, clip = (0, 10.0) if lie == "frac_bits" else (24, 2.0**-20)
        bind_o = _binding(honest, frac_bits=fb, clip=clip)
        other_codec = FixedPointCodec(bits=32, frac_bits=fb, clip_range=clip)
        w_t = w_o = 1 / n

    def cfg(binding: bytes) -> SecAggConfig:
        return make_config(
            ids,
            vector_length=10,
            bits=32,
            active=active,
            binding=binding,
            verify_keys={i: k.public_bytes for i, k in keys.items()} if active else None,
        )

    configs = {i: cfg(bind_t if i == target else bind_o) for i in ids}
    inputs = {
        i: (codec if i == target else other_codec)
        .encode(updates[i], weight=w_t if i == target else w_o, rng=rng)
        .values
        for i in ids
    }
    # The server may run under either view; neither gives it the target's update.
    for server_config in (configs[target], configs[1]):
        total, errors = _drive(configs, server_config, inputs, keys)
        if total is not None:
            recovered = codec.decode(total) / w_t
            assert not np.allclose(recovered, updates[target], atol=1e-3), (lie, active)
        else:
            assert errors or active


def test_a_signature_made_under_one_roster_does_not_verify_under_another() -> None:
    """Attacker finding I1: adverts and consistency signatures bind the roster, the threshold
    and the encoding binding, not only protocol, k, active and round."""
    from secure_fl.crypto import verify
    from secure_fl.errors import SignatureError

    keys = {i: SigningKey.generate() for i in range(1, 13)}

    def config(ids: list[int], threshold: int = 3, binding: bytes = b"") -> SecAggConfig:
        return make_config(
            ids,
            vector_length=4,
            bits=32,
            protocol="secagg+",
            k=4,
            threshold=threshold,
            active=True,
            verify_keys={i: keys[i].public_bytes for i in ids},
            round_id=7,
            binding=binding,
        )

    a = config([1, 2, 3, 4, 5, 6, 7, 8])
    others = [
        config([1, 9, 10, 11, 12, 2, 3, 4]),  # same size and round id, other roster
        config([1, 2, 3, 4, 5, 6, 7, 8], threshold=4),
        config([1, 2, 3, 4, 5, 6, 7, 8], binding=bytes(32)),
    ]
    client = SecAggClient(
        1, a, input_vector=np.zeros(4, np.uint32), signing_key=keys[1], policy=SitePolicy()
    )
    adv = client.start()
    verify(
        keys[1].public_bytes,
        adv.signature,
        advert_payload(a, 1, adv.enc_public, adv.mask_public, adv.graph_commitment),
    )
    survivors = frozenset({1, 2, 3})
    for b in others:
        assert a.context("consistency") != b.context("consistency")
        with pytest.raises(SignatureError):
            verify(
                keys[1].public_bytes,
                adv.signature,
                advert_payload(b, 1, adv.enc_public, adv.mask_public, adv.graph_commitment),
            )
        assert consistency_payload(a, survivors, bytes(32)) != consistency_payload(
            b, survivors, bytes(32)
        )


def test_binding_must_be_empty_or_32_bytes() -> None:
    from secure_fl.errors import ConfigError

    with pytest.raises(ConfigError, match="binding"):
        make_config([1, 2, 3], vector_length=4, bits=32, threshold=2, binding=b"x" * 31)
    with pytest.raises(ConfigError, match="binding"):
        make_config([1, 2, 3], vector_length=4, bits=32, threshold=2, binding="x" * 32)  # type: ignore[arg-type]
