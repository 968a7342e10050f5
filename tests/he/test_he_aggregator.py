"""CKKSAggregator: encrypted mean against the plaintext mean, dropouts, report, key handling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl import aggregators
from secure_fl.aggregators.ckks import CKKSAggregator
from secure_fl.errors import ConfigError, InvalidUpdateError, ThresholdError
from secure_fl.he import SecretContext, provision

REPORT_KEYS = {
    "aggregator",
    "included",
    "dropped",
    "clipped",
    "bytes_sent",
    "seconds",
    "site_seconds",
    "server_seconds",
    "decrypt_seconds",
    "expansion",
    "preset",
    "max_error",
    "max_rel_error",
    "server_bytes_sent",
    "ciphertexts",
    "fingerprint",
}


@pytest.fixture(scope="module")
def agg() -> CKKSAggregator:
    return CKKSAggregator()


def _updates(n: int, sizes: tuple[int, ...], seed: int = 0, scale: float = 0.01) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"site-{i}": [(scale * rng.standard_normal(s)).astype(np.float32) for s in sizes]
        for i in range(n)
    }


def _plain_mean(updates: dict, weights: dict, survivors: list[str]) -> np.ndarray:
    total = sum(weights[s] for s in survivors)
    flat = {
        s: np.concatenate([a.astype(np.float64).ravel() for a in updates[s]]) for s in survivors
    }
    return sum(weights[s] * flat[s] for s in survivors) / total


@pytest.mark.parametrize(
    "sizes",
    [(1,), (4096,), (4095, 2), (3, 4096, 4097), (200, 30_000, 10), (300_000,)],
)
@pytest.mark.parametrize("drop", [False, True])
def test_encrypted_mean_matches_plain_mean(agg: CKKSAggregator, sizes: tuple, drop: bool) -> None:
    updates = _updates(5, sizes, seed=sum(sizes))
    weights = {s: float(10 * (i + 1) ** 2) for i, s in enumerate(updates)}
    dropped = ["site-4", "site-1"] if drop else []
    survivors = [s for s in updates if s not in dropped]
    result = agg.aggregate(updates, weights, dropped=dropped)
    report = result.report
    want = _plain_mean(updates, weights, survivors)
    got64 = np.concatenate([a.astype(np.float64).ravel() for a in result.mean])
    assert report["max_rel_error"] < 1e-6
    assert report["max_error"] == pytest.approx(report["max_error"])  # a number, not NaN
    # the returned float32 arrays: within the measured error plus float32 rounding
    tol = report["max_error"] + 2.0**-24 * np.abs(want)
    assert np.all(np.abs(got64 - want) <= tol + 1e-30)
    assert np.max(np.abs(got64 - want)) / np.max(np.abs(want)) < 1e-6
    for got, shape in zip(result.mean, sizes, strict=True):
        assert got.dtype == np.float32 and got.shape == (shape,)
    assert report["included"] == survivors
    assert report["dropped"] == sorted(dropped)


@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1.0, 50.0])
def test_relative_error_below_1e_6_across_magnitudes(agg: CKKSAggregator, scale: float) -> None:
    updates = _updates(10, (50_000,), seed=int(scale * 1000), scale=scale)
    weights = {s: float(i + 1) for i, s in enumerate(updates)}
    result = agg.aggregate(updates, weights, dropped=["site-0", "site-9"])
    assert result.report["max_rel_error"] < 1e-6
    want = _plain_mean(updates, weights, [f"site-{i}" for i in range(1, 9)])
    got = result.mean[0].astype(np.float64)
    assert np.max(np.abs(got - want)) <= result.report["max_error"] + 2.0**-24 * np.max(
        np.abs(want)
    )


def test_report_has_the_masking_aggregators_keys_and_costs(agg: CKKSAggregator) -> None:
    updates = _updates(4, (20_000, 5))
    result = agg.aggregate(updates, dropped=["site-2"])
    report = result.report
    assert set(report) >= REPORT_KEYS
    assert report["aggregator"] == "ckks"
    assert report["clipped"] == dict.fromkeys(updates, 0)
    assert report["bytes_sent"]["site-2"] == 0
    live = [s for s in updates if s != "site-2"]
    assert all(report["bytes_sent"][s] > 0 for s in live)
    assert report["ciphertexts"] == math.ceil(20_005 / 4096)
    # every ciphertext costs the same; 5 ciphertexts at ~118 kB each
    per_ct = report["bytes_sent"]["site-0"] / report["ciphertexts"]
    assert 100_000 < per_ct < 135_000
    assert report["expansion"] == pytest.approx(
        np.mean([report["bytes_sent"][s] for s in live]) / (4 * 20_005)
    )
    assert report["preset"] == "n8192-add" and report["fingerprint"] == agg.fingerprint
    assert report["peak_pending_chunks"] == 1
    assert report["seconds"] >= report["server_seconds"] > 0
    assert all(report["site_seconds"][s] > 0 for s in live)


def test_full_ciphertexts_reach_the_expansion_target(agg: CKKSAggregator) -> None:
    """A model filling whole ciphertexts (every slot used): under 8 bytes per float32 value."""
    updates = _updates(2, (4096 * 40,))
    report = agg.aggregate(updates).report
    assert report["expansion"] < 8.0


def test_streaming_keeps_one_chunk_in_flight() -> None:
    agg = CKKSAggregator(chunk_ciphertexts=2)
    updates = _updates(3, (4096 * 7 + 5,))
    result = agg.aggregate(updates, {"site-0": 1.0, "site-1": 2.0, "site-2": 3.0})
    assert result.report["chunks"] == 4 and result.report["peak_pending_chunks"] == 1
    assert result.report["max_rel_error"] < 1e-6


def test_torch_state_dict_in_torch_state_dict_out(agg: CKKSAggregator) -> None:
    gen = torch.Generator().manual_seed(0)
    updates = {
        f"h{i}": {
            "conv.weight": 0.01 * torch.randn(8, 4, 3, 3, 3, generator=gen),
            "conv.bias": 0.01 * torch.randn(8, generator=gen),
        }
        for i in range(3)
    }
    result = agg.aggregate(updates, {"h0": 1, "h1": 2, "h2": 3})
    want = (
        sum(w * updates[s]["conv.weight"].double() for s, w in zip(updates, (1, 2, 3), strict=True))
        / 6
    )
    assert isinstance(result.mean["conv.weight"], torch.Tensor)
    assert result.mean["conv.weight"].dtype == torch.float32
    torch.testing.assert_close(result.mean["conv.weight"].double(), want, rtol=0, atol=1e-7)


def test_rounds_reuse_the_keys_and_count(agg: CKKSAggregator) -> None:
    updates = _updates(2, (10,))
    first = agg.aggregate(updates).report["round"]
    second = agg.aggregate(updates).report["round"]
    assert second == first + 1


def test_out_of_range_and_non_finite_updates_are_refused(agg: CKKSAggregator) -> None:
    updates = _updates(3, (100,))
    updates["site-1"][0][7] = 600.0  # beyond max_abs = 512
    with pytest.raises(InvalidUpdateError, match=r"site 'site-1'.*above the bound 512"):
        agg.aggregate(updates)
    # the same site dropped: its update is never encrypted, so the round goes ahead
    assert agg.aggregate(updates, dropped=["site-1"]).report["included"] == ["site-0", "site-2"]
    updates["site-1"][0][7] = np.nan
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        agg.aggregate(updates)


def test_l2_clip_is_applied_and_reported() -> None:
    agg = CKKSAggregator(l2_clip=0.5)
    updates = {"a": [np.full(100, 1.0, np.float32)], "b": [np.full(100, 0.001, np.float32)]}
    result = agg.aggregate(updates)
    assert result.report["clipped_updates"] == ["a"]
    np.testing.assert_allclose(result.mean[0], (0.05 + 0.001) / 2, rtol=1e-6)


def test_server_holding_a_secret_context_is_refused(tmp_path: Path) -> None:
    secret = SecretContext.generate()
    with pytest.raises(ConfigError, match="could read every site's update"):
        CKKSAggregator(secret=secret, public=secret)  # type: ignore[arg-type]
    path = secret.save(tmp_path / "secret.ctx")
    with pytest.raises(ConfigError, match="could read every site's update"):
        CKKSAggregator(secret=secret, public=path)


def test_mismatched_contexts_are_refused() -> None:
    a = SecretContext.generate()
    b = SecretContext.generate()
    with pytest.raises(ConfigError, match="mixed keys"):
        CKKSAggregator(secret=a, public=b.public())
    with pytest.raises(ConfigError, match="not the federation's"):
        CKKSAggregator(secret=a, fingerprint=b.fingerprint)
    with pytest.raises(ConfigError, match="differs"):
        CKKSAggregator(secret=a, preset="n16384-add")
    c = SecretContext.generate("n16384-add")
    with pytest.raises(ConfigError, match="mixed keys"):
        CKKSAggregator(secret=a, public=c.public())


def test_provisioned_files_drive_the_aggregator(tmp_path: Path) -> None:
    done = provision(tmp_path, "n16384-add")
    agg = CKKSAggregator(
        secret=done.secret_path, public=str(done.public_path), fingerprint=done.fingerprint
    )
    assert agg.preset.name == "n16384-add"
    updates = _updates(3, (9000,))
    result = agg.aggregate(updates)
    assert result.report["ciphertexts"] == 2  # 8192 values per ciphertext
    assert result.report["max_rel_error"] < 1e-6


@pytest.mark.parametrize(
    "options",
    [
        {"chunk_ciphertexts": 0},
        {"chunk_ciphertexts": 1.5},
        {"l2_clip": -1.0},
        {"l2_clip": float("nan")},
        {"preset": "n2048"},
        {"secret": 42},
        {"public": 42},
        {"measure_error": 1},
        {"fingerprint": 5},
    ],
)
def test_invalid_options_are_config_errors(options: dict) -> None:
    with pytest.raises(ConfigError):
        CKKSAggregator(**options)


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        CKKSAggregator("n8192-add")  # type: ignore[misc]


def test_aggregator_refuses_pickle_and_hides_the_key(agg: CKKSAggregator) -> None:
    import pickle

    with pytest.raises(TypeError, match="secret key"):
        pickle.dumps(agg)
    assert repr(agg) == f"CKKSAggregator(preset='n8192-add', fingerprint={agg.fingerprint[:16]})"


def test_measure_error_off_reports_nan() -> None:
    result = CKKSAggregator(measure_error=False).aggregate(_updates(2, (10,)))
    assert math.isnan(result.report["max_error"]) and math.isnan(result.report["max_rel_error"])


@pytest.mark.skipif("ckks" not in aggregators.NAMES, reason="create('ckks') not registered yet")
def test_create_returns_the_ckks_aggregator() -> None:
    agg = aggregators.create("ckks", chunk_ciphertexts=8)
    assert isinstance(agg, CKKSAggregator) and agg.name == "ckks"
    with pytest.raises(ConfigError):
        aggregators.create("ckks", no_such_option=1)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=6),
    size=st.integers(min_value=1, max_value=9000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    drops=st.integers(min_value=0, max_value=2),
)
def test_encrypted_mean_property(
    agg: CKKSAggregator, n: int, size: int, seed: int, drops: int
) -> None:
    rng = np.random.default_rng(seed)
    updates = _updates(n, (size,), seed=seed, scale=float(10 ** rng.uniform(-3, 1.5)))
    weights = {s: float(rng.integers(1, 10_000)) for s in updates}
    dropped = list(updates)[: min(drops, n - 2)]
    result = agg.aggregate(updates, weights, dropped=dropped)
    survivors = [s for s in updates if s not in dropped]
    want = _plain_mean(updates, weights, survivors)
    got = result.mean[0].astype(np.float64)
    assert result.report["max_rel_error"] < 1e-6
    assert np.max(np.abs(got - want)) <= result.report["max_error"] + 2.0**-24 * np.max(
        np.abs(want)
    )


def test_empty_update_needs_no_ciphertext(agg: CKKSAggregator) -> None:
    updates = {"a": [np.zeros((0, 3), np.float32)], "b": [np.zeros((0, 3), np.float32)]}
    result = agg.aggregate(updates)
    assert result.mean[0].shape == (0, 3)
    assert result.report["ciphertexts"] == 0 and result.report["bytes_sent"] == {"a": 0, "b": 0}
    assert result.report["expansion"] == 0.0 and result.report["max_error"] == 0.0


def test_one_contributor_is_refused_and_two_sites_work(agg: CKKSAggregator) -> None:
    """The mean of one site is its update, which every site would decrypt: refused with a clear
    error, as the gRPC path refuses a round of fewer than two uploads. Two sites work."""
    updates = _updates(3, (500,), seed=3)
    with pytest.raises(ThresholdError, match="at least 2 contributing sites"):
        agg.aggregate({"site-0": updates["site-0"]})
    with pytest.raises(ThresholdError, match="at least 2"):
        agg.aggregate(updates, dropped=["site-0", "site-1"])
    weights = {"site-0": 3.0, "site-1": 1.0, "site-2": 5.0}
    result = agg.aggregate(updates, weights, dropped=["site-2"])
    want = _plain_mean(updates, weights, ["site-0", "site-1"])
    assert result.report["included"] == ["site-0", "site-1"]
    assert np.max(np.abs(result.mean[0].astype(np.float64) - want)) < 1e-6 * np.max(np.abs(want))


def test_every_ckks_mean_refuses_one_contributor_and_skips_an_empty_vector() -> None:
    """The one rule and the one empty-vector path (he.decrypt.require_two_contributors,
    RoundStats.empty), as the in-process recipe and encrypted_mean apply them."""
    from secure_fl.he import encrypted_mean
    from secure_fl.he.decrypt import RoundStats, require_two_contributors
    from secure_fl.rounds.ckks_local import run_ckks_local

    secret = SecretContext.generate()
    public = secret.public()
    one = {"a": np.ones(10)}
    for count in (0, 1):
        with pytest.raises(ThresholdError, match="at least 2 contributing sites"):
            require_two_contributors(count)
    require_two_contributors(2)
    with pytest.raises(ThresholdError, match="at least 2"):
        run_ckks_local(secret, public, one, {"a": 1.0, "b": 1.0}, ["a"])
    with pytest.raises(ThresholdError, match="at least 2"):
        encrypted_mean(secret, public, one, {"a": 1.0, "b": 1.0}, ["a"])
    empty = {"a": np.zeros(0), "b": np.zeros(0)}
    for reference in (True, False):
        mean, stats, clipped = run_ckks_local(
            secret, public, empty, {"a": 1.0, "b": 2.0}, ["a", "b"], reference=reference
        )
        assert mean.shape == (0,) and clipped == []
        assert stats.ciphertexts == 0 and stats.bytes_sent == {"a": 0, "b": 0}
        if reference:  # (NaN != NaN: the other case is compared field by field)
            assert stats == RoundStats.empty(["a", "b"], reference=True)
            assert stats.max_error == 0.0
        else:
            assert math.isnan(stats.max_error) and math.isnan(stats.max_rel_error)
    mean, stats = encrypted_mean(secret, public, empty, {"a": 1.0, "b": 2.0}, ["a", "b"])
    assert mean.shape == (0,) and stats.chunks == 0 and stats.max_rel_error == 0.0
