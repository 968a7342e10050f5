"""DP on Flower: FlowerPrivacy (the workflow's privacy hook) writes a run folder the audit passes.

Unit tests drive the hook directly over fake round outcomes (no Flower messaging); the end-to-end
test runs the Flower workflow on LocalGrid (secure_fl/integrations/flower/grid.py).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from secure_fl.errors import (  # noqa: E402
    BudgetExceededError,
    ConfigError,
    PolicyError,
    ThresholdError,
)
from secure_fl.integrations.flower.privacy import (  # noqa: E402
    FlowerPrivacy,
    PrivacyPlan,
    RoundPrivacy,
    site_policy,
)
from secure_fl.privacy import PrivacyConfig, audit_run  # noqa: E402
from secure_fl.privacy.audit import main as audit_main  # noqa: E402
from secure_fl.privacy.codec_noise import CodecNoiseConfig  # noqa: E402
from secure_fl.privacy.ledger import LEDGER_FILENAME  # noqa: E402
from secure_fl.rounds.base import RoundOutcome  # noqa: E402
from secure_fl.rounds.policy import SitePolicy  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402
from secure_fl.transport.config_common import RosterEntry  # noqa: E402
from secure_fl.transport.privacy_site import CentralClip, SitePrivacy  # noqa: E402

ROSTER = tuple(RosterEntry(name=n, site_id=i) for i, n in enumerate(["a", "b", "c", "d"], 1))
IDS = [1, 2, 3, 4]
WEIGHTS = {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0}
DIM = 3000
CENTRAL = PrivacyConfig(level="site", target_epsilon=8.0, clip=0.5, delta=1e-5)
DISTRIBUTED = PrivacyConfig(
    level="site", trust="distributed", mechanism="discrete_gaussian", target_epsilon=8.0
)


def _privacy(out: Path, config: PrivacyConfig, rounds: int = 3, **kw: Any) -> FlowerPrivacy:
    options: dict[str, Any] = {"roster": ROSTER, "min_sites": 4, "federation": "fed"}
    options.update(kw)
    return FlowerPrivacy(config, out, vector_length=DIM, rounds=rounds, **options)


def _outcome(survivors: list[int], mean: np.ndarray) -> RoundOutcome:
    gone = frozenset(IDS) - frozenset(survivors)
    return RoundOutcome(frozenset(survivors), gone, frozenset(), mean=mean)


def _run(fp: FlowerPrivacy, rounds: range, survivors: list[int] = IDS) -> list[np.ndarray]:
    out = []
    for r in rounds:
        fp.plan(r, IDS, DIM, weights=WEIGHTS)
        mean = np.zeros(DIM)
        out.append(fp.release(r, _outcome(survivors, mean), mean))
    return out


def _audit(out: Path) -> tuple[str, set[str], float]:
    result = audit_run(out)
    codes = {f.code for f in result.findings}
    return result.status, codes, max(result.federation_epsilon.values(), default=0.0)


def test_central_trust_plan_release_and_the_audit_passes(tmp_path: Path) -> None:
    fp = _privacy(tmp_path, CENTRAL)
    assert isinstance(fp, RoundPrivacy)
    plan = fp.plan(1, IDS, DIM)
    assert plan == PrivacyPlan(l2_clip=0.5, distributed_dp_json=CentralClip(0.5).to_json())
    mean = np.full(DIM, 0.25)
    # a site dropped: the noise is sized on the survivors' weights (max 30 of 60)
    noised = fp.release(1, _outcome([1, 2, 3], mean), mean, weights=WEIGHTS)
    std = fp.server.session.nominal * 0.5 * 30.0 / 60.0
    assert float(np.std(noised - mean)) == pytest.approx(std, rel=0.08)
    assert fp.last_record["dp_event"]["noise_source"] == "csprng"
    _run(fp, range(2, 4))
    fp.finish()
    status, codes, eps = _audit(tmp_path)
    assert status == "PASS", codes
    assert eps <= 8.0 + 1e-6
    assert audit_main([str(tmp_path), "--no-report"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["survivors"] == ["a", "b", "c"]


def test_distributed_json_is_what_a_site_with_the_floor_accepts(tmp_path: Path) -> None:
    fp = _privacy(tmp_path, DISTRIBUTED, rounds=2)
    plan = fp.plan(1, IDS, DIM)
    cfg = CodecNoiseConfig.from_json(plan.distributed_dp_json)
    assert plan.l2_clip == DISTRIBUTED.clip and plan.threshold == cfg.threshold
    assert cfg.dimension == DIM and cfg.num_sites == 4
    policy = site_policy(DISTRIBUTED, protocol="secagg+", rounds=2)
    assert policy.require_dp and policy.min_noise_multiplier is not None
    site = SitePrivacy(policy, roster_size=len(ROSTER))
    assert site.check(plan.distributed_dp_json) == cfg
    # a server that halves the noise, or sends the central clip instead, is refused by the site
    weaker = CodecNoiseConfig(**{**cfg.__dict__, "noise_multiplier": cfg.noise_multiplier / 2})
    with pytest.raises(PolicyError, match="floor"):
        site.check(weaker.to_json())
    with pytest.raises(PolicyError, match="central"):
        site.check(CentralClip(1.0).to_json())
    # the sites added the noise: the server releases the mean as it is
    mean = np.linspace(-1, 1, DIM)
    np.testing.assert_array_equal(fp.release(1, _outcome(IDS, mean), mean), mean)
    _run(fp, range(2, 3))
    fp.finish()
    status, codes, eps = _audit(tmp_path)
    assert status == "PASS", codes
    assert eps <= 8.0 + 1e-6


def test_central_trust_adds_no_floor_to_the_site_policy() -> None:
    policy = site_policy(CENTRAL, protocol="secagg+", rounds=3)
    assert not policy.require_dp and policy.min_noise_multiplier is None


@pytest.mark.parametrize("doctor", ["edit", "drop"])
def test_a_doctored_ledger_fails_the_audit(tmp_path: Path, doctor: str) -> None:
    with _privacy(tmp_path, CENTRAL) as fp:
        _run(fp, range(1, 4))
    assert _audit(tmp_path)[0] == "PASS"
    conn = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    with conn:
        if doctor == "edit":  # more noise on one record: less epsilon
            conn.execute("UPDATE records SET noise_multiplier=noise_multiplier*3 WHERE seq=5")
        else:
            conn.execute("DELETE FROM records WHERE seq=5")
    conn.close()
    status, codes, _ = _audit(tmp_path)
    assert status == "FAIL"
    assert "CHAIN_BROKEN" in codes
    assert audit_main([str(tmp_path), "--no-report"]) == 1


def test_a_budget_is_refused_when_exceeded_and_the_stop_audits(tmp_path: Path) -> None:
    # epsilon after 2 rounds 7.08, after 3 rounds 9.01: the third round is refused
    config = PrivacyConfig(level="site", noise_multiplier=1.0, site_budget=8.0)
    fp = _privacy(tmp_path, config, rounds=5)
    _run(fp, range(1, 3))
    with pytest.raises(BudgetExceededError):
        fp.plan(3, IDS, DIM)
    fp.finish()
    assert json.loads((tmp_path / "stopped.json").read_text())["round"] == 3
    status, codes, eps = _audit(tmp_path)
    assert status == "PASS" and "BUDGET_STOP" in codes
    assert eps <= 8.0


def test_bad_calls_are_refused_by_name(tmp_path: Path) -> None:
    fp = _privacy(tmp_path, CENTRAL)
    with pytest.raises(ConfigError, match="round_index"):
        fp.plan(0, IDS, DIM)
    with pytest.raises(ConfigError, match="vector_length"):
        fp.plan(1, IDS, DIM + 1)
    with pytest.raises(ConfigError, match=r"\[9\]"):
        fp.plan(1, [1, 2, 9], DIM)
    mean = np.zeros(DIM)
    with pytest.raises(ConfigError, match="planned last"):
        fp.release(1, _outcome(IDS, mean), mean, weights=WEIGHTS)
    fp.plan(1, [1, 2, 3], DIM)
    with pytest.raises(ConfigError, match="planned last"):
        fp.release(2, _outcome([1, 2, 3], mean), mean, weights=WEIGHTS)
    with pytest.raises(ConfigError, match="weights="):
        fp.release(1, _outcome([1, 2, 3], mean), mean)
    with pytest.raises(ConfigError, match=r"\[4\]"):
        fp.release(1, _outcome(IDS, mean), mean, weights=WEIGHTS)
    with pytest.raises(ConfigError, match="length"):
        fp.release(1, _outcome([1, 2], mean), np.zeros(DIM - 1), weights=WEIGHTS)
    with pytest.raises(ConfigError, match="finite"):
        fp.release(1, _outcome([1, 2], mean), np.full(DIM, np.nan), weights=WEIGHTS)
    fp.release(1, _outcome([1, 2], mean), mean, weights=WEIGHTS)
    with pytest.raises(ConfigError, match="planned last"):
        fp.release(1, _outcome([1, 2], mean), mean, weights=WEIGHTS)
    fp.finish()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"roster": None}, "exactly one"),
        ({"num_sites": 4}, "exactly one"),
        ({"roster": {1: "a", 2: "a"}}, "unique"),
        ({"aggregation": AggregationSpec(protocol="plain")}, "protocol"),
        ({"aggregation": AggregationSpec(protocol="ckks")}, "protocol"),
    ],
)
def test_configurations_it_cannot_serve_are_refused(
    tmp_path: Path, kw: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _privacy(tmp_path, CENTRAL, **kw)


def test_distributed_needs_min_sites_at_the_noise_threshold(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_sites"):
        _privacy(tmp_path, DISTRIBUTED, min_sites=2)


def test_a_new_hook_continues_the_ledger_and_stops_after_rounds(tmp_path: Path) -> None:
    with _privacy(tmp_path, CENTRAL) as fp:
        _run(fp, range(1, 2))
    with pytest.raises(ConfigError, match="another configuration"):
        _privacy(tmp_path, PrivacyConfig(level="site", target_epsilon=4.0, clip=0.5))
    again = _privacy(tmp_path, CENTRAL)
    assert again.completed == 1
    _run(again, range(1, 3))  # a new workflow counts from 1 again: ledger rounds 2 and 3
    assert again.last_record["round"] == 3 and again.last_record["round_index"] == 2
    with pytest.raises(ConfigError, match="rounds=3") as refused:
        again.plan(3, IDS, DIM)
    assert str(tmp_path) in str(refused.value) and "use a new out_dir" in str(refused.value)
    again.finish()
    status, codes, eps = _audit(tmp_path)
    assert status == "PASS", codes
    assert eps <= 8.0 + 1e-6


def test_an_aborted_round_is_retried_under_the_same_intents(tmp_path: Path) -> None:
    fp = _privacy(tmp_path, CENTRAL)
    fp.plan(1, IDS, DIM, weights=WEIGHTS)
    count = fp.server.session._ledger().head().count
    # the round aborted (ThresholdError) after its plan; the workflow goes on with round 2
    fp.plan(2, [1, 2, 3], DIM, weights=WEIGHTS)
    assert fp.server.session._ledger().head().count == count
    mean = np.zeros(DIM)
    with pytest.raises(ConfigError, match="planned last"):
        fp.release(1, _outcome([1, 2, 3], mean), mean)
    fp.release(2, _outcome([1, 2, 3], mean), mean)
    assert fp.last_record["round"] == 1
    _run(fp, range(3, 5))
    fp.finish()
    assert _audit(tmp_path)[0] == "PASS"


# -- end to end: the Flower workflow on LocalGrid with the secure_fl mod --------------------------

E2E_NAMES = ["north", "south", "east", "west"]
E2E_SHAPES = {"w": (4, 5), "b": (5,)}
E2E_DIM = 25
E2E_ROUNDS = 3


class _Train:
    """The user's train function: global + a fixed delta per node (norm ~0.6), weight 10 * (i+1)."""

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        index = int(context.node_config["partition-id"])
        rng = np.random.default_rng(index)
        sent = message.content["arrays"]
        arrays = {
            key: Array(sent[key].numpy() + 0.12 * rng.standard_normal(shape))
            for key, shape in E2E_SHAPES.items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord({"num-examples": 10.0 * (index + 1)}),
            }
        )
        return Message(content, reply_to=message)


