"""A site half's state between two messages: exported to bytes, restored later, secrets sealed.

A host that cannot keep a round object alive between messages (a Flower ClientApp called once per
message, a worker that may restart) exports the site half after each message and restores it on
the next. ``export_state(site_round, sealer) -> bytes``: the public state (setup, phase, roster,
peers' advertisements, graph, survivor sets) as JSON in the clear; the secrets (the two X25519
private keys, the self-mask seed, the graph nonce, the Shamir shares held for peers, the encoded
input not yet masked, and what the encoding says about the private update: ``clipped``,
``l2_clipped``) as AES-256-GCM ciphertext under the :class:`StateSealer`'s key (plaintext: a
u32 length, the secret JSON, then the encoded input's raw little-endian words, never hex in
JSON: it is millions of words), with the public part as associated data (neither can be altered or swapped without the one opaque
:class:`~secure_fl.errors.DecryptionError`).

**Freshness: one state, restored once.** Integrity alone would let a host be made to restore an
*older* blob (the server provokes a restart, or whatever stores the blobs hands back an old one),
so that the site answers a phase twice, e.g. a second consistency check and unmasking with
another survivor set: both secrets of a target, its exact update. The sealer therefore keeps, in
memory, a monotone counter per (site id, round id) and binds ``(site_id, round_id, counter)``
into the associated data. :func:`restore_state` takes the site id and round id the host expects
and accepts only the blob of the latest counter, once; a live half that handles another message
advances the counter too (its older blobs die). A replayed, older, already restored, or another
site's or round's blob fails with the same opaque DecryptionError.

**The host's rule:** export the new state after every ``on_setup()`` / ``handle()`` call and
*before* it sends the reply that call produced (a reply sent from a state that is not the latest
exported one can be made to happen twice). A host that keeps the half alive instead needs no
blob at all. Whatever the host, it must also give each site a
:class:`~secure_fl.rounds.guards.ReleaseGuard` (one participation and one unmasking per round
id), passed again to :func:`restore_state`.

**Where the sealer lives.** The key is 32 bytes from ``os.urandom``, generated in the host
process and never written anywhere: the object refuses pickling and copying, has no ``repr`` of
the key, and offers no export. A Flower node keeps it in a module-level variable of the
ClientApp's process (or on the node's long-lived context object, never in ``context.state``,
which Flower may persist); the exported blob may go anywhere (``context.state``, a file), since
without the key it reveals no secret. A host restart loses the key and the counters and thereby
the round: the site leaves it, as a crashed site would (the protocol recovers its masks as a
dropout).

Guarantee: a blob holds no secret in the clear; a blob altered, truncated, from another sealer,
of another kind, of another site or round, not the latest one, or restored before, fails with one
DecryptionError that says nothing about why.
"""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secure_fl.crypto import RandomBytes, X25519KeyPair
from secure_fl.crypto.hygiene import NoPickle
from secure_fl.errors import DecryptionError, LocalProtocolError
from secure_fl.rounds import codec
from secure_fl.rounds.checks import config_from_setup
from secure_fl.rounds.messages import SecAggSetup
from secure_fl.rounds.policy import SitePolicy
from secure_fl.secagg.client import ClientPhase, SecAggClient

if TYPE_CHECKING:
    from secure_fl.crypto import SigningKey
    from secure_fl.rounds.base import NoiseHook, SiteRound
    from secure_fl.rounds.guards import ReleaseGuard

MAGIC = b"SFRS\x03"
_NONCE = 12
_AD_DOMAIN = b"secure_fl/rounds/state/v3\x00"


