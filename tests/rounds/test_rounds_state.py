"""A site half exported and restored between every message: same bits, sealed secrets."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import struct
from typing import Any

import numpy as np
import pytest
from rounds_helpers import make_round, site_streams

from secure_fl.crypto import DeterministicRandom
from secure_fl.errors import DecryptionError
from secure_fl.rounds import (
    PlainSiteRound,
    SecAggServerRound,
    SecAggSiteRound,
    SiteRound,
    StateSealer,
    in_process_policy,
    run_local,
)
from secure_fl.rounds.codec import encode
from secure_fl.rounds.state import MAGIC
from secure_fl.secagg import MaskedInput, Phase, ShareKeys


def _run(
    protocol: str, *, restore: bool, sealer: StateSealer | None = None
) -> tuple[Any, list[bytes], list[bytes]]:
    options: dict[str, Any] = {} if protocol == "plain" else {"dropout_rate": 0.0}
    r = make_round(protocol, 7, 24, seed=9, **options)
    streams = site_streams(9, r.plan.ids)
    policy = in_process_policy(r.plan.spec)
    sent: list[bytes] = []
    blobs: list[bytes] = []
    seal = sealer or StateSealer()

    def record(_phase: Phase, _site: int, message: Any) -> Any:
        if isinstance(message, ShareKeys):
            # AES-GCM share ciphertexts take fresh OS nonces: compare all but those bytes (what
            # they hold is compared through the shares revealed in UnmaskResponse).
            sent.append(encode(dataclasses.replace(message, ciphertexts=())))
        else:
            sent.append(encode(message))
        return message

    def checkpoint(site: int, half: SiteRound) -> SiteRound:
        blob = half.export_state(seal)
        blobs.append(blob)
        return type(half).restore(
            blob,
            seal,
            site_id=site,
            round_id=r.plan.round_id,
            policy=policy,
            signing_key=r.keys[site],
            randbytes=streams["randbytes"][site],  # type: ignore[arg-type]
        )

    out = run_local(
        r.plan,
        r.updates,
        dropouts={2: Phase.MASKED_INPUT, 5: Phase.UNMASKING},
        signing_keys=r.keys,
        intercept_reply=record,
        checkpoint=checkpoint if restore else None,
        **streams,  # type: ignore[arg-type]
    )
    return out, sent, blobs


@pytest.mark.parametrize("protocol", ["secagg", "secagg+", "plain"])
def test_export_restore_between_every_message_gives_the_same_bits(protocol: str) -> None:
    direct, sent_direct, _ = _run(protocol, restore=False)
    restored, sent_restored, blobs = _run(protocol, restore=True)
    assert blobs, "the checkpoint ran"
    assert sent_restored == sent_direct  # every site message, byte for byte
    assert np.array_equal(restored.mean, direct.mean)
    if protocol != "plain":
        assert np.array_equal(restored.total, direct.total)
    assert restored.survivors == direct.survivors


def _secrets_of_a_live_half() -> tuple[bytes, list[bytes]]:
    """A blob of a site half that holds keys, a seed and peers' shares, and those secrets."""
    sealer = StateSealer()
    captured: dict[str, Any] = {}

    def grab(site: int, half: SiteRound) -> SiteRound:
        client: Any = getattr(half, "client", None)
        if site == 1 and client is not None and client._held and "blob" not in captured:
            captured["blob"] = half.export_state(sealer)
            captured["secrets"] = [
                client._enc_key.private_bytes(),
                client._mask_key.private_bytes(),
                client._self_seed,
                *[part for shares in client._held.values() for part in shares[::2]],
            ]
        return half

    r = make_round("secagg+", 7, 24, seed=9, dropout_rate=0.0)
    run_local(r.plan, r.updates, signing_keys=r.keys, checkpoint=grab)
    return captured["blob"], captured["secrets"]


def test_the_blob_holds_no_secret_in_the_clear() -> None:
    blob, secrets = _secrets_of_a_live_half()
    assert len(secrets) > 3
    for secret in secrets:
        assert secret not in blob and secret.hex().encode() not in blob


