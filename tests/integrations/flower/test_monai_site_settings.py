"""What only a deployed site decides in the MONAI Flower app (second attack review): its DP-SGD
(B4: the run config cannot weaken or switch it off), its training seed (B2: the server cannot
replay its training), and a provisioning that refuses without writing anything (B7)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402

from secure_fl.errors import ConfigError  # noqa: E402
from secure_fl.integrations.flower.app_config import (  # noqa: E402
    TRAIN_SEED_FILE,
    AppConfig,
    site_privacy,
    site_secret_seed,
    site_train_seed,
)
from secure_fl.integrations.flower.grid import LocalGrid  # noqa: E402
from secure_fl.integrations.flower.monai_app import (  # noqa: E402
    initial_arrays,
    make_monai_client_app,
)
from secure_fl.integrations.flower.provision import provision_flower  # noqa: E402
from secure_fl.privacy.accounting import calibrate_noise  # noqa: E402
from secure_fl.training.dp_sgd import sample_rate, steps_per_epoch  # noqa: E402

DEPLOYED = {"secure-fl-site": "site.json", "datalist": "datalist.json"}
SERVER_WEAKENS = {"dp-target-epsilon": 0.0, "dp-delta": 0.5, "dp-clip": 1000.0}


def test_deployed_site_pinning_only_epsilon_keeps_site_delta_and_clip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """B4: the README's deployment (only dp-target-epsilon pinned) under a server run config
    with delta 0.5 and clip 1000: the site's defaults hold, the noise is unchanged, and the
    ignored keys are named in a WARNING."""
    node = {**DEPLOYED, "dp-target-epsilon": 8.0}
    honest = site_privacy(node, {})
    with caplog.at_level(logging.WARNING):
        evil = site_privacy(node, SERVER_WEAKENS)
    assert (evil.target_epsilon, evil.delta, evil.clip) == (8.0, 1e-5, 1.0)
    assert evil == honest
    q, steps = sample_rate(2, 40), 2 * steps_per_epoch(2, 40)
    assert calibrate_noise(8.0, q, steps, evil.delta, evil.accountant) == calibrate_noise(
        8.0, q, steps, honest.delta, honest.accountant
    )
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in ("dp-target-epsilon=0.0", "dp-delta=0.5", "dp-clip=1000.0"):
        assert key in warning


def test_deployed_site_dp_comes_only_from_its_node_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a site that pins nothing has no DP-SGD whatever the server asks (its own choice) ...
    assert site_privacy(DEPLOYED, {"dp-target-epsilon": 8.0}) is None
    # ... and a site that pins DP-SGD cannot be switched off by the run config
    node = {**DEPLOYED, "dp-target-epsilon": 4.0, "dp-delta": 1e-6, "dp-clip": 0.5}
    got = site_privacy(node, SERVER_WEAKENS)
    assert (got.target_epsilon, got.delta, got.clip) == (4.0, 1e-6, 0.5)
    # run config values equal to the site's are not worth a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        site_privacy(node, {"dp-target-epsilon": 4.0, "dp-delta": 1e-6, "dp-clip": 0.5})
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_simulation_takes_the_run_config_where_the_node_config_has_none() -> None:
    node = {"partition-id": 0, "num-partitions": 2, "dp-clip": 0.5}
    got = site_privacy(node, {"dp-target-epsilon": 8.0, "dp-delta": 1e-6, "dp-clip": 2.0})
    assert (got.target_epsilon, got.delta, got.clip) == (8.0, 1e-6, 0.5)
    assert site_privacy(node, {}) is None


@pytest.mark.parametrize(
    ("node", "key"),
    [
        ({**DEPLOYED, "dp-target-epsilon": 8.0, "dp-delta": 1.0}, "node config: dp-delta"),
        ({**DEPLOYED, "dp-target-epsilon": -1.0}, "node config: dp-target-epsilon"),
        ({**DEPLOYED, "dp-target-epsilon": 8.0, "dp-clip": "x"}, "node config: dp-clip"),
    ],
)
def test_a_bad_node_dp_value_names_the_key(node: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        site_privacy(node, {})


def test_site_train_seed_comes_from_a_local_secret_made_once(tmp_path: Path) -> None:
    """B2: the deployed training seed is a function of a 32-byte os.urandom secret in the
    node's folder (0600, never replaced), the round and a fresh nonce: the server, which picks
    the round number, cannot make a site repeat its training randomness."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    nonce = bytes(16)
    first = [site_train_seed(a, r, nonce) for r in (1, 2)]
    secret = (a / TRAIN_SEED_FILE).read_bytes()
    assert len(secret) == 32 and stat.S_IMODE((a / TRAIN_SEED_FILE).stat().st_mode) == 0o600
    assert [site_train_seed(a, r, nonce) for r in (1, 2)] == first  # the secret is kept
    assert (a / TRAIN_SEED_FILE).read_bytes() == secret
    assert first[0] != first[1]
    assert site_train_seed(b, 1, nonce) != first[0]  # another site, another secret
    assert site_train_seed(a, 1) != site_train_seed(a, 1)  # the same round twice: new seeds
    assert site_secret_seed(a, "split") == site_secret_seed(a, "split")  # stable split
    assert sorted(os.listdir(a)) == [TRAIN_SEED_FILE]  # no temp file left behind


