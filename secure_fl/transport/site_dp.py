"""A site's own record of the DP rounds it took part in, and its budget of such rounds.

The server's privacy ledger (:mod:`secure_fl.transport.privacy`) is the server's word; a site
that does not trust it counts for itself. Every SecAgg / SecAgg+ round with DP (distributed
noise, or central trust's clip) that this site is about to unmask for is appended to
``state_dir/dp_rounds.jsonl`` **before** the unmask answer leaves (one JSON object a line: the
federation, round id, mechanism, nominal and effective noise multiplier, clip, survivors, time,
and ``prev``/``hash``: each line's SHA-256 chains to the previous one). With
``policy.max_dp_rounds`` the site refuses (PolicyError, nothing sent) a DP round once that many
are recorded for its federation: at the setup (before its key advertisement) and again before
the unmask answer. A record whose chain is broken (edited, truncated in the middle) is refused
(ConfigError): the site does not guess how many rounds it took part in.

Over-count, never under-count: a round is recorded before the site's masked input is built
(the other sites' shares rebuild its self-mask, so the server needs no unmask answer from it),
whether or not the server then completes it.

The chain alone is unkeyed: deleting the file, dropping its last lines or writing a fresh chain
would reset the budget. After each append the record's length and head hash are anchored in the
site's atomically written ``state_dir/contributions.json`` (:data:`ANCHOR_KEY` under the
federation); a record shorter than its anchor, or whose line at the anchored length does not
carry the anchored hash, is refused (ConfigError naming the file) when the record is opened
(the site's start) and whenever it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError, PolicyError

#: In ``state_dir``: the site's own record of its DP rounds.
DP_RECORD = "dp_rounds.jsonl"
#: In ``state_dir``: the site's contribution record (:mod:`.replay`), which anchors the DP record.
ANCHOR_FILE = "contributions.json"
#: The key of the anchor (``{"count": lines, "head": hash}``) under the federation.
ANCHOR_KEY = "dp_record_anchor"
GENESIS = "0" * 64


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def describe_dp(cfg: Any) -> dict[str, Any]:
    """The record fields of a round's DP configuration (``SitePrivacy.check``'s result):
    mechanism, nominal and effective noise multiplier (None when the server adds the noise),
    clip."""
    effective = getattr(cfg, "effective_noise_multiplier", None)
    nominal = getattr(cfg, "noise_multiplier", None)
    clip = getattr(cfg, "clip", None)
    return {
        "mechanism": str(getattr(cfg, "mechanism", "central_clip")),
        "noise_multiplier": float(nominal) if nominal is not None else None,
        "effective_noise_multiplier": float(effective()) if callable(effective) else None,
        "clip": float(clip) if clip is not None else None,
    }


class DPRoundRecord:
    """``path`` (JSONL, hash-chained; module docstring) for ``federation``; ``max_rounds``
    (``policy.max_dp_rounds``) the most DP rounds accepted, None for no limit; ``anchor`` the
    JSON file that anchors its length and head (default: :data:`ANCHOR_FILE` beside ``path``).

    Errors (constructor): ConfigError when the record is unreadable, its chain is broken, or it
    is missing or shorter than its anchor (module docstring)."""

    def __init__(
        self,
        path: Path,
        federation: str,
        max_rounds: int | None,
        *,
        anchor: Path | None = None,
    ) -> None:
        self._path = Path(path)
        self._federation = federation
        self._max = max_rounds
        self._anchor = Path(anchor) if anchor is not None else self._path.parent / ANCHOR_FILE
        self.entries()  # the site refuses to start on a record that lost its tail

    def _load_anchor(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if not self._anchor.exists():
            return {}, None
        try:
            record = json.loads(self._anchor.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self._anchor} is unreadable: {exc}") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{self._anchor} must hold a JSON object")
        fed = record.get(self._federation)
        anchor = fed.get(ANCHOR_KEY) if isinstance(fed, dict) else None
        if anchor is not None and not (
            isinstance(anchor, dict)
            and isinstance(anchor.get("count"), int)
            and anchor["count"] >= 1
            and isinstance(anchor.get("head"), str)
        ):
            raise ConfigError(
                f"{self._anchor}: {self._federation}.{ANCHOR_KEY} must be "
                '{"count": int >= 1, "head": hex}'
            )
        return record, anchor

    def _check_anchor(self, entries: list[dict[str, Any]]) -> None:
        _, anchor = self._load_anchor()
        if anchor is None:
            return
        count, head = int(anchor["count"]), str(anchor["head"])
        if len(entries) < count or str(entries[count - 1].get("hash")) != head:
            raise ConfigError(
                f"{self._path} holds {len(entries)} DP round entries but {self._anchor} anchors "
                f"{count} ending in hash {head[:16]}...: the record was deleted, truncated or "
                "rewritten; this site does not guess how many DP rounds it took part in"
            )

    def _write_anchor(self, count: int, head: str) -> None:
        record, _ = self._load_anchor()
        fed = record.setdefault(self._federation, {})
        if not isinstance(fed, dict):
            raise ConfigError(f"{self._anchor}: {self._federation} must be a JSON object")
        fed[ANCHOR_KEY] = {"count": count, "head": head}
        atomic_write(self._anchor, json.dumps(record))

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, the chain and its anchor checked. Errors: ConfigError when the file is
        unreadable, its chain is broken (naming the line), or it is missing or shorter than its
        anchor."""
        if not self._path.exists():
            self._check_anchor([])
            return []
        try:
            lines = self._path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{self._path} is unreadable: {exc}") from exc
        out: list[dict[str, Any]] = []
        prev = GENESIS
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{self._path} line {number} is not JSON: {exc}") from exc
            if not isinstance(entry, dict):
                raise ConfigError(f"{self._path} line {number} is not a JSON object")
            body = {k: v for k, v in entry.items() if k != "hash"}
            if entry.get("prev") != prev or entry.get("hash") != _digest(body):
                raise ConfigError(
                    f"{self._path} line {number} breaks the hash chain (edited or reordered); "
                    "this site does not guess how many DP rounds it took part in"
                )
            prev = str(entry["hash"])
            out.append(entry)
        self._check_anchor(out)
        return out

    def rounds(self) -> frozenset[int]:
        """The round ids of this federation's recorded DP rounds. Errors: ConfigError."""
        return frozenset(
            int(e["round_id"]) for e in self.entries() if e.get("federation") == self._federation
        )

    def check_room(self, round_id: int) -> None:
        """Refuse (PolicyError) DP round ``round_id`` when ``max_rounds`` DP rounds of this
        federation are recorded already (a round recorded before does not count twice).
        Errors: PolicyError, ConfigError (a broken record)."""
        if self._max is None:
            return
        done = self.rounds()
        if round_id not in done and len(done) >= self._max:
            raise PolicyError(
                f"this site has taken part in {len(done)} DP rounds of federation "
                f"{self._federation!r} (recorded in {self._path.name}); its policy allows "
                f"policy.max_dp_rounds={self._max}"
            )

    def claim(
        self,
        round_id: int,
        survivors: Iterable[int],
        dp: dict[str, Any],
        *,
        stage: str = "unmask",
    ) -> None:
        """Record DP round ``round_id`` with ``survivors`` (before the masked input: the round's
        participants) and ``dp`` (:func:`describe_dp`) before the caller releases anything of
        it (appended and fsynced; idempotent per round id; ``stage`` names the release the
        entry was written for: ``masked_input`` or ``unmask``). Errors: PolicyError over the
        budget (:meth:`check_room`), ConfigError, OSError."""
        self.check_room(round_id)
        entries = self.entries()
        if any(
            e.get("federation") == self._federation and int(e["round_id"]) == round_id
            for e in entries
        ):
            return
        body: dict[str, Any] = {
            "federation": self._federation,
            "round_id": int(round_id),
            **dp,
            "survivors": sorted(int(s) for s in survivors),
            "stage": str(stage),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prev": str(entries[-1]["hash"]) if entries else GENESIS,
        }
        body["hash"] = _digest(body)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._write_anchor(len(entries) + 1, str(body["hash"]))


def site_privacy(config: Any) -> Any:
    """The site's SitePrivacy (:mod:`secure_fl.transport.privacy`, built from ``config``: a
    :class:`~secure_fl.transport.config.SiteConfig`), or None when that module is not
    installed."""
    import importlib

    try:
        module = importlib.import_module("secure_fl.transport.privacy")
    except ImportError:
        return None
    cls = getattr(module, "SitePrivacy", None)
    if cls is None:
        return None
    factory = getattr(cls, "from_config", None)
    return factory(config) if factory is not None else cls(config.policy)
