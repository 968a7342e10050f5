"""Federated DP-SGD under secure aggregation (secure_fl.training.fed_dpsgd): the noise, its
source, the configuration, the ledger and the audit of a real tiny run."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from training_helpers import tiny_config

from secure_fl.data import PreprocessConfig
from secure_fl.data.datalist import load_datalist, split_by_site
from secure_fl.errors import ConfigError
from secure_fl.privacy import PrivacyConfig, PrivacyLedger, audit_run
from secure_fl.training import AggregationConfig, TrainConfig, fed_dpsgd, run_experiment
from secure_fl.training.fed_dpsgd import (
    clipped_gradient_sum,
    nominal_for_effective,
    poisson_sample,
    pooled_sample_rate,
    secure_noisy_sum,
)

PRE = PreprocessConfig(grid=(24, 24, 24), patch=(16, 16, 16), samples_per_volume=1)


def _sums(n: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"s{i}": rng.normal(size=dim) * 0.01 for i in range(n)}


def test_the_aggregated_gradient_carries_the_expected_noise() -> None:
    sums, z, clip = _sums(4, 6000), 1.5, 0.5
    total, report = secure_noisy_sum(
        sums,
        aggregator="secagg+",
        aggregator_options={"threshold": 3},
        clip=clip,
        noise_multiplier=z,
        bound=3 * clip,
    )
    noise = total - sum(sums.values())
    # 4 shares, each sized so that 3 honest ones carry std z * clip
    expected = z * clip * math.sqrt(4 / 3)
    assert float(np.std(noise)) == pytest.approx(expected, rel=0.05)
    assert abs(float(np.mean(noise))) < 4 * expected / math.sqrt(noise.size)
    event = report["dp_event"]
    assert event["honest_survivors"] == 3 and event["survivors"] == 4
    assert 0.95 * z < event["noise_multiplier"] <= z  # the effective one: a lower bound
    # without noise the round returns the sum up to the codec's resolution (the coarsest whose
    # patient-level scaled clip passes the rounding bound: here 2**-16 per weighted unit)
    exact, _ = secure_noisy_sum(
        sums,
        aggregator="secagg",
        aggregator_options={"threshold": 3},
        clip=clip,
        noise_multiplier=0.0,
        bound=3 * clip,
    )
    assert np.max(np.abs(exact - sum(sums.values()))) < 4 * 4 * 2.0**-16


def test_the_noise_comes_from_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    sums = _sums(3, 2000)
    kwargs = {
        "aggregator": "secagg",
        "aggregator_options": {"threshold": 2},
        "clip": 1.0,
        "noise_multiplier": 1.0,
        "bound": 2.0,
    }
    fresh = [secure_noisy_sum(sums, **kwargs)[0] for _ in range(2)]  # type: ignore[arg-type]
    assert not np.allclose(fresh[0], fresh[1])  # fresh noise each round

    def pinned(label: str) -> np.ndarray:
        counter = itertools.count()

        def fake(n: int) -> bytes:  # a distinct, reproducible stream for every call
            return hashlib.shake_256(f"{label}/{next(counter)}".encode()).digest(n)

        monkeypatch.setattr(os, "urandom", fake)
        out: np.ndarray = secure_noisy_sum(sums, **kwargs)[0]  # type: ignore[arg-type]
        return out

    # with os.urandom pinned, the noise is pinned: it is drawn from os.urandom and nothing else
    np.testing.assert_array_equal(pinned("a"), pinned("a"))
    assert not np.allclose(pinned("a"), pinned("b"))


def test_the_sum_bound_and_aggregator_are_enforced() -> None:
    sums = {"a": np.full(10, 1.0), "b": np.zeros(10)}
    with pytest.raises(ConfigError, match="bound"):
        secure_noisy_sum(
            sums, aggregator="secagg", aggregator_options={}, clip=1, noise_multiplier=1, bound=2
        )
    with pytest.raises(ConfigError, match="secagg"):
        secure_noisy_sum(
            sums, aggregator="plain", aggregator_options={}, clip=1, noise_multiplier=1, bound=9
        )


def test_poisson_sampling_and_rates() -> None:
    assert pooled_sample_rate(2, 8) == 0.25 and pooled_sample_rate(9, 8) == 1.0
    draws = iter([0.1, 0.9, 0.2, 0.5])
    assert poisson_sample(4, 0.3, rng=lambda: next(draws)) == [0, 2]
    assert poisson_sample(5, 1.0) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        poisson_sample(3, 0.0)
    assert nominal_for_effective(2.0, lambda z: 0.9 * z) == pytest.approx(2.0 / 0.9, rel=1e-8)


def test_per_case_gradients_are_clipped() -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Linear(3, 1)
    data = [{"image": torch.full((3,), float(i + 1)), "label": torch.zeros(1)} for i in range(3)]

    def loss_fn(out: object, target: object) -> object:
        return ((out - target) ** 2).sum()  # type: ignore[operator]

    sums, clipped, _ = clipped_gradient_sum(net, data, [0, 1, 2], loss_fn=loss_fn, clip=0.01)
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in sums.values()))
    assert clipped == 3 and norm <= 3 * 0.01 + 1e-9


def test_the_combination_is_checked(tiny_datalist: Path) -> None:
    sample = PrivacyConfig(
        level="sample", trust="distributed", mechanism="discrete_gaussian", noise_multiplier=1.0
    )
    with pytest.raises(ConfigError, match="secagg"):
        tiny_config(tiny_datalist, preprocess=PRE, privacy=sample)  # plain aggregation
    with pytest.raises(ConfigError, match="local_epochs"):
        tiny_config(
            tiny_datalist,
            preprocess=PRE,
            privacy=sample,
            aggregation=AggregationConfig(name="secagg"),
            train=TrainConfig(lr=0.1, local_epochs=2, batch_size=2, device="cpu"),
        )


def _fed_config(datalist: Path, **privacy: object) -> object:
    privacy = privacy or {"target_epsilon": 8.0}
    return tiny_config(
        datalist,
        rounds=2,
        preprocess=PRE,
        aggregation=AggregationConfig(name="secagg", options={"threshold": 2}),
        train=TrainConfig(lr=0.1, local_epochs=1, batch_size=3, device="cpu"),
        privacy=PrivacyConfig(
            level="sample",
            trust="distributed",
            mechanism="discrete_gaussian",
            clip=1.0,
            delta=1e-3,
            **privacy,  # type: ignore[arg-type]
        ),
    )


@pytest.mark.slow
def test_a_real_federated_dp_sgd_run_is_ledgered_and_audits_clean(
    tiny_datalist: Path, tmp_path: Path
) -> None:
    run_experiment(_fed_config(tiny_datalist), tmp_path / "run", log=lambda _: None)  # type: ignore[arg-type]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["privacy"]["max_epsilon"] <= 8.0 + 1e-6
    with PrivacyLedger(tmp_path / "run" / "privacy_ledger.sqlite") as ledger:
        records = ledger.entries()
    # 3 sites x 2 rounds, each: one pooled rate batch 3 / N pooled training cases, one step,
    # confirmed (the audit re-derives N from the datalist independently)
    assert len(records) == 6 and all(r.confirmed for r in records)
    (rate,) = {r.entry.sample_rate for r in records}
    splits = split_by_site(load_datalist(tiny_datalist), val_fraction=0.34, seed=3)
    pooled = sum(len(train) for train, _ in splits.values())
    assert rate == pytest.approx(3 / pooled) and pooled > 3
    assert {r.entry.steps for r in records} == {1}
    assert {r.entry.params["mode"] for r in records} == {"federated DP-SGD"}
    result = audit_run(tmp_path / "run")
    assert result.findings == [], [f.message for f in result.findings]
    assert result.status == "PASS"


@pytest.mark.slow
def test_a_planted_under_noise_is_caught_by_the_audit(
    tiny_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fed_dpsgd.nominal_for_effective
    # the bug: the nominal noise (and so the ledger's effective multiplier) halved
    monkeypatch.setattr(fed_dpsgd, "nominal_for_effective", lambda t, f: real(t, f) / 2)
    config = _fed_config(tiny_datalist, noise_multiplier=2.0)  # a fixed multiplier: no budget
    run_experiment(config, tmp_path / "run", log=lambda _: None)  # type: ignore[arg-type]
    with PrivacyLedger(tmp_path / "run" / "privacy_ledger.sqlite") as ledger:
        assert {round(r.entry.noise_multiplier, 3) for r in ledger.entries()} == {1.0}
    result = audit_run(tmp_path / "run")
    codes = {f.code for f in result.findings}
    assert "NOISE_BELOW_CONFIG" in codes, codes
    assert result.status != "PASS"


def test_a_named_seed_is_reproducible_and_varies_with_the_round_part() -> None:
    sums = _sums(2, 500)
    kwargs = {"aggregator": "secagg", "clip": 1.0, "noise_multiplier": 1.0, "bound": 2.0}
    a, _ = secure_noisy_sum(sums, aggregator_options={}, seed=(7 << 32) + 0, **kwargs)  # type: ignore[arg-type]
    b, _ = secure_noisy_sum(sums, aggregator_options={}, seed=(7 << 32) + 1, **kwargs)  # type: ignore[arg-type]
    c, _ = secure_noisy_sum(sums, aggregator_options={}, seed=(7 << 32) + 0, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a, c)
    assert not np.allclose(a, b)
