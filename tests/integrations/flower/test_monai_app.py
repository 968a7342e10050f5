"""The MONAI 3D-UNet Flower app (secure_fl.integrations.flower.monai_app) and the example project."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

from secure_fl.errors import ConfigError  # noqa: E402
from secure_fl.integrations.flower import monai_app  # noqa: E402
from secure_fl.integrations.flower.grid import LocalGrid  # noqa: E402
from secure_fl.integrations.flower.monai_app import (  # noqa: E402
    AppConfig,
    initial_arrays,
    make_monai_client_app,
    make_monai_server_app,
    read_federation_index,
    write_federation_index,
)
from secure_fl.transport.config_common import RosterEntry  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "flower"


def _defaults(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"work-dir": str(tmp_path / "work"), **extra}


def _metrics(reply: Message) -> dict[str, Any]:
    return dict(reply.content.metric_records["metrics"])


def _reason(reply: Message) -> str:
    assert reply.has_error()
    return str(reply.error.reason)


def _train_once(grid: LocalGrid, arrays: Any, node: int, server_round: int) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    message = grid.create_message(content, "train", node, "t")
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error(), reply.error
    return reply


def test_train_returns_trained_unet_and_public_metrics(tmp_path: Path) -> None:
    defaults = _defaults(tmp_path)
    grid = LocalGrid(make_monai_client_app(defaults=defaults, mods=[]), 1)
    (node,) = grid.get_node_ids()
    arrays = initial_arrays(AppConfig.from_config(defaults))
    reply = _train_once(grid, arrays, node, 1)
    trained = reply.content.array_records["arrays"]
    assert list(trained.keys()) == list(arrays.keys())
    moved = 0.0
    for key in arrays:
        before, after = arrays[key].numpy(), trained[key].numpy()
        assert after.shape == before.shape and after.dtype == before.dtype
        moved += float(np.abs(after.astype(np.float64) - before).sum())
    assert moved > 0  # local training changed the model
    metrics = _metrics(reply)
    assert metrics["num-examples"] == 3  # 4 synthetic cases: 3 train, 1 held out
    assert metrics["steps"] >= 1
    assert math.isfinite(metrics["train-loss"])
    assert 0.0 <= metrics["val-dice"] <= 1.0
    assert "dp-epsilon" not in metrics
    assert metrics["seed-site-secret"] == 0  # simulation: the run config seed (reproducible)


def _provisioned(defaults: dict[str, Any]) -> dict[str, Any]:
    """Provision the simulation's sites (their state_dir holds the DP-SGD log)."""
    monai_app.federation_for_run(AppConfig.from_config(defaults))
    return defaults


def _dp_log_of(defaults: dict[str, Any]) -> Path:
    site = monai_app.simulation_site(AppConfig.from_config(defaults), 0)
    return Path(site.state_dir) / "flower" / "dp_sgd.jsonl"


def test_dp_sgd_epsilon_accumulates_across_messages_and_hides_loss(tmp_path: Path) -> None:
    defaults = _provisioned(_defaults(tmp_path, **{"dp-target-epsilon": 8.0}))
    grid = LocalGrid(make_monai_client_app(defaults=defaults, mods=[]), 1)
    (node,) = grid.get_node_ids()
    arrays = initial_arrays(AppConfig.from_config(defaults))
    first = _metrics(_train_once(grid, arrays, node, 1))
    # context.state is never trusted for the DP history: wiping it (a rolled-back or forged
    # state, a restarted SuperNode) changes nothing.
    grid.contexts[node].state = RecordDict()
    second = _metrics(_train_once(grid, arrays, node, 2))
    assert "train-loss" not in first and "train-loss" not in second  # never un-noised under DP
    assert 0 < first["dp-epsilon"] < second["dp-epsilon"] <= 8.0 + 1e-6
    # The accountant's history lives in the site's own state_dir, 0600, one line per round.
    log = _dp_log_of(defaults)
    assert len(log.read_text().splitlines()) == 2 and log.stat().st_mode & 0o777 == 0o600
    assert not grid.contexts[node].state.config_records
    # A third round would exceed the calibrated target (2 rounds): the app refuses it.
    third = grid.create_message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3})}),
        "train",
        node,
        "t",
    )
    (reply,) = grid.send_and_receive([third])
    assert "BudgetExceededError" in _reason(reply)
    # A new Flower run (fresh Contexts, round numbers from 1 again) continues the site's
    # epsilon: its first round is refused too, and the refusal is not logged as a spend.
    run_2 = LocalGrid(make_monai_client_app(defaults=defaults, mods=[]), 1)
    (node_2,) = run_2.get_node_ids()
    again = run_2.create_message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        "train",
        node_2,
        "t",
    )
    (reply,) = run_2.send_and_receive([again])
    assert "BudgetExceededError" in _reason(reply)
    assert len(log.read_text().splitlines()) == 2