class StateSealer(NoPickle):
    """An AES-256-GCM key that lives only in this process's memory (``os.urandom(32)``), and the
    freshness counters of the states sealed under it (see the module docstring).

    Refuses pickling and copying; its repr names no key; it has no export. Seal with
    :meth:`seal`, open with :meth:`open` (one opaque DecryptionError for any failure).
    """

    __slots__ = ("_aead", "_latest", "_open")
    _no_pickle_message = "StateSealer holds a secret key and cannot be pickled or copied"

    def __init__(self) -> None:
        self._aead = AESGCM(os.urandom(32))
        self._latest: dict[tuple[int, int], int] = {}  # (site, round) -> latest counter
        self._open: set[tuple[int, int]] = set()  # a blob of the latest counter awaits restore

    def __repr__(self) -> str:
        return "StateSealer(<in-memory key>)"

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        """``nonce || AES-256-GCM(plaintext)`` bound to ``associated`` (fresh 96-bit nonce)."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, _AD_DOMAIN + associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        """The plaintext of :meth:`seal`. Errors: DecryptionError (opaque) on any failure."""
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _AD_DOMAIN + associated)
        except Exception as exc:  # InvalidTag, a short blob: one opaque error
            raise DecryptionError("round state could not be restored") from exc

    def advance(self, site_id: int, round_id: int) -> None:
        """Invalidate every blob of (``site_id``, ``round_id``) sealed so far: the live half moved
        on (called by the half itself before it handles a message)."""
        key = (int(site_id), int(round_id))
        self._latest[key] = self._latest.get(key, 0) + 1
        self._open.discard(key)

    def _issue(self, site_id: int, round_id: int) -> bytes:
        """The freshness binding of a new blob of (site, round); older blobs die."""
        self.advance(site_id, round_id)
        key = (int(site_id), int(round_id))
        self._open.add(key)
        return _freshness(key, self._latest[key])

    def _current(self, site_id: int, round_id: int) -> bytes:
        """The freshness binding of the one blob of (site, round) that may still be restored.
        Errors: DecryptionError (opaque) when there is none."""
        key = (int(site_id), int(round_id))
        if key not in self._open:
            raise _opaque()
        return _freshness(key, self._latest[key])

    def _consume(self, site_id: int, round_id: int) -> None:
        self._open.discard((int(site_id), int(round_id)))


def _freshness(key: tuple[int, int], counter: int) -> bytes:
    return f"site={key[0]};round={key[1]};counter={counter}\x00".encode()


def _opaque() -> DecryptionError:
    return DecryptionError("round state could not be restored")


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


def _client_state(client: SecAggClient) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(public, secret, raw input) state of a SecAggClient (internal attributes, read in one
    place). The encoded input (millions of words) is not put in the JSON: ``secret["input"]``
    holds its word count (or None) and the raw little-endian words ride after the JSON."""
    c: Any = client
    public = {
        "phase": c.phase.value,
        "graph_seed": c.graph_seed.hex(),
        "graph": None
        if c.graph is None
        else {str(k): sorted(v) for k, v in sorted(c.graph.items())},
        "adverts": {str(k): codec.encode(a).hex() for k, a in sorted(c._adverts.items())},
        "u2": sorted(c._u2),
        "u3": None if c._u3 is None else sorted(c._u3),
        "rejected": sorted(c._rejected),
    }
    inp = c._input
    raw: Any = b""
    if inp is not None:
        words = np.ascontiguousarray(inp, dtype=inp.dtype.newbyteorder("<")).reshape(-1)
        raw = words.data.cast("B")  # no copy: joined once into the sealed plaintext
    secret = {
        "enc_key": None if c._enc_key is None else c._enc_key.private_bytes().hex(),
        "mask_key": None if c._mask_key is None else c._mask_key.private_bytes().hex(),
        "self_seed": _hex(c._self_seed),
        "nonce": _hex(c._nonce),
        "held": {str(o): [h.hex() for h in t] for o, t in sorted(c._held.items())},
        "input": None if inp is None else int(inp.size),
    }
    return public, secret, raw


def _round_of(site: SiteRound) -> int:
    setup = getattr(site, "setup_message", None)
    if setup is None:
        raise LocalProtocolError("a site half before its setup has no state to export")
    return int(setup.round_id)