def test_a_tampered_truncated_or_foreign_blob_fails_with_one_opaque_error() -> None:
    r = make_round("secagg", 4, 8, seed=1)
    sealer = StateSealer()
    policy = in_process_policy(r.plan.spec)
    blobs: list[bytes] = []

    def keep(site: int, half: SiteRound) -> SiteRound:
        blobs.append(half.export_state(sealer))
        return half

    run_local(r.plan, r.updates, signing_keys=r.keys, checkpoint=keep)
    blob = blobs[-1]  # the latest state of its site: restorable as it is
    site = r.plan.ids[-1]
    where: dict[str, Any] = {"site_id": site, "round_id": r.plan.round_id}
    variants = [
        blob[:-1],
        blob[:10],
        blob[:8] + bytes([blob[8] ^ 1]) + blob[9:],  # the public part
        blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:],  # the sealed part
        b"",
    ]
    for bad in variants:
        with pytest.raises(DecryptionError) as info:
            SiteRound.restore(bad, sealer, policy=policy, **where)
        assert str(info.value) == "round state could not be restored"
    with pytest.raises(DecryptionError, match=r"^round state could not be restored$"):
        SiteRound.restore(blob, StateSealer(), policy=policy, **where)  # another host's key
    with pytest.raises(DecryptionError, match=r"^round state could not be restored$"):
        PlainSiteRound.restore(blob, sealer, policy=policy, **where)  # a SecAgg half's blob


def test_the_sealer_cannot_be_pickled_copied_or_printed() -> None:
    sealer = StateSealer()
    for action in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            action(sealer)
    assert "key" in repr(sealer) and not any(c.isdigit() for c in repr(sealer))
    assert not hasattr(sealer, "__dict__")


def test_a_restored_half_keeps_its_randomness_from_the_host() -> None:
    # The randomness source is the host's: a restore with a different stream changes later
    # shares but never the sum (masks cancel), so correctness does not depend on it.
    r = make_round("secagg", 4, 8, seed=2)
    sealer = StateSealer()
    policy = in_process_policy(r.plan.spec)

    def swap(site: int, half: SiteRound) -> SiteRound:
        return type(half).restore(
            half.export_state(sealer),
            sealer,
            site_id=site,
            round_id=r.plan.round_id,
            policy=policy,
            signing_key=r.keys[site],
            randbytes=DeterministicRandom(f"other/{site}".encode()),
        )

    a = run_local(r.plan, r.updates, signing_keys=r.keys, rng=np.random.default_rng(1))
    b = run_local(
        r.plan, r.updates, signing_keys=r.keys, rng=np.random.default_rng(1), checkpoint=swap
    )
    assert a.total is not None and b.total is not None
    assert np.array_equal(a.total, b.total)


# -- freshness: a rolled-back state cannot make a site answer a phase twice (attack a1) --------


def _round_with_blobs(
    export_after_every_message: bool,
) -> tuple[Any, StateSealer, dict[int, bytes], dict[int, SiteRound]]:
    """A full active SecAgg round whose host exports each site's state after the masked input
    (and, when ``export_after_every_message``, after every later message too), keeping the live
    halves: the masked-input blobs, and the halves."""
    r = make_round("secagg", 5, 16, seed=3, dropout_rate=0.0)
    policy = in_process_policy(r.plan.spec)
    server = SecAggServerRound(r.plan)
    sealer = StateSealer()
    sites: dict[int, SiteRound] = {
        s: SecAggSiteRound(s, policy=policy, signing_key=r.keys[s], in_process=True)
        for s in r.plan.ids
    }
    for s, setup in server.setup().items():
        server.receive(
            s, sites[s].on_setup(setup, update=r.updates[s], reported_weight=r.plan.weights[s])
        )
    masked_blobs: dict[int, bytes] = {}
    out = server.close()
    while out:
        for s, message in out.items():
            reply = sites[s].handle(message)
            if isinstance(reply, MaskedInput):
                masked_blobs[s] = sites[s].export_state(sealer)
            elif export_after_every_message and s in masked_blobs:
                sites[s].export_state(sealer)
            server.receive(s, reply)
        out = server.close()
    assert server.outcome().survivors == frozenset(r.plan.ids)
    return r, sealer, masked_blobs, sites


