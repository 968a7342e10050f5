"""The server checkpoint keeps the server optimiser's state (vectors beside checkpoint.json, with
their SHA-256) and allocates round ids that are never reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_fl.aggregators.server_opt import make_server_optimizer
from secure_fl.errors import ConfigError
from secure_fl.transport import checkpoint as ckpt


def _save(state: Path, completed: int, optimizer: dict[str, object] | None) -> None:
    model = {"w": np.full(3, float(completed), dtype=np.float32)}
    blob, digest = ckpt.model_blob(model)
    ckpt.save(
        state,
        ckpt.Checkpoint("fed", completed, model, digest, server_optimizer=optimizer),
        blob=blob,
    )


def test_optimizer_state_round_trips_and_old_files_are_removed(tmp_path: Path) -> None:
    opt = make_server_optimizer("fedavgm", lr=1.0, momentum=0.9)
    opt.step(np.ones(3))
    _save(tmp_path, 1, opt.state_dict())
    opt.step(np.ones(3))
    _save(tmp_path, 2, opt.state_dict())
    assert sorted(p.name for p in tmp_path.glob("server-optimizer-*")) == [
        "server-optimizer-000002.tensors"
    ]
    loaded = ckpt.load(tmp_path, "fed")
    assert loaded is not None and loaded.server_optimizer is not None
    again = make_server_optimizer("fedavgm", lr=1.0, momentum=0.9)
    again.load_state_dict(loaded.server_optimizer)
    assert np.array_equal(again.step(np.ones(3)), opt.step(np.ones(3)))


def test_tampered_optimizer_state_is_refused(tmp_path: Path) -> None:
    opt = make_server_optimizer("fedadam")
    opt.step(np.ones(3))
    _save(tmp_path, 1, opt.state_dict())
    path = tmp_path / "server-optimizer-000001.tensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        ckpt.load(tmp_path, "fed")


def test_round_ids_are_fresh_across_calls_and_a_lost_file(tmp_path: Path) -> None:
    assert [ckpt.allocate_round_id(tmp_path, "fed", [], 0) for _ in range(3)] == [0, 1, 2]
    (tmp_path / "round_ids.json").unlink()
    assert ckpt.allocate_round_id(tmp_path, "fed", [{"round_id": 7}], 1) == 8
