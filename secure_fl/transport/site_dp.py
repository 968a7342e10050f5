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

Over-count, never under-count: a round is recorded when the site answers its unmask request,
whether or not the server then completes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError, PolicyError

#: In ``state_dir``: the site's own record of its DP rounds.
DP_RECORD = "dp_rounds.jsonl"
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
    (``policy.max_dp_rounds``) the most DP rounds accepted, None for no limit."""

    def __init__(self, path: Path, federation: str, max_rounds: int | None) -> None:
        self._path = Path(path)
        self._federation = federation
        self._max = max_rounds

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, the chain checked. Errors: ConfigError when the file is unreadable or
        its chain is broken (naming the line)."""
        if not self._path.exists():
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

    def claim(self, round_id: int, survivors: Iterable[int], dp: dict[str, Any]) -> None:
        """Record DP round ``round_id`` with ``survivors`` and ``dp`` (:func:`describe_dp`)
        before the caller releases anything of it (appended and fsynced; idempotent per round
        id). Errors: PolicyError over the budget (:meth:`check_room`), ConfigError, OSError."""
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
