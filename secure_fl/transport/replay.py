"""A site's durable record of the rounds it contributed to: fresh round ids, one release per model.

Guarantee (against a malicious server): the site's per-round guards (one unmasking / one
decryption per round id) cannot be sidestepped by renaming rounds. The site

* takes part only in a round whose id is greater than every round id it has contributed to in
  this federation (a replayed or reused id is refused), and
* releases unmasking material (SecAgg / SecAgg+ unmask responses) for a given global model (its
  SHA-256) under one round id only: a second round on the same model, which with a deterministic
  task means the same update, is refused (two sums over different survivor sets of the same
  update would reveal the difference).

Only unmasking is a release here. A plain update is in the clear anyway, and a CKKS upload is
only ever summed under encryption (the server receives no decryption, and any key holder can
decrypt a single upload regardless): guarding them would only stop honest retries.

The record (``state_dir/contributions.json``) is written atomically *before* the message it
guards leaves the site, so it holds across crashes and restarts. A federation whose global model
does not change between rounds (a zero mean update) therefore stops at the second round: that
is intended.

Errors: PolicyError for a refused round; ConfigError when the record is unreadable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError, PolicyError


class ContributionGuard:
    """The record of one site in ``federation`` (see the module docstring)."""

    def __init__(self, path: Path, federation: str) -> None:
        self.path = path
        self.federation = federation

    def _load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        record: dict[str, Any] = {}
        if self.path.exists():
            try:
                record = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{self.path} is unreadable: {exc}") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{self.path} must hold a JSON object")
        fed = record.setdefault(self.federation, {})
        fed.setdefault("highest_round", -1)
        fed.setdefault("released", {})
        return record, fed

    @property
    def highest_round(self) -> int:
        """The highest round id this site contributed to (-1 when none)."""
        return int(self._load()[1]["highest_round"])

    def check_fresh(self, round_id: int, model_sha256: bytes) -> None:
        """Refuse a round id that is not fresh, or a model already released under another id."""
        _, fed = self._load()
        if round_id <= fed["highest_round"]:
            raise PolicyError(
                f"round id {round_id} is not fresh: this site already contributed to round "
                f"{fed['highest_round']} of this federation"
            )
        previous = fed["released"].get(model_sha256.hex())
        if previous is not None and previous != round_id:
            raise PolicyError(
                f"this site already released its update for model {model_sha256.hex()[:16]}... "
                f"in round {previous}; refusing a second update for the same model in round "
                f"{round_id}"
            )

    def record_round(self, round_id: int) -> None:
        """Record that this site is about to contribute to ``round_id`` (call before sending,
        after :meth:`check_fresh`)."""
        record, fed = self._load()
        fed["highest_round"] = max(int(fed["highest_round"]), round_id)
        atomic_write(self.path, json.dumps(record))

    def record_release(self, round_id: int, model_sha256: bytes) -> None:
        """Record that this site is about to release material that, with other rounds on the same
        model, could reveal its update (call before sending). PolicyError when the model was
        released under another round id."""
        record, fed = self._load()
        key = model_sha256.hex()
        previous = fed["released"].get(key)
        if previous is not None and previous != round_id:
            raise PolicyError(
                f"this site already released its update for model {key[:16]}... in round "
                f"{previous}; refusing to release it again in round {round_id}"
            )
        fed["released"][key] = round_id
        fed["highest_round"] = max(int(fed["highest_round"]), round_id)
        atomic_write(self.path, json.dumps(record))
