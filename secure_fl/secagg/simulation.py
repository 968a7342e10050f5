"""In-process N-party harness: runs one whole SecAgg / SecAgg+ round with injected dropouts.

The harness is the transport of a simulation: it moves the protocol core's message objects between
one :class:`SecAggServer` and many :class:`SecAggClient` objects, drops the messages of sites that
"vanish" at a chosen phase, and measures each party's compute time and bytes sent.

Why this is not a call of :func:`secure_fl.rounds.local.run_local` (the round layer's in-process
driver, which runs the whole recipe: plan, clip, encode, mask, unmask, decode): :func:`run_round`
is the *protocol-core* harness the SecAgg tests and benchmarks use, one layer below the recipe.

* Its inputs are already-encoded vectors of ``Z_{2^bits}`` under any :class:`SecAggConfig`
  (any bits, threshold, degree, binding, site ids); ``run_local`` takes float updates and a
  :class:`~secure_fl.rounds.plan.RoundPlan`, and its site halves encode them, so the
  protocol-level tests (modular sums, wrap-around, exact totals) could not be expressed.
* Its interceptors see the core's messages in every phase, including the first advertisement,
  which :meth:`SecAggClient.start` produces without a server message; ``run_local`` starts a site
  from the round layer's setup message instead.
* It returns the core's view (:class:`RoundResult`: the modular ``total``, the SecAgg+ ``graph``,
  per-party :class:`PartyStats`), not a decoded mean.
* ``secure_fl.rounds`` imports ``secure_fl.secagg``; calling back up from here would make the
  protocol core depend on the layer built on it.

The phase loop is the same transport logic as ``run_local``'s; the recipe (planning, encoding,
weights) exists only in :mod:`secure_fl.rounds`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from secure_fl.crypto import MaskPRG, SigningKey
from secure_fl.errors import ConfigError, ProtocolError, RemoteProtocolError
from secure_fl.secagg.client import SecAggClient
from secure_fl.secagg.config import SecAggConfig
from secure_fl.secagg.messages import ClientMessage, Phase, ServerMessage
from secure_fl.secagg.policy import SitePolicy
from secure_fl.secagg.server import SecAggServer

RandomBytes = Callable[[int], bytes]
#: A hook that sees (and may replace) every server-to-site message: for adversarial tests.
Interceptor = Callable[[Phase, int, ServerMessage], ServerMessage]
#: A hook that sees (and may replace) every site-to-server message: for malicious-site tests.
ReplyInterceptor = Callable[[Phase, int, ClientMessage], ClientMessage]


@dataclass(frozen=True)
class PartyStats:
    """Compute seconds and bytes sent by one party over the round."""

    seconds: float
    bytes_sent: int


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one simulated round.

    ``total`` is the modular sum of the inputs of ``survivors`` (the sites whose masked input
    arrived). ``dropped`` are the sites that vanished after key sharing, whose masks were recovered.
    ``excluded`` are holders caught revealing a share that does not match its owner's commitment
    (their shares were ignored). ``graph`` is the masking graph the round derived.
    """

    total: np.ndarray = field(repr=False)
    survivors: frozenset[int]
    dropped: frozenset[int]
    clients: Mapping[int, PartyStats]
    server: PartyStats
    client_errors: Mapping[int, ProtocolError] = field(default_factory=dict)
    excluded: frozenset[int] = frozenset()
    graph: Mapping[int, frozenset[int]] = field(default_factory=dict, repr=False)


