"""What the ledger stores: :class:`LedgerEntry` (one mechanism at one site in one round),
:class:`LedgerHead` (an anchor: record count and last hash) and the canonical JSON the hashes
cover.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.privacy.accounting import _check_int, _check_real

LEDGER_FILENAME = "privacy_ledger.sqlite"
"""The ledger's file name inside a run folder."""

LEVELS: tuple[str, ...] = ("sample", "site")


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace, no NaN/Infinity): what the hashes cover."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism invocation at one site in one round (what :meth:`record_intent` stores).

    ``noise_multiplier`` is the Gaussian-equivalent multiplier the accountant uses. For
    distributed mechanisms it is the one of the aggregate noise of ``params["honest_survivors"]``
    (``t - c``) honest sites (``distributed.effective_noise_multiplier(cfg, t - c)``), with
    ``params["threshold"]`` (``t``) and ``params["colluders"]`` (``c``) beside it, and
    ``params["nominal_noise_multiplier"]`` the multiplier ``z`` the noise was sized with.
    ``params`` holds the raw mechanism parameters (JSON values: e.g. per-site sigma, scale,
    threshold, bits, ``calibrated_noise_multiplier`` when the run calibrated for a target, and
    ``noise_source``: ``"csprng"`` or ``"seeded"`` - where the DP randomness came from).
    ``survivors`` is the expected number of contributing sites, or None when not applicable.
    ``strategy`` names the training strategy (several strategies of one run all spend the same
    patients' budget). ``round`` is the 0-based round index (metrics.jsonl, the console and
    the audit number rounds from 1: ``round + 1``). Invalid values raise ConfigError naming the
    field.
    """

    site: str
    round: int
    level: str
    mechanism: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    survivors: int | None
    delta: float
    params: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ConfigError(f"site must be a non-empty string, got {self.site!r}")
        if not isinstance(self.strategy, str):
            raise ConfigError(f"strategy must be a string, got {self.strategy!r}")
        _check_int("round", self.round, low=0)
        if self.level not in LEVELS:
            raise ConfigError(f"level must be one of {LEVELS}, got {self.level!r}")
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ConfigError(f"mechanism must be a non-empty string, got {self.mechanism!r}")
        _check_real("noise_multiplier", self.noise_multiplier, low=0.0, low_open=False)
        _check_real("clip", self.clip, low=0.0)
        _check_real("sample_rate", self.sample_rate, low=0.0, low_open=False, high=1.0)
        _check_int("steps", self.steps, low=0)
        if self.survivors is not None:
            _check_int("survivors", self.survivors, low=0)
        _check_real("delta", self.delta, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"params must be a mapping, got {type(self.params).__name__}")
        try:
            params = json.loads(canonical_json(dict(self.params)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"params must hold finite JSON values only: {exc}") from exc
        object.__setattr__(self, "params", params)
        for name in ("noise_multiplier", "clip", "sample_rate", "delta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "steps", int(self.steps))
        if self.survivors is not None:
            object.__setattr__(self, "survivors", int(self.survivors))


@dataclass(frozen=True)
class LedgerHead:
    """An anchor: the number of records and the hash of the last one (genesis hash when 0)."""

    count: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerHead:
        """Parse ``{"count": int, "hash": str}``; ConfigError when malformed."""
        count, digest = data.get("count"), data.get("hash")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"ledger anchor count must be an integer >= 0, got {count!r}")
        if not isinstance(digest, str):
            raise ConfigError(f"ledger anchor hash must be a hex string, got {digest!r}")
        return cls(count, digest)