def test_site_train_seed_refuses_a_shared_or_short_secret(tmp_path: Path) -> None:
    site_train_seed(tmp_path, 1)
    path = tmp_path / TRAIN_SEED_FILE
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        site_train_seed(tmp_path, 1)
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="32 bytes"):
        site_train_seed(tmp_path, 1)
    with pytest.raises(ConfigError, match="server-round"):
        site_train_seed(tmp_path, 0)


def _deployed_site(tmp_path: Path) -> dict[str, Any]:
    """A provisioned site with its own datalist (site-A of a small synthetic federation)."""
    from secure_fl.data import load_datalist
    from secure_fl.data.datalist.cases import write_datalist
    from secure_fl.data.synthetic import generate_federation

    fed = provision_flower(["site-A", "site-B"], tmp_path / "fed")
    cases = load_datalist(
        generate_federation(tmp_path / "data", sites=2, cases_per_site=4, shape=(16,) * 3)
    )
    own = write_datalist([c for c in cases if c.site == "site-A"], tmp_path / "a.json")
    return {"secure-fl-site": str(fed.site_configs["site-A"]), "datalist": str(own)}


def _train(node: dict[str, Any], run: dict[str, Any], server_round: int) -> Message:
    grid = LocalGrid(make_monai_client_app(mods=[]), 1, node_config=lambda i: dict(node))
    (node_id,) = grid.get_node_ids()
    grid.contexts[node_id].run_config.clear()
    grid.contexts[node_id].run_config.update(run)
    arrays = initial_arrays(AppConfig())
    config = ConfigRecord({"server-round": server_round})
    content = RecordDict({"arrays": arrays, "config": config})
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", node_id, "t")])
    assert not reply.has_error(), reply.error
    return reply


def _weights(reply: Message) -> np.ndarray:
    arrays = reply.content.array_records["arrays"]
    return np.concatenate([arrays[k].numpy().reshape(-1) for k in arrays])


@pytest.mark.slow
def test_deployed_training_cannot_be_replayed_by_the_server(tmp_path: Path) -> None:
    """B2 end to end: the server sends the same model with the same round and run config seed
    twice; a deployed site trains with new randomness each time (metric ``seed-site-secret``
    = 1), so the two updates differ and cannot be differenced exactly."""
    node = _deployed_site(tmp_path)
    one = _train(node, {"seed": 0}, 1)
    two = _train(node, {"seed": 0}, 1)
    metrics = dict(one.content.metric_records["metrics"])
    assert metrics["seed-site-secret"] == 1
    assert metrics["num-examples"] == dict(two.content.metric_records["metrics"])["num-examples"]
    assert not np.array_equal(_weights(one), _weights(two))
    secret = tmp_path / "fed" / "site-A" / "state" / "flower" / TRAIN_SEED_FILE
    assert secret.is_file()


def test_provision_refusal_writes_nothing(tmp_path: Path) -> None:
    """B7: re-provisioning with a new site listed before an existing one is refused before
    anything is written (no half-provisioned new site that a retry then refuses)."""
    provision_flower(["a", "b"], tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for _ in range(2):  # a retry is refused for the same reason, not for the half-written c/
        with pytest.raises(ConfigError, match=r"exists .*a/signing\.key"):
            provision_flower(["c", "a"], tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "c").exists()


def test_the_client_app_takes_dp_from_site_privacy() -> None:
    """The ClientApp's own path (run config over the app's defaults) keeps the B4 fix."""
    from types import SimpleNamespace

    from secure_fl.integrations.flower import monai_app

    context = SimpleNamespace(
        node_config={**DEPLOYED, "dp-target-epsilon": 8.0}, run_config={"dp-delta": 0.5}
    )
    got = monai_app._privacy(context, {"dp-clip": 1000.0})
    assert (got.target_epsilon, got.delta, got.clip) == (8.0, 1e-5, 1.0)
    context.node_config = {"partition-id": 0, "dp-target-epsilon": 8.0}  # simulation
    got = monai_app._privacy(context, {"dp-clip": 2.0})
    assert (got.delta, got.clip) == (0.5, 2.0)