def run_round(
    config: SecAggConfig,
    inputs: Mapping[int, np.ndarray],
    *,
    dropouts: Mapping[int, Phase] | None = None,
    signing_keys: Mapping[int, SigningKey] | None = None,
    randbytes: RandomBytes | None = None,
    intercept: Interceptor | None = None,
    intercept_reply: ReplyInterceptor | None = None,
    policy: SitePolicy | None = None,
) -> RoundResult:
    """Run one round among ``config.site_ids`` and return the securely computed sum (the
    protocol-core harness; why it is not a call of :func:`secure_fl.rounds.local.run_local`: see
    the module docstring).

    ``inputs`` maps every site id to its encoded input. ``dropouts`` maps a site to the phase at
    which it vanishes: it sends nothing in that phase or later. ``signing_keys`` are needed in the
    active variant. ``randbytes`` (a callable returning n random bytes) derives every party's
    randomness; it defaults to the OS CSPRNG. ``intercept`` may replace any server-to-site message
    (tests use it to play a malicious server); ``intercept_reply`` may replace any site-to-server
    message (tests use it to play a malicious site). A site whose handler raises a protocol error stops
    there, as a real site would; its error is returned in ``client_errors``. ``policy`` is every
    site's :class:`SitePolicy`; in process (server and sites are one program) it defaults to
    accepting the configuration's own variant, ``SitePolicy(require_active=config.active)``.

    Errors: ThresholdError when too few sites remain (the round aborts, the server reveals nothing);
    RemoteProtocolError when a site of a sparse round vanishes in the reveal phase (the round
    aborts); PolicyError when ``policy`` refuses the configuration; ConfigError when ``inputs``
    does not match the roster.
    """
    if set(inputs) != set(config.site_ids):
        raise ConfigError("inputs must hold exactly one vector per site id in the config")
    dropouts = dict(dropouts or {})
    unknown = set(dropouts) - set(config.site_ids)
    if unknown:
        raise ConfigError(f"dropouts names sites off the roster: {sorted(unknown)}")
    rand = randbytes if randbytes is not None else os.urandom
    site_policy = policy if policy is not None else SitePolicy(require_active=config.active)
    prg = MaskPRG(config.vector_length, config.bits)  # one scratch buffer shared in-process
    seconds = dict.fromkeys(config.site_ids, 0.0)
    sent = dict.fromkeys(config.site_ids, 0)
    server_seconds = 0.0
    server_sent = 0

    clients: dict[int, SecAggClient] = {}
    for site in config.site_ids:
        start = time.perf_counter()
        clients[site] = SecAggClient(
            site,
            config,
            policy=site_policy,
            input_vector=inputs[site],
            signing_key=(signing_keys or {}).get(site),
            randbytes=rand,
            prg=prg,
        )
        seconds[site] += time.perf_counter() - start
    start = time.perf_counter()
    server = SecAggServer(config, prg=prg)
    server_seconds += time.perf_counter() - start

    errors: dict[int, ProtocolError] = {}
    refused: dict[int, RemoteProtocolError] = {}

    def alive(site: int, phase: Phase) -> bool:
        gone = dropouts.get(site)
        return site not in errors and (gone is None or phase.value < gone.value)

    def deliver(reply: ClientMessage, site: int, phase: Phase) -> None:
        nonlocal server_seconds
        if intercept_reply is not None:
            reply = intercept_reply(phase, site, reply)
        sent[site] += reply.wire_size()
        t0 = time.perf_counter()
        try:
            server.receive(reply)
        except RemoteProtocolError as exc:
            refused[site] = exc  # the server drops a bad message; the round goes on
        finally:
            server_seconds += time.perf_counter() - t0

    # Phase 0: advertise keys.
    for site, client in clients.items():
        if alive(site, Phase.ADVERTISE_KEYS):
            t0 = time.perf_counter()
            advert = client.start()
            seconds[site] += time.perf_counter() - t0
            deliver(advert, site, Phase.ADVERTISE_KEYS)
    phase_order = [Phase.REVEAL_NONCE] if config.sparse else []
    phase_order += [Phase.SHARE_KEYS, Phase.MASKED_INPUT]
    if config.active:
        phase_order.append(Phase.CONSISTENCY_CHECK)
    phase_order.append(Phase.UNMASKING)
    for phase in phase_order:
        t0 = time.perf_counter()
        outgoing = server.close_phase()
        server_seconds += time.perf_counter() - t0
        for site in sorted(outgoing):
            message = outgoing[site]
            server_sent += message.wire_size()
            if not alive(site, phase):
                continue
            if intercept is not None:
                message = intercept(phase, site, message)
            t0 = time.perf_counter()
            try:
                reply = clients[site].handle(message)
            except ProtocolError as exc:
                errors[site] = exc
                continue
            finally:
                seconds[site] += time.perf_counter() - t0
            deliver(reply, site, phase)
    t0 = time.perf_counter()
    server.close_phase()
    server_seconds += time.perf_counter() - t0
    return RoundResult(
        total=server.result(),
        survivors=server.u3,
        dropped=server.dropped,
        clients={s: PartyStats(seconds[s], sent[s]) for s in config.site_ids},
        server=PartyStats(server_seconds, server_sent),
        client_errors=errors,
        excluded=server.excluded,
        graph=dict(server.graph or {}),
    )
