"""A Flower node's own secure_fl identity and durable memory: what it pins, how it seals.

* :class:`FlowerSite` -- what a site pins for itself (never from the server): federation, name,
  site id, the provisioned roster with verify keys, its :class:`~secure_fl.rounds.policy.
  SitePolicy`, its node-local ``state_dir``, its Ed25519 signing key and its CKKS secret context.
  :func:`load_flower_site` reads it from JSON (relative paths relative to the file);
  :func:`site_from_node_config` from the Flower ``node_config`` key :data:`NODE_CONFIG_KEY`.
* :class:`NodeSealer` -- the round layer's :class:`~secure_fl.rounds.state.StateSealer` whose
  AES-256 key (``state_dir/flower/sealer.key``, 0600, created once from ``os.urandom``) and
  freshness counters (``state_dir/flower/sealer-counters.json``, written atomically under a file
  lock; one small entry per round) live in the node's ``state_dir``. Flower may run every
  message of a node in a NEW process (deployment: one ``flwr-clientapp`` per message;
  simulation: any of the Ray actors), so an
  in-memory key and in-memory counters would not survive from one message to the next. With
  them on disk the freshness rule of ``protocols/rounds.md`` (the latest blob only, once) holds
  across processes: a replayed or older blob in ``context.state`` fails with the one opaque
  DecryptionError.
* :class:`NodeReleaseGuard` -- the durable :class:`~secure_fl.rounds.guards.ReleaseGuard` of the
  node (``state_dir/flower/releases.json``): one participation per round id, one survivor set per
  round id for unmasking, the masked input recorded before it leaves, and one round id per
  global model (SHA-256 of the arrays the server sent; content guard, as the gRPC site's
  :mod:`secure_fl.transport.replay`), recorded before the unmask answer (or plain upload)
  leaves; in a DP round the site's own DP record
  (:class:`~secure_fl.transport.site_dp.DPRoundRecord`) as the gRPC site.
* :func:`charge_train` -- the train function runs for at most :data:`MAX_TRAINS_WITHOUT_SETUP`
  (3) train stages in a row that no input of the site followed (within
  :data:`TRAIN_WINDOW_S`, one hour; recorded in ``releases.json`` before the training runs,
  cleared only when an input of this site actually leaves: the masked input, the plain or the
  CKKS upload; a setup that the policy refuses clears nothing), so that a server cannot run
  the site's training on many models for free (each train stage is a query of the site's data).

Threat: the key file and the blobs are both on the node; the key file is 0600 in a 0700 folder
and never enters ``context.state`` (which Flower may persist or ship elsewhere), so a blob alone
reveals nothing. Whoever reads the node's ``state_dir`` owns the node anyway.

Errors: ConfigError naming the field or file; PolicyError for a refused release.

(Over 400 lines on purpose: every durable record of the node, and the locking they share, in
one place.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError, DecryptionError, PolicyError
from secure_fl.rounds.policy import SitePolicy
from secure_fl.rounds.state import StateSealer
from secure_fl.transport.config_common import (
    CkksFiles,
    RosterEntry,
    _check_roster,
    _ckks,
    _roster,
    valid_name,
)
from secure_fl.transport.config_section import _read_json, _Section
from secure_fl.transport.config_site import _policy

#: The Flower ``node_config`` key naming the site's JSON file.
NODE_CONFIG_KEY = "secure-fl-site"
#: The node's own folder inside ``state_dir``.
NODE_DIR = "flower"
SEALER_KEY = "sealer.key"
SEALER_COUNTERS = "sealer-counters.json"
RELEASES = "releases.json"
#: The most train stages in a row that no input of the site followed (masked input, plain or
#: CKKS upload; within :data:`TRAIN_WINDOW_S`).
MAX_TRAINS_WITHOUT_SETUP = 3
#: Seconds after which a train stage without a setup no longer counts.
TRAIN_WINDOW_S = 3600.0

#: The refusals of :class:`NodeReleaseGuard` and :func:`charge_train` that reach the server:
#: constant texts (no model digest, no earlier round id, no count); the details are logged on
#: the node only (logger ``secure_fl.integrations.flower.node``, WARNING).
REFUSED_JOINED = "this site already took part in a round with this round id"
REFUSED_RELEASED = "this site already released its update for this global model in another round"
REFUSED_SURVIVORS = (
    "the server asks to unmask this round again with another survivor set; answering would "
    "reveal the difference of two sums"
)
REFUSED_TRAIN_CAP = (
    f"the server ran this site's training too many times in a row without a setup that took "
    f"its input (at most {MAX_TRAINS_WITHOUT_SETUP} per {TRAIN_WINDOW_S:g} s); it trains again "
    "after that"
)
REFUSED_DP_BUDGET = "this site's policy.max_dp_rounds allows it no further DP round"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowerSite:
    """What a Flower node pins for itself (see the module docstring). ``site_id`` must be the
    roster's id of ``name``. Errors: ConfigError naming the field."""

    federation: str
    name: str
    site_id: int
    roster: tuple[RosterEntry, ...]
    policy: SitePolicy
    state_dir: Path
    signing_key: Path | None = None
    ckks: CkksFiles | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not self.federation:
            raise ConfigError(f"federation must be a non-empty string, got {self.federation!r}")
        if not valid_name(self.name):
            raise ConfigError(f"name must match [A-Za-z0-9._-]{{1,64}}, got {self.name!r}")
        if not isinstance(self.roster, tuple):
            raise ConfigError("roster must be a tuple of RosterEntry")
        _check_roster(self.roster)
        entry = next((e for e in self.roster if e.name == self.name), None)
        if entry is None:
            raise ConfigError(f"name {self.name!r} is not on the roster")
        if entry.site_id != self.site_id:
            raise ConfigError(
                f"site_id {self.site_id!r} is not the roster's id of {self.name!r} "
                f"({entry.site_id})"
            )
        if not isinstance(self.policy, SitePolicy):
            raise ConfigError("policy must be a SitePolicy")
        object.__setattr__(self, "state_dir", Path(self.state_dir))

    @property
    def verify_keys(self) -> dict[int, bytes | None]:
        """The pinned roster as the round layer takes it: site id -> verify key (or None)."""
        return {e.site_id: e.verify_key for e in self.roster}

    @property
    def node_dir(self) -> Path:
        """``state_dir/flower``, created 0700 on first use."""
        path = self.state_dir / NODE_DIR
        _mkdir_private(self.state_dir)
        _mkdir_private(path)
        return path


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def load_flower_site(path: str | Path) -> FlowerSite:
    """The :class:`FlowerSite` of the JSON file ``path``: ``federation``, ``name``,
    ``site_id`` (optional; checked against the roster), ``roster`` ([{name, site_id,
    verify_key (hex)}]), ``policy`` (the gRPC site's policy section), ``state_dir``,
    ``signing_key`` (optional), ``ckks`` ({context, fingerprint}, optional); relative paths are
    relative to the file. Unknown keys are refused. Errors: ConfigError naming the field.

    Parsed once per version of the file in a process (Flower calls the mod for every message):
    an unchanged file (same path, device, inode, size, modification time and status-change time,
    checked before and after the read, and last modified or changed (mtime and ctime) over :data:`_SETTLED_NS` ago, so that
    two writes within the file system's timestamp granularity cannot hide) gives the same frozen
    FlowerSite again; any change reloads it. The status-change time (ctime) catches an in-place rewrite of the same size whose modification time was set back (cp -p,
    rsync -a --inplace, tar): no system call sets ctime."""
    file = Path(path).absolute()
    before = _stamp(file)
    cached = _SITES.get(before) if before is not None else None
    if cached is not None:
        return cached
    site = _parse_flower_site(file)
    settled = before is not None and time.time_ns() - max(before[4], before[5]) > _SETTLED_NS
    if before is not None and settled and _stamp(file) == before:
        if len(_SITES) >= _SITES_MAX:
            _SITES.clear()
        _SITES[before] = site
    return site


