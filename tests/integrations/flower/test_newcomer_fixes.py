"""What a Flower newcomer's first hour needed: the server's roster from a provisioned folder
(``load_roster``), reruns of the MONAI app on the same sites (a fresh initial model per run),
the num-sites hint, and what the site operator sees when the user's train function fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from secure_fl.errors import ConfigError  # noqa: E402
from secure_fl.integrations.flower import monai_app  # noqa: E402
from secure_fl.integrations.flower.app_config import AppConfig, initial_model_seed  # noqa: E402
from secure_fl.integrations.flower.grid import LocalGrid  # noqa: E402
from secure_fl.integrations.flower.provision import load_roster, provision_flower  # noqa: E402

# -- load_roster ------------------------------------------------------------------------------


def test_load_roster_reads_what_provision_flower_wrote(tmp_path: Path) -> None:
    fed = provision_flower(["site-A", "site-B", "site-C"], tmp_path / "prov", federation="h")
    roster = load_roster(tmp_path / "prov" / "roster.json")
    assert roster == fed.roster
    assert all(e.verify_key is not None and len(e.verify_key) == 32 for e in roster)
    from secure_fl.integrations.flower import load_roster as lazy

    assert lazy is load_roster


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("not json", "not valid JSON"),
        ('{"federation": "h"}', "roster must be a list"),
        ('{"federation": "h", "roster": [], "extra": 1}', "unknown keys"),
        (
            '{"federation": "h", "roster": [{"name": "a", "site_id": 1},'
            ' {"name": "b", "site_id": 2}]}',
            "no verify_key",
        ),
        (
            '{"federation": "h", "roster": [{"name": "a", "site_id": 1, "verify_key": "'
            + "00" * 32
            + '"}]}',
            "at least 2 sites",
        ),
    ],
)
def test_load_roster_refuses_a_bad_file_naming_it(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "roster.json"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as refused:
        load_roster(path)
    assert str(path) in str(refused.value)


def test_load_roster_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.json"):
        load_roster(tmp_path / "nowhere.json")


# -- the MONAI app: a fresh initial model per run unless seed is given -------------------------


def test_initial_model_seed_is_the_run_seed_or_fresh_per_run() -> None:
    assert initial_model_seed(AppConfig(seed=42)) == 42
    fresh = {initial_model_seed(AppConfig()) for _ in range(8)}
    assert len(fresh) == 8 and all(1 <= s < 2**32 for s in fresh)


def _runs(work: Path, times: int, nodes: int = 3, **extra: Any) -> list[dict[str, Any]]:
    """``times`` runs of the app (1 round each) on the same work folder and the same nodes."""
    defaults = {"work-dir": str(work), "num-server-rounds": 1, **extra}
    grid = LocalGrid(monai_app.make_monai_client_app(defaults=defaults), nodes)
    summaries = []
    for i in range(times):
        context = Context(grid.run.run_id, 1, {}, RecordDict(), {})
        out = monai_app.run_server(grid, context, {**defaults, "out-dir": str(work / f"o{i}")})
        summaries.append(json.loads((out / "metrics.json").read_text()))
    return summaries


def test_a_rerun_on_the_same_sites_trains_again_unless_the_seed_is_pinned(
    tmp_path: Path,
) -> None:
    """Sites refuse a model they already trained on: with seed unset every run starts from a
    new model (recorded in metrics.json); a pinned seed reproduces the model, so a rerun on the
    same provisioned sites aborts (what the README documents)."""
    runs = _runs(tmp_path / "fresh", 2)
    for summary in runs:
        assert summary["seed"] == 0 and 1 <= summary["initial_model_seed"] < 2**32
        assert sorted(summary["rounds"][0]["survivors"]) == [1, 2, 3]
    assert runs[0]["initial_model_seed"] != runs[1]["initial_model_seed"]
    pinned = _runs(tmp_path / "pinned", 2, seed=5)
    assert pinned[0]["initial_model_seed"] == 5 and "survivors" in pinned[0]["rounds"][0]
    assert "aborted" in pinned[1]["rounds"][0]


def test_a_wrong_node_count_says_how_to_set_num_supernodes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='--federation-config "num-supernodes=3"'):
        _runs(tmp_path, 1, nodes=2)


# -- what the site operator sees (mod.py, node.py) ---------------------------------------------


def _raising_node(tmp_path: Path, node_config: dict[str, Any]) -> Any:
    """A provisioned node whose train function raises with a value in its message."""
    from site_helpers import Node

    fed = provision_flower(["site-A", "site-B"], tmp_path / "prov")
    node = Node(1, 101, fed.site_configs["site-A"], {}, num_examples=1)
    node.context.node_config.update(node_config)

    def train(msg: Any, context: Any) -> Any:
        raise RuntimeError("secret-value-4242 in the user's traceback")

    node.train = train  # type: ignore[method-assign]
    return node


def _train_round(node: Any) -> Any:
    import numpy as np
    from site_helpers import arrays_of

    from secure_fl.integrations.flower import records
    from secure_fl.integrations.flower.records import Envelope

    content = RecordDict({records.KEY: records.to_record(Envelope("train", 77))})
    content["arrays"] = arrays_of({"w": np.zeros(3, np.float32)})
    return node.call(content)


@pytest.mark.parametrize(("debug", "level"), [(True, "WARNING"), (False, "DEBUG")])
def test_a_train_function_exception_is_logged_on_the_node_never_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, debug: bool, level: str
) -> None:
    from secure_fl.integrations.flower import records

    node = _raising_node(tmp_path, {"secure-fl-debug": True} if debug else {})
    with caplog.at_level("DEBUG", logger="secure_fl.integrations.flower"):
        reply = _train_round(node)
    env = records.read(reply.content)
    assert env is not None and env.left == "InvalidUpdateError: the train function failed"
    assert "secret-value-4242" not in repr(reply.content)
    (logged,) = [r for r in caplog.records if "the train function raised" in r.getMessage()]
    assert logged.levelname == level and logged.exc_info is not None
    assert "secret-value-4242" in caplog.text  # the traceback, on the node only


def test_secure_fl_debug_in_the_run_config_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _raising_node(tmp_path, {})
    node.context.run_config["secure-fl-debug"] = True  # the server's: ignored
    with caplog.at_level("DEBUG", logger="secure_fl.integrations.flower"):
        _train_round(node)
    (logged,) = [r for r in caplog.records if "the train function raised" in r.getMessage()]
    assert logged.levelname == "DEBUG"


def test_trained_keys_that_differ_are_named_on_the_node_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import numpy as np

    from secure_fl.integrations.flower import records

    node = _raising_node(tmp_path, {})
    del node.train  # back to the helper's train function, which returns node.trained
    node.trained = {"v": np.ones(3, np.float32)}
    with caplog.at_level("WARNING", logger="secure_fl.integrations.flower"):
        env = records.read(_train_round(node).content)
    # (C5) a zero update is sealed and the reply is that of a good train; the operator sees why
    assert env is not None and env.left is None and env.weight == 1
    assert "sent=['w'] got=['v']" in caplog.text and "zero update" in caplog.text


def test_a_node_without_its_site_json_is_told_what_it_has_and_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flwr.app import Message

    from secure_fl.integrations.flower import records
    from secure_fl.integrations.flower.mod import secure_fl_mod
    from secure_fl.integrations.flower.node import site_from_node_config
    from secure_fl.integrations.flower.records import Envelope

    with pytest.raises(ConfigError) as refused:
        site_from_node_config({"partition-id": 0, "num-partitions": 3})
    text = str(refused.value)
    assert "['num-partitions', 'partition-id']" in text
    assert "make_secure_fl_mod(site_fn)" in text
    from site_helpers import instruction

    context = Context(1, 5, {"partition-id": 0}, RecordDict(), {})
    content = RecordDict({records.KEY: records.to_record(Envelope("train", 9))})

    def train(msg: Message, ctx: Context) -> Message:
        raise AssertionError("never called")

    with caplog.at_level("WARNING", logger="secure_fl.integrations.flower"):
        secure_fl_mod(instruction(content, 5), context, train)
    assert "secure_fl node (no site) leaves round 9" in caplog.text
    assert "site None" not in caplog.text