def test_dp_sgd_without_a_site_to_keep_its_log_is_refused(tmp_path: Path) -> None:
    defaults = _defaults(tmp_path, **{"dp-target-epsilon": 8.0})  # nothing provisioned
    grid = LocalGrid(make_monai_client_app(defaults=defaults, mods=[]), 1)
    (node,) = grid.get_node_ids()
    content = RecordDict(
        {
            "arrays": initial_arrays(AppConfig.from_config(defaults)),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", node, "t")])
    assert "state_dir" in _reason(reply)


def test_site_pins_its_own_dp_in_node_config(tmp_path: Path) -> None:
    defaults = _provisioned(_defaults(tmp_path))  # the server's run config asks for no DP
    app = make_monai_client_app(defaults=defaults, mods=[])
    grid = LocalGrid(app, 1, node_config=lambda i: {"dp-target-epsilon": 4.0})
    (node,) = grid.get_node_ids()
    reply = _train_once(grid, initial_arrays(AppConfig.from_config(defaults)), node, 1)
    assert 0 < _metrics(reply)["dp-epsilon"] <= 4.0 + 1e-6


def test_evaluate_scores_the_sent_model(tmp_path: Path) -> None:
    defaults = _defaults(tmp_path)
    grid = LocalGrid(make_monai_client_app(defaults=defaults, mods=[]), 1)
    (node,) = grid.get_node_ids()
    arrays = initial_arrays(AppConfig.from_config(defaults))
    message = grid.create_message(RecordDict({"arrays": arrays}), "evaluate", node, "e")
    (reply,) = grid.send_and_receive([message])
    metrics = _metrics(reply)
    assert metrics["num-examples"] == 1 and 0.0 <= metrics["val-dice"] <= 1.0


def test_train_without_global_model_is_refused(tmp_path: Path) -> None:
    grid = LocalGrid(make_monai_client_app(defaults=_defaults(tmp_path), mods=[]), 1)
    (node,) = grid.get_node_ids()
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), "train", node, "t")])
    assert "'arrays'" in _reason(reply)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"protocol": "ckks"}, "protocol"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"channels": "4"}, "channels"),
        ({"grid-size": 18, "channels": "4,8,16"}, "grid-size"),
        ({"dp-delta": 1.0}, "dp-delta"),
        ({"lr": float("nan")}, "lr"),
        ({"threads": True}, "threads"),
    ],
)
def test_app_config_names_the_bad_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AppConfig.from_config(config)


def test_app_config_reads_run_config_and_ignores_user_keys() -> None:
    cfg = AppConfig.from_config({"num-server-rounds": 3, "lr": 1, "my-own-key": "x"})
    assert cfg.num_server_rounds == 3 and cfg.lr == 1.0 and cfg.model_channels() == (4, 8, 16)


def test_node_without_site_or_partition_is_refused(tmp_path: Path) -> None:
    context = Context(1, 2, {}, RecordDict(), {})
    with pytest.raises(ConfigError, match="secure-fl-site"):
        monai_app.resolve_site(context, _defaults(tmp_path))


def test_federation_index_round_trip(tmp_path: Path) -> None:
    roster = (
        RosterEntry("site-A", 1, verify_key=b"\x01" * 32),
        RosterEntry("site-B", 2, verify_key=b"\x02" * 32),
    )
    site_json = tmp_path / "sites" / "site-A.json"
    path = write_federation_index(
        tmp_path / "federation.json", federation="f", roster=roster, sites={"site-A": site_json}
    )
    name, read_roster, sites = read_federation_index(path)
    assert name == "f" and read_roster == roster
    assert sites["site-A"].resolve() == site_json.resolve()
    bad = json.loads(path.read_text())
    bad["extra"] = 1
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="extra"):
        read_federation_index(path)


