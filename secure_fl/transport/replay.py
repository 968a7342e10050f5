"""A site's durable record of the rounds it contributed to: fresh round ids, one release per model.

Guarantee (against a malicious server): the site's per-round guards (one unmasking / one
decryption per round id) cannot be sidestepped by renaming rounds. The site

* takes part only in a round whose id is greater than every round id it has contributed to in
  this federation (a replayed or reused id is refused), and
* releases unmasking material (SecAgg / SecAgg+ unmask responses) for a given global model under
  one round id only: a second round on the same model, which with a deterministic task means the
  same update, is refused (two sums over different survivor sets of the same update would reveal
  the difference).

"The same model" is decided by the model's **content**, not by the bytes the server served: the
key is :func:`secure_fl.transport.tensors.release_key` of the tensors the site loaded, whose
first digest, the one recorded, is :func:`~secure_fl.transport.tensors.content_digest_v2`
(names sorted, values rounded to float32 with -0.0 as 0.0; order, dtype, shape and header left
out). A re-serialised copy of a model (an extra JSON key in the header, another tensor order,
float64 instead of float32) and a float64 copy nudged below float32 resolution, which a float32
task trains on bit for bit, therefore count as the same model. Keying by the SHA-256 of the
downloaded bytes (older versions), or by values upcast to float64 (``content_digest``, version
1, until this one), let the server get a site's exact update by differencing two rounds.
Records of version-1 digests written by older versions (``released_content``) are still
consulted: the key also holds the version-1 digest of the model rounded to float32 (and of the
model as loaded when that differs), and a model is refused when any of them is recorded. For a CKKS model the key is the content after decryption (a ciphertext digest would
be useless: anyone holding the public key re-randomises a ciphertext into new bytes of the same
plaintext). A CKKS upload is not a release, though (below), so for CKKS rounds the key only
matters when one federation mixes aggregations.

Residual risk (``protocols/security.md``): a server that *perturbs* the model slightly between two
rounds with different participants gets a new content digest and two sums of nearly the same
updates; their difference approximates the left-out site's update. No digest can stop this (the
site cannot tell a perturbation from honest progress); only differential privacy bounds it.

Only unmasking is a release here. A plain update is in the clear anyway, and a CKKS upload is
only ever summed under encryption (the server receives no decryption, and any key holder can
decrypt a single upload regardless): guarding them would only stop honest retries.

The record (``state_dir/contributions.json``) is written atomically *before* the message it
guards leaves the site, so it holds across crashes and restarts. A federation whose global model
does not change between rounds (a zero mean update) therefore stops at the second round: that
is intended. Releases recorded by the oldest versions were keyed by the model's bytes
(``released``) and are kept but no longer consulted (their round ids still count for
freshness).

Errors: PolicyError for a refused round; ConfigError when the record is unreadable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError, PolicyError
from secure_fl.transport.tensors import DIGEST_BYTES

_RELEASED = "released_content"  # version-1 content digests (hex) -> round id: read only
_RELEASED_V2 = "released_content_v2"  # the first digest of each release key (hex) -> round id


def _digests(model_digest: bytes) -> list[str]:
    """The digests (hex) of a release key (:func:`~secure_fl.transport.tensors.release_key`) or
    of a single digest. Errors: PolicyError when the length is not a multiple of 32 bytes."""
    key = bytes(model_digest)
    if not key or len(key) % DIGEST_BYTES:
        raise PolicyError(
            f"model_digest must be one or more {DIGEST_BYTES}-byte digests, got {len(key)} bytes"
        )
    return [key[i : i + DIGEST_BYTES].hex() for i in range(0, len(key), DIGEST_BYTES)]


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
        # Content digest (hex) -> round id. ("released", keyed by model bytes, is the old record.)
        fed.setdefault(_RELEASED, {})
        fed.setdefault(_RELEASED_V2, {})
        return record, fed

    @staticmethod
    def _released_in(fed: dict[str, Any], model_digest: bytes) -> tuple[str, int] | None:
        """(digest hex, round id) of a recorded release of any digest of the key, else None."""
        for key in _digests(model_digest):
            for table in (_RELEASED_V2, _RELEASED):
                previous = fed[table].get(key)
                if previous is not None:
                    return key, int(previous)
        return None

    @property
    def highest_round(self) -> int:
        """The highest round id this site contributed to (-1 when none)."""
        return int(self._load()[1]["highest_round"])

    def check_fresh(self, round_id: int, model_digest: bytes | None = None) -> None:
        """Refuse a round id that is not fresh, or (when ``model_digest`` is given: the model's
        :func:`~secure_fl.transport.tensors.release_key`, or one content digest) a model any of
        whose digests was released under another round id. PolicyError (also for a
        ``model_digest`` that is not a whole number of 32-byte digests)."""
        _, fed = self._load()
        if round_id <= fed["highest_round"]:
            raise PolicyError(
                f"round id {round_id} is not fresh: this site already contributed to round "
                f"{fed['highest_round']} of this federation"
            )
        if model_digest is None:
            return
        found = self._released_in(fed, model_digest)
        if found is not None and found[1] != round_id:
            raise PolicyError(
                f"this site already released its update for model {found[0][:16]}... "
                f"in round {found[1]}; refusing a second update for the same model in round "
                f"{round_id}"
            )

    def record_round(self, round_id: int) -> None:
        """Record that this site is about to contribute to ``round_id`` (call before sending,
        after :meth:`check_fresh`)."""
        record, fed = self._load()
        fed["highest_round"] = max(int(fed["highest_round"]), round_id)
        atomic_write(self.path, json.dumps(record))

    def record_release(self, round_id: int, model_digest: bytes) -> None:
        """Record that this site is about to release material that, with other rounds on the same
        model (``model_digest``: its :func:`~secure_fl.transport.tensors.release_key`, or one
        content digest), could reveal its update (call before sending); the first digest is
        recorded. PolicyError when any digest of the key was released under another round id."""
        record, fed = self._load()
        found = self._released_in(fed, model_digest)
        if found is not None and found[1] != round_id:
            raise PolicyError(
                f"this site already released its update for model {found[0][:16]}... in round "
                f"{found[1]}; refusing to release it again in round {round_id}"
            )
        fed[_RELEASED_V2][_digests(model_digest)[0]] = round_id
        fed["highest_round"] = max(int(fed["highest_round"]), round_id)
        atomic_write(self.path, json.dumps(record))