def export_state(site: SiteRound, sealer: StateSealer) -> bytes:
    """``site``'s state as bytes (see the module docstring); every older blob of this site and
    round dies. Export after every message, before sending the reply it produced.
    Errors: LocalProtocolError for a half before its setup, in the error state or of a kind
    this module does not know."""
    from secure_fl.rounds.plain import PlainSiteRound
    from secure_fl.rounds.secagg import SecAggSiteRound

    public: dict[str, Any] = {"site_id": site.site_id}
    secret: dict[str, Any] = {}
    raw: Any = b""
    if isinstance(site, SecAggSiteRound):
        round_id = _round_of(site)
        public.update(
            kind="secagg",
            roster=None
            if site.roster is None
            else {str(k): _hex(v) for k, v in sorted(site.roster.items())},
            max_vector_length=site.max_vector_length,
            announced=site.announced,
            in_process=site.in_process,
            setup=None if site.setup_message is None else codec.encode(site.setup_message).hex(),
        )
        if site.client is not None:
            if site.client.phase is ClientPhase.ERROR:
                raise LocalProtocolError("a site half in the error state has no state to export")
            public["client"], secret, raw = _client_state(site.client)
        secret.update(clipped=site.clipped, l2_clipped=site.l2_clipped)
    elif isinstance(site, PlainSiteRound):
        round_id = _round_of(site)
        public.update(
            kind="plain",
            setup=None if site.setup_message is None else codec.encode(site.setup_message).hex(),
            sent=site.done,
        )
        secret["l2_clipped"] = site.l2_clipped
    else:
        raise LocalProtocolError(f"export_state: unsupported site half {type(site).__name__}")
    clear = json.dumps(public, sort_keys=True, separators=(",", ":")).encode()
    fresh = sealer._issue(site.site_id, round_id)
    head = json.dumps(secret, sort_keys=True).encode()
    plaintext = b"".join((struct.pack(">I", len(head)), head, raw))
    sealed = sealer.seal(plaintext, fresh + MAGIC + clear)
    del plaintext
    if isinstance(site, SecAggSiteRound):
        site._sealer = sealer  # its next message invalidates this blob
    return MAGIC + struct.pack(">I", len(clear)) + clear + sealed


def restore_state(
    blob: bytes,
    sealer: StateSealer,
    *,
    site_id: int,
    round_id: int,
    policy: SitePolicy,
    signing_key: SigningKey | None = None,
    randbytes: RandomBytes = os.urandom,
    rng: np.random.Generator | None = None,
    noise: NoiseHook | None = None,
    release_guard: ReleaseGuard | None = None,
) -> SiteRound:
    """The site half that :func:`export_state` wrote to ``blob`` with ``sealer``, for site
    ``site_id`` in round ``round_id`` (what the host expects, never read from the blob). Only
    the latest blob of that site and round is accepted, once. ``release_guard`` (SecAgg) is the
    site's guard across rounds, as given to the half before.

    Errors: DecryptionError (one opaque error) for anything wrong with the blob: altered,
    truncated, from another sealer, of another site or round, older than the latest, restored
    before, or (active variant) for a ``signing_key`` that is not the round's key of that site."""
    from secure_fl.rounds.secagg import SecAggSiteRound

    try:
        raw = bytes(blob)
        if raw[: len(MAGIC)] != MAGIC:
            raise _opaque()
        (size,) = struct.unpack_from(">I", raw, len(MAGIC))
        start = len(MAGIC) + 4
        clear = raw[start : start + size]
        fresh = sealer._current(site_id, round_id)
        plaintext = sealer.open(raw[start + size :], fresh + MAGIC + clear)
        sealer._consume(site_id, round_id)
        (head,) = struct.unpack_from(">I", plaintext)
        secret = json.loads(plaintext[4 : 4 + head])
        words = memoryview(plaintext)[4 + head :]
        public = json.loads(clear)
        if int(public["site_id"]) != int(site_id):
            raise _opaque()
        half = _rebuild(
            public, secret, words, policy, signing_key, randbytes, rng, noise, release_guard
        )
        if int(_round_of(half)) != int(round_id):
            raise _opaque()
        if isinstance(half, SecAggSiteRound):
            half._sealer = sealer  # its next message invalidates every blob of this state
        return half
    except DecryptionError:
        raise
    except Exception as exc:  # a blob that decrypts but does not rebuild: still opaque
        raise _opaque() from exc