def test_example_project_is_a_valid_flower_app() -> None:
    from flwr.cli.config_utils import load_and_validate

    config, warnings = load_and_validate(EXAMPLE / "pyproject.toml", check_module=False)
    assert warnings == []
    flwr_app = config["tool"]["flwr"]["app"]
    assert flwr_app["components"]["serverapp"] == "secure_fl_flower_app.server_app:app"
    assert flwr_app["config"]["protocol"] == "secagg+"
    AppConfig.from_config(flwr_app["config"])  # every default is valid
    pytest.importorskip("secure_fl.integrations.flower.mod")
    sys.path.insert(0, str(EXAMPLE))
    try:
        client_app = importlib.import_module("secure_fl_flower_app.client_app")
        server_app = importlib.import_module("secure_fl_flower_app.server_app")
    finally:
        sys.path.remove(str(EXAMPLE))
    assert isinstance(client_app.app, flwr.clientapp.ClientApp)
    assert isinstance(server_app.app, flwr.serverapp.ServerApp)


def test_server_app_runs_secagg_plus_rounds_in_process(tmp_path: Path) -> None:
    """The whole app (ServerApp + ClientApp with the secure_fl mod) over 3 in-process nodes."""
    pytest.importorskip("secure_fl.integrations.flower.provision")
    defaults = _defaults(tmp_path, **{"num-server-rounds": 1, "stage-timeout": 60.0})
    replies: list[Message] = []

    class Watching(LocalGrid):
        def deliver(self, message: Message, context: Context) -> Message | None:
            reply = super().deliver(message, context)
            if reply is not None and message.metadata.message_type == "train":
                replies.append(reply)
            return reply

    grid = Watching(make_monai_client_app(defaults=defaults), 3)
    context = Context(grid.run.run_id, 1, {}, RecordDict(), {})
    out = monai_app.run_server(grid, context, defaults)
    # No reply of the secure round carries a site's arrays: only envelopes, frames and metrics.
    assert len(replies) >= 3 * 3  # train, setup and the SecAgg+ steps, for each of 3 sites
    assert all(not r.has_error() and not r.content.array_records for r in replies)
    summary = json.loads((out / "metrics.json").read_text())
    (round_1,) = summary["rounds"]
    assert sorted(round_1["survivors"]) == [1, 2, 3]
    assert summary["model_change_l2"] > 0
    assert 0.0 <= summary["final"]["val_dice"] <= 1.0
    for metrics in round_1["metrics"].values():
        assert metrics["num-examples"] == 3 and "val-dice" in metrics
    with np.load(out / "model.npz") as model:
        assert set(model.files) == set(initial_arrays(AppConfig.from_config(defaults)).keys())
    assert make_monai_server_app(defaults=defaults) is not None


def test_secure_and_plain_runs_of_the_app_give_the_same_model(tmp_path: Path) -> None:
    """Training is seeded, so a SecAgg+ run and a plain run of the same app must end at the
    same global model up to SecAgg's fixed-point error: the secure sum is the plain sum."""
    pytest.importorskip("secure_fl.integrations.flower.provision")
    models = {}
    for protocol in ("secagg+", "plain"):
        defaults = _defaults(tmp_path, protocol=protocol, **{"num-server-rounds": 1, "seed": 7})
        grid = LocalGrid(make_monai_client_app(defaults=defaults), 3)
        out = monai_app.run_server(
            grid, Context(grid.run.run_id, 1, {}, RecordDict(), {}), defaults
        )
        with np.load(out / "model.npz") as model:
            models[protocol] = {k: model[k] for k in model.files}
    start = {k: v.numpy() for k, v in initial_arrays(AppConfig(seed=7)).items()}
    moved = max(float(np.abs(models["plain"][k] - start[k]).max()) for k in start)
    gap = max(float(np.abs(models["plain"][k] - models["secagg+"][k]).max()) for k in start)
    assert moved > 1e-4 and gap < 1e-5


@pytest.mark.slow
def test_run_simulation_of_the_app_changes_the_model(tmp_path: Path) -> None:
    """Flower's simulation runtime (Ray) over 3 SuperNodes, 2 SecAgg+ rounds."""
    pytest.importorskip("secure_fl.integrations.flower.provision")
    from flwr.simulation import run_simulation

    out = tmp_path / "out"
    defaults = _defaults(tmp_path, **{"num-server-rounds": 2, "out-dir": str(out)})
    run_simulation(
        server_app=make_monai_server_app(defaults=defaults),
        client_app=make_monai_client_app(defaults=defaults),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(len(r["survivors"]) == 3 for r in summary["rounds"])
    assert summary["model_change_l2"] > 0
    assert 0.0 <= summary["final"]["val_dice"] <= 1.0