#: path + stat of a site JSON -> its parsed FlowerSite (see :func:`load_flower_site`).
_SITES: dict[tuple[str, int, int, int, int, int], FlowerSite] = {}
_SITES_MAX = 64
#: A site JSON modified less than this long ago (ns) is parsed again at every load.
_SETTLED_NS = 2_000_000_000


def _stamp(file: Path) -> tuple[str, int, int, int, int, int] | None:
    """(path, device, inode, size, mtime ns, ctime ns) of ``file``; None when it cannot be
    stat-ed. ctime is in the key because ``os.utime`` can restore mtime but not ctime."""
    try:
        st = file.stat()
    except OSError:
        return None  # the read reports it (ConfigError naming the file)
    return (str(file), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse_flower_site(path: Path) -> FlowerSite:
    data, base = _read_json(path)
    s = _Section(data, "", base)
    roster = _roster(s)
    name = s.str_("name")
    site_id = s.opt_int("site_id")
    if site_id is None:
        site_id = next((e.site_id for e in roster if e.name == name), 0)
    site = FlowerSite(
        federation=s.str_("federation"),
        name=name,
        site_id=site_id,
        roster=roster,
        policy=_policy(s),
        state_dir=s.path("state_dir"),
        signing_key=s.opt_path("signing_key"),
        ckks=_ckks(s),
    )
    s.done()
    return site


def site_from_node_config(node_config: Mapping[str, Any]) -> FlowerSite:
    """The node's :class:`FlowerSite`, from the JSON file named by ``node_config``'s
    :data:`NODE_CONFIG_KEY` (``flwr`` ``--node-config "secure-fl-site='site.json'"``, or the
    simulation's per-node config). Errors: ConfigError naming the key when it is absent or not
    a string (with the node config keys present, and the hint for Flower's simulation, which
    sets only ``partition-id`` / ``num-partitions``: ``make_secure_fl_mod(site_fn)``), or the
    JSON's field (:func:`load_flower_site`)."""
    value = node_config.get(NODE_CONFIG_KEY) if isinstance(node_config, Mapping) else None
    if not isinstance(value, str) or not value:
        present = sorted(str(k) for k in node_config) if isinstance(node_config, Mapping) else []
        raise ConfigError(
            f"node_config[{NODE_CONFIG_KEY!r}] must name this node's secure_fl site JSON "
            f"(a path), got {value!r}; node config keys present: {present}; in simulation "
            "Flower sets only partition-id/num-partitions: use make_secure_fl_mod(site_fn)"
        )
    return load_flower_site(value)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` + ``.lock`` (0600; one message of a node at a
    time, across processes)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_json_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_or_create_key(path: Path, what: str = "the node's sealing key") -> bytes:
    """The 32-byte secret at ``path`` (``what`` it is, for errors), created once
    (``os.urandom``, a 0600 file linked into place, so two processes racing both end with the
    same secret, never replaced). Errors: ConfigError when the file is open to other users or
    does not hold exactly 32 bytes."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # atomic and exclusive: the first writer wins
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path} is readable or writable by others (mode {mode:o}); chmod 600")
    key = path.read_bytes()
    if len(key) != 32:
        raise ConfigError(f"{path} must hold exactly 32 bytes ({what}), got {len(key)}")
    return key


def _replace_unsynced(path: Path, text: str) -> None:
    """Replace ``path`` (0600) by ``text`` atomically (a rename) WITHOUT fsync: every process
    sees the new content at once; it is durable after the next fsynced write of the file or
    :meth:`NodeSealer.sync`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NodeSealer(StateSealer):
    """A :class:`~secure_fl.rounds.state.StateSealer` whose key and freshness counters live in
    ``state_dir/flower`` (module docstring), so that a state exported while handling one Flower
    message is restored, once, while handling the next one, in any process of the node.

    Guarantee: as StateSealer's (a blob that is altered, foreign, stale, already restored, or of
    another site or round fails with one opaque DecryptionError), across process restarts; a
    restore's consume is a compare-and-set (two processes racing on one blob: one wins), seen
    by every process at once and made durable (fsync) by the next state's counter or by
    :meth:`sync` before the host's reply leaves.
    Refuses pickling and copying; its repr names no key. Errors: ConfigError for an unreadable
    or group/world-accessible key file or an unreadable counters file."""

    __slots__ = ("_counters", "_dir", "_seen", "_unsynced")

    def __init__(self, state_dir: str | Path) -> None:
        folder = Path(state_dir) / NODE_DIR
        _mkdir_private(Path(state_dir))
        _mkdir_private(folder)
        self._dir = folder
        self._counters = folder / SEALER_COUNTERS
        self._aead = AESGCM(load_or_create_key(folder / SEALER_KEY))
        self._latest = {}
        self._open = set()
        self._seen: dict[tuple[int, int], int] = {}  # counter _current verified, to consume
        self._unsynced = False  # a consume written but not yet fsynced (see sync)

    def __repr__(self) -> str:
        return f"NodeSealer({self._dir.name}/<key file>)"

    def _update(
        self, site_id: int, round_id: int, *, issue: bool, consume: bool, seen: int | None = None
    ) -> int:
        """One compare-and-set of (site, round)'s entry under the lock: ``issue`` a new counter
        (open), ``consume`` the open one (``seen``: the counter :meth:`_current` verified; any
        other state fails with the opaque DecryptionError, so two processes racing to restore
        one blob cannot both succeed), or advance (every blob dies). An advance of an entry
        that is already closed writes nothing: no blob of it can be restored (``_current``
        needs ``open``) and the next issue moves past every counter used so far."""
        key = f"{int(site_id)}:{int(round_id)}"
        with locked(self._counters):
            data = _read_json_file(self._counters)
            entry = data.get(key, {"latest": 0, "open": False})
            if issue:
                entry = {"latest": int(entry["latest"]) + 1, "open": True}
            elif consume:
                if entry.get("open") is not True or int(entry["latest"]) != seen:
                    raise DecryptionError("round state could not be restored")
                entry = {"latest": int(entry["latest"]), "open": False}
            elif entry.get("open") is not True and key in data:
                return int(entry["latest"])  # already closed: nothing to kill, no write
            else:
                entry = {"latest": int(entry["latest"]) + 1, "open": False}
            data[key] = entry
            text = json.dumps(data, sort_keys=True)
            if consume:  # visible to every process at once; durable before any reply leaves
                _replace_unsynced(self._counters, text)
                self._unsynced = True
            else:  # durable: the file's latest content (any earlier consume included)
                atomic_write(self._counters, text, mode=0o600)
                self._unsynced = False
            return int(entry["latest"])

    def sync(self) -> None:
        """Make every consume recorded by this sealer durable (fsync of the counters file and
        its folder; nothing when there is none). A consume is written at once (another process
        cannot restore the blob again) but not fsynced: the export of the next state (an
        fsynced write of the same file) makes it durable before the reply leaves; a host that
        replies without exporting a new state (the round's last message) calls this first.
        Errors: OSError."""
        if not self._unsynced:
            return
        with locked(self._counters):
            for path, flags in ((self._counters, os.O_RDONLY), (self._dir, os.O_RDONLY)):
                fd = os.open(path, flags)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._unsynced = False

    def advance(self, site_id: int, round_id: int) -> None:
        """Every blob of (site, round) sealed so far dies (recorded on disk)."""
        self._update(site_id, round_id, issue=False, consume=False)

    def _issue(self, site_id: int, round_id: int) -> bytes:
        counter = self._update(site_id, round_id, issue=True, consume=False)
        return f"site={int(site_id)};round={int(round_id)};counter={counter}\x00".encode()

    def _current(self, site_id: int, round_id: int) -> bytes:
        with locked(self._counters):
            entry = _read_json_file(self._counters).get(f"{int(site_id)}:{int(round_id)}")
        if not isinstance(entry, dict) or entry.get("open") is not True:
            raise DecryptionError("round state could not be restored")
        counter = int(entry["latest"])
        self._seen[(int(site_id), int(round_id))] = counter
        return f"site={int(site_id)};round={int(round_id)};counter={counter}\x00".encode()

    def _consume(self, site_id: int, round_id: int) -> None:
        seen = self._seen.pop((int(site_id), int(round_id)), None)
        self._update(site_id, round_id, issue=False, consume=True, seen=seen)


def charge_train(state_dir: Path, *, now: float | None = None) -> None:
    """Record one train stage in ``state_dir/flower/releases.json`` BEFORE the user's training
    runs. Guarantee: the training runs for at most :data:`MAX_TRAINS_WITHOUT_SETUP` train
    stages in a row that no input of this site followed within :data:`TRAIN_WINDOW_S` seconds
    (the record is cleared only when an input leaves: :meth:`NodeReleaseGuard.contribute`, the
    masked input, or :meth:`NodeReleaseGuard.upload`, the plain or CKKS upload; never by a
    setup alone, which a server can make the policy refuse); across processes and restarts.
    ``now``: the wall-clock time (tests only). Errors: PolicyError for one stage too many
    (nothing is trained); ConfigError for an unreadable record."""
    folder = Path(state_dir) / NODE_DIR
    _mkdir_private(folder)
    path = folder / RELEASES
    stamp = time.time() if now is None else float(now)
    with locked(path):
        data = _read_json_file(path)
        recent = [
            float(t)
            for t in data.get("unset_trains", [])
            if isinstance(t, int | float) and stamp - float(t) < TRAIN_WINDOW_S
        ]
        if len(recent) >= MAX_TRAINS_WITHOUT_SETUP:
            log.warning("secure_fl node: training refused, %d trains without an input", len(recent))
            raise PolicyError(REFUSED_TRAIN_CAP)
        data["unset_trains"] = [*recent, stamp]
        atomic_write(path, json.dumps(data, sort_keys=True), mode=0o600)


@contextmanager
def _constant_dp_refusal() -> Iterator[None]:
    """Turn the DP record's PolicyError (which counts the site's DP rounds) into the constant
    :data:`REFUSED_DP_BUDGET`; the details are logged on the node only."""
    try:
        yield
    except PolicyError as exc:
        log.warning("secure_fl node: DP round refused: %s", exc)
        raise PolicyError(REFUSED_DP_BUDGET) from None


class NodeReleaseGuard:
    """The node's durable :class:`~secure_fl.rounds.guards.ReleaseGuard` for round ``round_id``
    on the global model ``model_digest`` (SHA-256 of the arrays the server sent; a random one
    when none was sent, never a hash of the update), in ``state_dir/flower/releases.json`` (written atomically under
    a lock, before the guarded message leaves). ``dp_record`` / ``dp``: in a DP round, the
    site's own record of DP rounds and this round's fields (:func:`~secure_fl.transport.site_dp.
    describe_dp`), charged before the masked input and again before the unmask answer;
    ``participants`` the round's site ids (what the DP record notes at the masked input).

    Guarantee (against a malicious server, across processes and restarts): one participation
    per round id; one survivor set per round id for unmasking; a global model released (unmask
    answered, or uploaded in a plain round) under one round id only; the train cap cleared only
    when an input leaves; no claim for another round id than this guard's. Every refusal that
    reaches the server is one of the constant texts ``REFUSED_*`` (no digest, no earlier round
    id, no count; the details are logged on the node).
    Errors: PolicyError for a refused release; ConfigError for an unreadable record."""

    def __init__(
        self,
        state_dir: Path,
        round_id: int,
        model_digest: str,
        *,
        dp_record: Any = None,
        dp: Mapping[str, Any] | None = None,
        participants: tuple[int, ...] = (),
    ) -> None:
        folder = Path(state_dir) / NODE_DIR
        _mkdir_private(folder)
        self.path = folder / RELEASES
        self.round_id = int(round_id)
        self.model_digest = str(model_digest)
        self._dp_record = dp_record
        self._dp = dict(dp) if dp is not None else None
        self.participants = tuple(int(p) for p in participants)

    def _edit(self) -> Any:
        return locked(self.path)

    def _load(self) -> dict[str, Any]:
        data = _read_json_file(self.path)
        data.setdefault("joined", [])
        data.setdefault("contributed", [])
        data.setdefault("unmasked", {})
        data.setdefault("content", {})
        return data

    def _save(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(data, sort_keys=True), mode=0o600)

    def _own(self, round_id: int) -> None:
        if int(round_id) != self.round_id:
            raise PolicyError(
                f"the round half claims round id {round_id}; this message's round is "
                f"{self.round_id}"
            )

    def _refuse_released(self, previous: Any) -> NoReturn:
        """Raise the constant :data:`REFUSED_RELEASED` (PolicyError); the model digest and the
        earlier round id are logged on the node only."""
        log.warning(
            "secure_fl node: model %s... already released in round %s; refused in round %d",
            self.model_digest[:16],
            previous,
            self.round_id,
        )
        raise PolicyError(REFUSED_RELEASED)

    def check_fresh(self) -> None:
        """Refuse (PolicyError) a round id this site already took part in, or a global model it
        already released under another round id: at the train stage, before anything derived
        from its data (even its weight) is sent."""
        data = self._load()
        if self.round_id in data["joined"]:
            log.warning("secure_fl node: round id %d refused: already joined", self.round_id)
            raise PolicyError(REFUSED_JOINED)
        previous = data["content"].get(self.model_digest)
        if previous is not None and int(previous) != self.round_id:
            self._refuse_released(previous)

    def claim(self, round_id: int, survivors: frozenset[int] | None) -> None:
        """See :meth:`secure_fl.rounds.guards.ReleaseGuard.claim`; with ``survivors`` also the
        content record (one round id per global model) and, in a DP round, the DP record.
        Errors: PolicyError; ConfigError."""
        self._own(round_id)
        with self._edit():
            data = self._load()
            if survivors is None:
                self.check_fresh()
                if self._dp_record is not None and self._dp is not None:
                    with _constant_dp_refusal():
                        self._dp_record.check_room(self.round_id)
                data["joined"].append(self.round_id)
                self._save(data)  # the train cap is NOT cleared here (contribute / upload)
                return
            chosen = sorted(int(s) for s in survivors)
            previous = data["unmasked"].get(str(self.round_id))
            if previous is not None and sorted(previous) != chosen:
                log.warning(
                    "secure_fl node: second unmasking of round %d with survivors %s (was %s) "
                    "refused",
                    self.round_id,
                    chosen,
                    sorted(previous),
                )
                raise PolicyError(REFUSED_SURVIVORS)
            released = data["content"].get(self.model_digest)
            if released is not None and int(released) != self.round_id:
                self._refuse_released(released)
            if self._dp_record is not None and self._dp is not None:
                with _constant_dp_refusal():
                    self._dp_record.claim(self.round_id, chosen, self._dp)
            data["unmasked"][str(self.round_id)] = chosen
            data["content"][self.model_digest] = self.round_id
            self._save(data)

    def contribute(self, round_id: int) -> None:
        """See :meth:`secure_fl.rounds.guards.ReleaseGuard.contribute`: recorded (and, in a DP
        round, charged to the site's DP record within ``policy.max_dp_rounds``) before the
        masked input leaves; an input leaves, so the train cap is cleared (:func:`charge_train`).
        Errors: PolicyError; ConfigError."""
        self._own(round_id)
        with self._edit():
            data = self._load()
            if self._dp_record is not None and self._dp is not None:
                with _constant_dp_refusal():
                    self._dp_record.claim(
                        self.round_id, self.participants, self._dp, stage="masked_input"
                    )
            if self.round_id not in data["contributed"]:
                data["contributed"].append(self.round_id)
            data["unset_trains"] = []  # an input leaves (see charge_train)
            self._save(data)

    def upload(self, round_id: int, *, release: bool) -> None:
        """Record, before a plain or CKKS upload of round ``round_id`` leaves, that an input of
        this site leaves (clears the train cap, :func:`charge_train`) and, with ``release``
        (plain: the update leaves in the clear), that the global model is released under this
        round id (one round id per model, as the unmask answer of a SecAgg round). Errors:
        PolicyError (another round id than this guard's, or the model already released under
        another round id); ConfigError."""
        self._own(round_id)
        with self._edit():
            data = self._load()
            if release:
                released = data["content"].get(self.model_digest)
                if released is not None and int(released) != self.round_id:
                    self._refuse_released(released)
                data["content"][self.model_digest] = self.round_id
            if self.round_id not in data["contributed"]:
                data["contributed"].append(self.round_id)
            data["unset_trains"] = []  # an input leaves (see charge_train)
            self._save(data)


__all__ = [
    "NODE_CONFIG_KEY",
    "FlowerSite",
    "NodeReleaseGuard",
    "NodeSealer",
    "charge_train",
    "load_flower_site",
    "load_or_create_key",
    "locked",
    "site_from_node_config",
]