def _rebuild(
    public: dict[str, Any],
    secret: dict[str, Any],
    words: memoryview,
    policy: SitePolicy,
    signing_key: SigningKey | None,
    randbytes: RandomBytes,
    rng: np.random.Generator | None,
    noise: NoiseHook | None,
    release_guard: ReleaseGuard | None,
) -> SiteRound:
    from secure_fl.rounds.plain import PlainSiteRound
    from secure_fl.rounds.secagg import SecAggSiteRound

    site_id = int(public["site_id"])
    setup = None if public["setup"] is None else codec.decode(bytes.fromhex(public["setup"]))
    if public["kind"] == "plain":
        plain = PlainSiteRound(site_id, policy=policy, randbytes=randbytes, rng=rng, noise=noise)
        plain.setup_message = setup
        plain.l2_clipped = bool(secret["l2_clipped"])
        plain._sent = bool(public["sent"])
        return plain
    if public["kind"] != "secagg":
        raise _opaque()
    roster = public["roster"]
    site = SecAggSiteRound(
        site_id,
        policy=policy,
        signing_key=signing_key,
        randbytes=randbytes,
        rng=rng,
        noise=noise,
        roster=None if roster is None else {int(k): _unhex(v) for k, v in roster.items()},
        max_vector_length=public["max_vector_length"],
        announced=public["announced"],
        in_process=bool(public["in_process"]),
        release_guard=release_guard,
    )
    site.setup_message = setup
    site.clipped = int(secret["clipped"])
    site.l2_clipped = bool(secret["l2_clipped"])
    if "client" in public:
        if not isinstance(setup, SecAggSetup):
            raise _opaque()
        config, _ = config_from_setup(setup, max_length=site.max_vector_length)
        if config.active:
            own = (config.verify_keys or {}).get(site_id)
            if signing_key is None or own != signing_key.public_bytes:
                raise _opaque()  # another site's key: this blob is not that site's state
        client = site.new_client(config)
        _load_client(client, public["client"], secret, words, config.bits)
        site.client = client
    return site


def _load_client(
    client: SecAggClient,
    public: dict[str, Any],
    secret: dict[str, Any],
    words: memoryview,
    bits: int,
) -> None:
    c: Any = client
    c.phase = ClientPhase(public["phase"])
    c.graph_seed = bytes.fromhex(public["graph_seed"])
    graph = public["graph"]
    c.graph = None if graph is None else {int(k): frozenset(v) for k, v in graph.items()}
    c._adverts = {int(k): codec.decode(bytes.fromhex(a)) for k, a in public["adverts"].items()}
    c._u2 = frozenset(public["u2"])
    c._u3 = None if public["u3"] is None else frozenset(public["u3"])
    c._rejected = set(public["rejected"])
    if secret.get("enc_key") is not None:
        c._enc_key = X25519KeyPair.from_private_bytes(bytes.fromhex(secret["enc_key"]))
    if secret.get("mask_key") is not None:
        c._mask_key = X25519KeyPair.from_private_bytes(bytes.fromhex(secret["mask_key"]))
    c._self_seed = _unhex(secret.get("self_seed"))
    c._nonce = _unhex(secret.get("nonce"))
    c._held = {
        int(o): tuple(bytes.fromhex(h) for h in t) for o, t in secret.get("held", {}).items()
    }
    count = secret.get("input")
    dtype = np.dtype("<u4") if bits == 32 else np.dtype("<u8")
    if count is None:
        if len(words):
            raise _opaque()
    else:
        if len(words) != int(count) * dtype.itemsize:
            raise _opaque()
        # one copy: a writable array in native order, independent of the plaintext buffer
        c._input = np.frombuffer(words, dtype=dtype).astype(dtype.newbyteorder("="))


__all__ = ["StateSealer", "export_state", "restore_state"]