@pytest.mark.parametrize("export_after_every_message", [True, False])
def test_a_rolled_back_state_is_refused_so_no_site_answers_twice(
    export_after_every_message: bool,
) -> None:
    # The attack: after the round, restore every other site's masked-input state and ask it for
    # a second consistency check and unmasking that names the target dropped: t shares of the
    # target's mask key besides the t shares of its self-mask seed of the first unmasking, i.e.
    # its exact update. The live halves moved on (and, by the host's rule, exported newer
    # states): every masked-input blob is stale.
    r, sealer, blobs, _ = _round_with_blobs(export_after_every_message)
    policy = in_process_policy(r.plan.spec)
    for s, blob in blobs.items():
        with pytest.raises(DecryptionError, match=r"^round state could not be restored$"):
            SecAggSiteRound.restore(
                blob,
                sealer,
                site_id=s,
                round_id=r.plan.round_id,
                policy=policy,
                signing_key=r.keys[s],
            )


def test_only_the_latest_state_restores_and_only_once() -> None:
    r = make_round("secagg", 4, 8, seed=5, dropout_rate=0.0)
    policy = in_process_policy(r.plan.spec)
    setups = SecAggServerRound(r.plan).setup()
    sealer = StateSealer()
    half = SecAggSiteRound(1, policy=policy, signing_key=r.keys[1], in_process=True)
    half.on_setup(setups[1], update=r.updates[1], reported_weight=r.plan.weights[1])
    older = half.export_state(sealer)
    latest = half.export_state(sealer)
    where: dict[str, Any] = {"policy": policy, "signing_key": r.keys[1]}
    opaque = r"^round state could not be restored$"
    with pytest.raises(DecryptionError, match=opaque):  # an older blob
        SiteRound.restore(older, sealer, site_id=1, round_id=r.plan.round_id, **where)
    with pytest.raises(DecryptionError, match=opaque):  # another site's id (a2)
        SiteRound.restore(latest, sealer, site_id=2, round_id=r.plan.round_id, **where)
    with pytest.raises(DecryptionError, match=opaque):  # another round's id
        SiteRound.restore(latest, sealer, site_id=1, round_id=r.plan.round_id + 1, **where)
    back = SiteRound.restore(latest, sealer, site_id=1, round_id=r.plan.round_id, **where)
    assert isinstance(back, SecAggSiteRound) and back.site_id == 1
    with pytest.raises(DecryptionError, match=opaque):  # the same blob a second time
        SiteRound.restore(latest, sealer, site_id=1, round_id=r.plan.round_id, **where)
    # Another site's signing key on the right site id (a host running several sites): refused.
    again = back.export_state(sealer)
    with pytest.raises(DecryptionError, match=opaque):
        SiteRound.restore(
            again,
            sealer,
            site_id=1,
            round_id=r.plan.round_id,
            policy=policy,
            signing_key=r.keys[2],
        )


def test_what_the_encoding_says_about_the_update_is_sealed() -> None:
    # ``clipped`` / ``l2_clipped`` say something about the private update (a2): not in the clear.
    r = make_round("secagg", 4, 8, seed=6, dropout_rate=0.0, l2_clip=0.5)
    policy = in_process_policy(r.plan.spec)
    setups = SecAggServerRound(r.plan).setup()
    half = SecAggSiteRound(1, policy=policy, signing_key=r.keys[1], in_process=True)
    half.on_setup(setups[1], update=r.updates[1] * 100, reported_weight=r.plan.weights[1])
    assert half.l2_clipped
    sealer = StateSealer()
    blob = half.export_state(sealer)
    (size,) = struct.unpack_from(">I", blob, len(MAGIC))
    clear = json.loads(blob[len(MAGIC) + 4 : len(MAGIC) + 4 + size])
    assert not {"clipped", "l2_clipped"} & set(clear)
    back = SiteRound.restore(
        blob, sealer, site_id=1, round_id=r.plan.round_id, policy=policy, signing_key=r.keys[1]
    )
    assert isinstance(back, SecAggSiteRound) and back.l2_clipped and back.in_process