def _e2e(
    tmp_path: Path,
    config: PrivacyConfig,
    drop: tuple[int, ...] = (),
    history: list[Any] | None = None,
) -> tuple[FlowerPrivacy, list[Any]]:
    """``rounds`` rounds of SecAgg+ with DP over LocalGrid; the nodes of ``drop`` (partition
    ids) vanish before their masked input every round; the round results go to ``history``
    (also when the run stops with an error)."""
    history = [] if history is None else history
    from flwr.app import Array, ArrayRecord, Context, RecordDict
    from flwr.clientapp import ClientApp

    from secure_fl.integrations.flower.grid import LocalGrid
    from secure_fl.integrations.flower.mod import make_secure_fl_mod
    from secure_fl.integrations.flower.provision import provision_flower
    from secure_fl.integrations.flower.simulate import DropAtInput
    from secure_fl.integrations.flower.workflow import SecureAggregationWorkflow

    spec = AggregationSpec(protocol="secagg+")
    policy = site_policy(
        config, protocol="secagg+", rounds=E2E_ROUNDS, base=SitePolicy(vector_length=E2E_DIM)
    )
    fed = provision_flower(E2E_NAMES, tmp_path / "federation", federation="e2e", policy=policy)
    app = ClientApp(mods=[DropAtInput(drop, "secagg+"), make_secure_fl_mod()])
    app.train()(_Train())
    configs = [str(fed.site_configs[n]) for n in E2E_NAMES]
    grid = LocalGrid(app, 4, node_config=lambda i: {"secure-fl-site": configs[i]})
    privacy = FlowerPrivacy(
        config,
        tmp_path / "run",
        roster=fed.roster,
        vector_length=E2E_DIM,
        rounds=E2E_ROUNDS,
        aggregation=spec,
        min_sites=3,
        federation="e2e",
    )
    workflow = SecureAggregationWorkflow(
        spec, fed.roster, min_sites=3, stage_timeout_s=60.0, privacy=privacy
    )
    initial = ArrayRecord({k: Array(np.zeros(s)) for k, s in E2E_SHAPES.items()})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    try:
        workflow(grid, context, initial_arrays=initial, num_rounds=E2E_ROUNDS)
    finally:
        privacy.finish()
        history.extend(workflow.history)
    return privacy, history


