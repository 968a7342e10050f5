"""The in-process driver: one whole round with every party in this process.

:func:`run_local` is the transport of a simulation: it builds (or takes) one server half and one
site half per participant, carries their messages, drops those of sites that "vanish" at a given
phase, and measures each party's seconds and bytes. ``aggregators.create(...)`` and the transport
simulation are thin over it; it runs the same round objects as the gRPC server and site.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from secure_fl.crypto import MaskPRG, RandomBytes, SigningKey
from secure_fl.errors import ConfigError, PolicyError, ProtocolError, RemoteProtocolError
from secure_fl.rounds.base import NoiseHook, RoundOutcome, ServerRound, SiteRound
from secure_fl.rounds.guards import MemoryReleaseGuard, ReleaseGuard
from secure_fl.rounds.messages import Message, SecAggSetup
from secure_fl.rounds.plain import PlainServerRound, PlainSiteRound
from secure_fl.rounds.plan import RoundPlan
from secure_fl.rounds.policy import SitePolicy
from secure_fl.rounds.secagg import SecAggServerRound, SecAggSiteRound
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.secagg.messages import (
    ConsistencyRequest,
    KeyRoster,
    Phase,
    RevealSet,
    ShareDelivery,
    UnmaskRequest,
)

#: Sees (and may replace) every server-to-site message: for adversarial tests.
Interceptor = Callable[[Phase, int, Any], Any]
#: Called after a site half handled a message; may return a replacement (e.g. the half exported
#: and restored, see :mod:`secure_fl.rounds.state`).
Checkpoint = Callable[[int, SiteRound], SiteRound]


def in_process_policy(spec: AggregationSpec) -> SitePolicy:
    """The policy every in-process site applies: the spec's own variant, corrupt fraction and
    dropout rate (server and sites are one program), checked exactly as a deployed site checks
    its pinned policy. ``plain`` is accepted only for a plain spec."""
    return SitePolicy(
        aggregations=(spec.protocol,),
        allow_plain=spec.protocol == "plain",
        require_active=spec.active,
        corrupt_fraction=spec.corrupt_fraction,
        dropout_rate=spec.dropout_rate,
    )


def make_server_round(plan: RoundPlan, **options: Any) -> ServerRound:
    """The server half for ``plan``'s protocol (plain, secagg, secagg+). CKKS needs its contexts:
    build :class:`secure_fl.rounds.ckks.CkksServerRound` directly. Errors: ConfigError."""
    if plan.spec.protocol == "plain":
        return PlainServerRound(plan)
    if plan.spec.masked:
        return SecAggServerRound(plan, **options)
    raise ConfigError(f"make_server_round: build the {plan.spec.protocol!r} round directly")


def make_site_round(protocol: str, site_id: int, **options: Any) -> SiteRound:
    """The site half for ``protocol`` (plain, secagg, secagg+) with the keyword ``options`` of
    its class. Errors: ConfigError for ckks (build CkksSiteRound directly) or unknown names."""
    if protocol == "plain":
        for secagg_only in ("prg", "in_process", "release_guard"):
            options.pop(secagg_only, None)
        return PlainSiteRound(site_id, **options)
    if protocol in ("secagg", "secagg+"):
        return SecAggSiteRound(site_id, **options)
    raise ConfigError(f"make_site_round: build the {protocol!r} round directly")


def _reply_phase(message: Any, sparse: bool) -> Phase:
    """The phase of the reply a site sends to ``message`` (dropouts are injected per phase)."""
    if isinstance(message, SecAggSetup):
        return Phase.ADVERTISE_KEYS
    if isinstance(message, KeyRoster):
        return Phase.REVEAL_NONCE if sparse else Phase.SHARE_KEYS
    if isinstance(message, RevealSet):
        return Phase.SHARE_KEYS
    if isinstance(message, ShareDelivery):
        return Phase.MASKED_INPUT
    if isinstance(message, ConsistencyRequest):
        return Phase.CONSISTENCY_CHECK
    if isinstance(message, UnmaskRequest):
        return Phase.UNMASKING
    return Phase.MASKED_INPUT  # a plain or CKKS upload is the round's input


def _guard_of(guards: Mapping[int, ReleaseGuard] | None, site: int) -> ReleaseGuard:
    given = None if guards is None else guards.get(site)
    return given if given is not None else MemoryReleaseGuard()


def _per_site(value: Any, site: int) -> Any:
    if isinstance(value, Mapping):
        return value[site]
    return value


def run_local(
    plan: RoundPlan,
    updates: Mapping[int, np.ndarray],
    *,
    dropouts: Mapping[int, Phase] | None = None,
    server: ServerRound | None = None,
    sites: Mapping[int, SiteRound] | None = None,
    policy: SitePolicy | None = None,
    signing_keys: Mapping[int, SigningKey] | None = None,
    randbytes: RandomBytes | Mapping[int, RandomBytes] | None = None,
    rng: np.random.Generator | Mapping[int, np.random.Generator] | None = None,
    noise: NoiseHook | Mapping[int, NoiseHook] | None = None,
    intercept: Interceptor | None = None,
    intercept_reply: Interceptor | None = None,
    checkpoint: Checkpoint | None = None,
    release_guards: Mapping[int, ReleaseGuard] | None = None,
) -> RoundOutcome:
    """Run ``plan``'s round in process among ``plan.ids``: ``updates`` maps each participant to
    its flat float update; ``dropouts`` a site to the phase from which it sends nothing
    (:class:`~secure_fl.secagg.Phase`; an upload of the plain or CKKS round is MASKED_INPUT).

    The halves are built from the plan unless given (``server``, ``sites``: required for CKKS).
    ``policy`` every site's policy (default :func:`in_process_policy`); ``signing_keys`` (active
    variant); ``randbytes``, ``rng``, ``noise``: one for all sites or one per site (default: the
    OS CSPRNG; a shared deterministic stream is for tests only). ``intercept`` /
    ``intercept_reply`` may replace any message (adversarial tests); ``checkpoint`` is called
    after each message a site half handles and may return a replacement half. The SecAgg halves
    built here are ``in_process=True`` (server and sites are this one program: the plan's verify
    keys are taken as the roster) and get ``release_guards[site]`` or else a fresh
    :class:`~secure_fl.rounds.guards.MemoryReleaseGuard` (share one across calls to make a site
    refuse a round id it already took part in).

    Returns the server's :class:`RoundOutcome`, its ``record`` extended with ``bytes_sent``,
    ``site_seconds`` (site -> value), ``server_bytes_sent``, ``server_seconds``, ``clipped``
    (site -> values clipped to clip_range), ``clipped_updates`` (sites clipped in L2),
    ``site_errors`` (site -> the ProtocolError that made it leave the round) and ``refused``
    (site -> the RemoteProtocolError for which the server dropped one of its messages).

    Errors: ConfigError when ``updates`` do not name exactly the participants or ``dropouts``
    names others; PolicyError when a site's policy refuses the round; ThresholdError when too
    few sites remain (the round aborts, nothing revealed); other ProtocolError on an abort.
    """
    ids = plan.ids
    if set(updates) != set(ids):
        raise ConfigError("updates must hold exactly one vector per participant of the plan")
    drops = dict(dropouts or {})
    unknown = set(drops) - set(ids)
    if unknown:
        raise ConfigError(f"dropouts names sites off the roster: {sorted(unknown)}")
    sparse = plan.secagg.sparse if plan.secagg is not None else False
    prg = MaskPRG(plan.vector_length, plan.secagg.bits) if plan.secagg is not None else None
    if server is None:
        server = make_server_round(plan, **({"prg": prg} if prg is not None else {}))
    halves: dict[int, SiteRound] = dict(sites or {})
    site_policy = policy if policy is not None else in_process_policy(plan.spec)
    for s in ids:
        if s not in halves:
            rb = _per_site(randbytes, s)
            halves[s] = make_site_round(
                plan.spec.protocol,
                s,
                policy=site_policy,
                signing_key=(signing_keys or {}).get(s),
                randbytes=rb if rb is not None else os.urandom,
                rng=_per_site(rng, s),
                noise=_per_site(noise, s),
                prg=prg,
                in_process=True,
                release_guard=_guard_of(release_guards, s),
            )
    seconds = dict.fromkeys(ids, 0.0)
    sent = dict.fromkeys(ids, 0)
    server_sent = 0
    server_seconds = 0.0
    errors: dict[int, ProtocolError] = {}
    refused: dict[int, RemoteProtocolError] = {}

    def alive(site: int, phase: Phase) -> bool:
        gone = drops.get(site)
        return site not in errors and (gone is None or phase.value < gone.value)

    def step(site: int, message: Message, *, first: bool = False) -> None:
        nonlocal server_sent, server_seconds
        phase = _reply_phase(message, sparse)
        server_sent += int(message.wire_size())
        if not alive(site, phase):
            return
        if intercept is not None:
            message = intercept(phase, site, message)
        half = halves[site]
        t0 = time.perf_counter()
        try:
            if first:
                reply = half.on_setup(
                    message, update=updates[site], reported_weight=plan.weights[site]
                )
            else:
                reply = half.handle(message)
        except PolicyError:
            raise
        except ProtocolError as exc:
            errors[site] = exc
            return
        finally:
            seconds[site] += time.perf_counter() - t0
        if checkpoint is not None:
            t0 = time.perf_counter()
            halves[site] = checkpoint(site, halves[site])
            seconds[site] += time.perf_counter() - t0
        if reply is None:
            return
        if intercept_reply is not None:
            reply = intercept_reply(phase, site, reply)
        sent[site] += int(reply.wire_size())
        t0 = time.perf_counter()
        try:
            server.receive(site, reply)
        except RemoteProtocolError as exc:
            refused[site] = exc  # the server drops a bad message; the round goes on
        finally:
            server_seconds += time.perf_counter() - t0

    t0 = time.perf_counter()
    setups = server.setup()
    server_seconds += time.perf_counter() - t0
    for site in sorted(setups):
        step(site, setups[site], first=True)
    while not server.done:
        t0 = time.perf_counter()
        out = server.close()
        server_seconds += time.perf_counter() - t0
        for site in sorted(out):
            step(site, out[site])
    t0 = time.perf_counter()
    outcome = server.outcome()
    server_seconds += time.perf_counter() - t0
    record = dict(outcome.record)
    record.update(
        bytes_sent=sent,
        site_seconds=seconds,
        server_bytes_sent=server_sent,
        server_seconds=server_seconds,
        clipped={s: int(getattr(halves[s], "clipped", 0)) for s in ids},
        clipped_updates=sorted(s for s in ids if getattr(halves[s], "l2_clipped", False)),
        site_errors=errors,
        refused=refused,
    )
    return RoundOutcome(
        survivors=outcome.survivors,
        dropped=outcome.dropped,
        excluded=outcome.excluded,
        mean=outcome.mean,
        total=outcome.total,
        encrypted=outcome.encrypted,
        record=record,
    )


__all__ = ["in_process_policy", "make_server_round", "make_site_round", "run_local"]