@pytest.mark.parametrize(
    ("config", "drop"),
    [(CENTRAL, ()), (DISTRIBUTED, (3,))],
    ids=["central", "distributed-with-a-dropout"],
)
def test_flower_rounds_with_dp_pass_the_audit(
    tmp_path: Path,
    config: PrivacyConfig,
    drop: tuple[int, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from secure_fl.cli import main as secure_fl_main

    privacy, history = _e2e(tmp_path, config, drop)
    survivors = [n for i, n in enumerate(E2E_NAMES) if i not in drop]
    ids = {i + 1 for i in range(len(E2E_NAMES)) if i not in drop}
    assert [r.outcome.survivors for r in history] == [frozenset(ids)] * E2E_ROUNDS
    assert privacy.completed == E2E_ROUNDS
    assert 0.0 < privacy.epsilon() <= 8.0 + 1e-6
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["survivors"] for r in rows] == [sorted(survivors)] * E2E_ROUNDS
    assert {r["dp_event"]["trust"] for r in rows} == {config.trust}
    capsys.readouterr()
    assert secure_fl_main(["audit", str(tmp_path / "run")]) == 0  # `secure-fl audit RUN`
    out = capsys.readouterr().out
    assert "audit: PASS" in out and "site north: epsilon" in out


def test_a_budget_stop_ends_the_flower_run_and_the_audit_explains_it(tmp_path: Path) -> None:
    # epsilon after 2 rounds 7.08, after 3 rounds 9.01: the third round never starts
    config = PrivacyConfig(level="site", noise_multiplier=1.0, site_budget=8.0)
    history: list[Any] = []
    with pytest.raises(BudgetExceededError):
        _e2e(tmp_path, config, history=history)
    assert len(history) == 2
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["round"] == 3
    status, codes, eps = _audit(tmp_path / "run")
    assert status == "PASS" and "BUDGET_STOP" in codes
    assert eps <= 8.0


def test_too_few_participants_for_the_noise_skip_the_round_not_the_run(tmp_path: Path) -> None:
    fp = _privacy(tmp_path, DISTRIBUTED, rounds=2)
    t = fp.plan(1, IDS, DIM).threshold
    assert t is not None and t > 1
    mean = np.zeros(DIM)
    fp.release(1, _outcome(IDS, mean), mean)
    with pytest.raises(ThresholdError, match="noise threshold"):
        fp.plan(2, IDS[: t - 1], DIM)  # a ThresholdError: the workflow skips the round
    _run(fp, range(2, 3))  # the next round with every site runs and is ledgered as round 2
    fp.finish()
    status, codes, _ = _audit(tmp_path)
    assert status == "PASS", codes
    assert fp.completed == 2
