"""The public aggregator API: create(name, **options).aggregate(updates, weights, dropped=...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl import aggregators
from secure_fl.errors import ConfigError, InvalidUpdateError, SecureFLError, ThresholdError


def _updates(n: int, seed: int = 0, scale: float = 0.1) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        f"site-{i}": [
            (scale * rng.standard_normal((4, 3))).astype(np.float32),
            (scale * rng.standard_normal(5)).astype(np.float32),
        ]
        for i in range(n)
    }


def _plain_mean(updates, weights, survivors):
    total = sum(weights[s] for s in survivors)
    return [
        sum(weights[s] * updates[s][j].astype(np.float64) for s in survivors) / total
        for j in range(2)
    ]


@pytest.mark.parametrize("name", ["secagg", "secagg+"])
def test_secure_mean_matches_plain_mean_within_the_bound(name: str) -> None:
    updates = _updates(8, seed=1)
    weights = {s: float(i + 1) * 10 for i, s in enumerate(updates)}
    result = aggregators.create(name, seed=3).aggregate(updates, weights, dropped=["site-2"])
    expected = _plain_mean(updates, weights, [s for s in updates if s != "site-2"])
    report = result.report
    assert report["included"] == [s for s in updates if s != "site-2"]
    assert report["dropped"] == ["site-2"]
    assert set(report["clipped"]) == set(updates) and report["clipped_total"] == 0
    assert all(b > 0 for b in report["bytes_sent"].values())
    assert report["max_error"] < 1e-5
    for got, want in zip(result.mean, expected, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=report["max_error"] + 1e-7, rtol=0)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(min_value=3, max_value=9),
    drop=st.integers(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=10**6),
    name=st.sampled_from(["secagg", "secagg+"]),
)
def test_secure_mean_property(n: int, drop: int, seed: int, name: str) -> None:
    updates = _updates(n, seed=seed)
    rng = np.random.default_rng(seed)
    weights = {s: float(rng.integers(1, 1000)) for s in updates}
    dropped = ["site-0"] if drop else []
    result = aggregators.create(name, seed=seed).aggregate(updates, weights, dropped=dropped)
    expected = _plain_mean(updates, weights, [s for s in updates if s not in dropped])
    for got, want in zip(result.mean, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=result.report["max_error"] + 1e-7, rtol=0)


def test_plain_aggregator_is_the_exact_weighted_mean() -> None:
    updates = _updates(4)
    weights = {"site-0": 1.0, "site-1": 2.0, "site-2": 3.0, "site-3": 4.0}
    result = aggregators.create("plain").aggregate(updates, weights, dropped=["site-3"])
    expected = _plain_mean(updates, weights, ["site-0", "site-1", "site-2"])
    for got, want in zip(result.mean, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert result.report["included"] == ["site-0", "site-1", "site-2"]


def test_torch_state_dict_in_torch_state_dict_out() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = {
        f"s{i}": {
            "conv.weight": 0.1 * torch.randn(2, 1, 3, 3, 3, generator=gen),
            "conv.bias": 0.1 * torch.randn(2, generator=gen),
        }
        for i in range(4)
    }
    result = aggregators.create("secagg+", seed=0).aggregate(updates)
    assert set(result.mean) == {"conv.weight", "conv.bias"}
    assert isinstance(result.mean["conv.weight"], torch.Tensor)
    want = torch.stack([u["conv.weight"] for u in updates.values()]).mean(0)
    assert torch.allclose(result.mean["conv.weight"], want, atol=1e-5)


def test_values_outside_the_clip_range_are_clipped_and_counted() -> None:
    updates = _updates(4, scale=0.01)
    updates["site-1"][0][0, 0] = 50.0
    updates["site-1"][1][:2] = -70.0
    result = aggregators.create("secagg", clip_range=10.0, seed=1).aggregate(updates)
    assert result.report["clipped"]["site-1"] == 3
    assert result.report["clipped_total"] == 3
    assert (
        abs(
            float(result.mean[0][0, 0])
            - (10.0 + sum(float(updates[s][0][0, 0]) for s in ("site-0", "site-2", "site-3"))) / 4
        )
        < 1e-5
    )


def test_l2_clipping_is_reported() -> None:
    updates = _updates(3, scale=1.0)
    result = aggregators.create("secagg", l2_clip=0.5, seed=2).aggregate(updates)
    assert sorted(result.report["clipped_updates"]) == sorted(updates)
    plain = aggregators.create("plain", l2_clip=0.5).aggregate(updates)
    assert sorted(plain.report["clipped_updates"]) == sorted(updates)


def test_too_many_dropouts_abort_the_round() -> None:
    updates = _updates(6)
    with pytest.raises(ThresholdError):
        aggregators.create("secagg", seed=0).aggregate(
            updates, dropped=["site-0", "site-1", "site-2"]
        )


@pytest.mark.parametrize("name", ["plain", "secagg", "secagg+"])
def test_bad_inputs_get_clear_errors(name: str) -> None:
    agg = aggregators.create(name)
    good = _updates(3)
    nan = _updates(3)
    nan["site-1"][0][1, 1] = np.nan
    with pytest.raises(InvalidUpdateError, match="site-1"):
        agg.aggregate(nan)
    inf = _updates(3)
    inf["site-2"][1][0] = np.inf
    with pytest.raises(InvalidUpdateError, match="site-2"):
        agg.aggregate(inf)
    shape = _updates(3)
    shape["site-1"][0] = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(InvalidUpdateError, match="site-1"):
        agg.aggregate(shape)
    dtype = _updates(3)
    dtype["site-2"][1] = dtype["site-2"][1].astype(np.float64)
    with pytest.raises(InvalidUpdateError, match="site-2"):
        agg.aggregate(dtype)
    pairs = [("a", good["site-0"]), ("b", good["site-1"]), ("a", good["site-2"])]
    with pytest.raises(InvalidUpdateError, match="duplicate"):
        agg.aggregate(pairs)
    with pytest.raises(ConfigError, match="weights"):
        agg.aggregate(good, {"site-0": 1.0, "site-1": -2.0, "site-2": 1.0})
    with pytest.raises(ConfigError, match="weights"):
        agg.aggregate(good, {"site-0": 1.0})
    with pytest.raises(ConfigError, match="dropped"):
        agg.aggregate(good, dropped=["nobody"])


def test_create_refuses_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        aggregators.create("fedsgd")
    with pytest.raises(ConfigError, match="invalid option"):
        aggregators.create("secagg", colour="blue")
    with pytest.raises(ConfigError, match="precision"):
        aggregators.create("secagg", precision=1e-30).aggregate(_updates(3))
    assert issubclass(ConfigError, SecureFLError)


@pytest.mark.parametrize("name", ["secagg", "secagg+"])
def test_masked_aggregators_run_the_active_variant_by_default(name: str) -> None:
    updates = _updates(4, seed=5)
    active = aggregators.create(name, seed=1).aggregate(updates)
    assert active.report["active"] is True
    semi = aggregators.create(name, seed=1, active=False).aggregate(updates)
    assert semi.report["active"] is False
    for a, b in zip(active.mean, semi.mean, strict=True):
        np.testing.assert_allclose(a, b, atol=2 * active.report["max_error"] + 1e-7, rtol=0)


@pytest.mark.parametrize("name", ["secagg", "secagg+"])
def test_two_site_federation_aggregates(name: str) -> None:
    updates = _updates(2, seed=6)
    result = aggregators.create(name, seed=2).aggregate(updates)
    assert result.report["threshold"] == 2
    expected = _plain_mean(updates, dict.fromkeys(updates, 1.0), list(updates))
    for got, want in zip(result.mean, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=result.report["max_error"] + 1e-7, rtol=0)


def test_in_process_sites_apply_the_deployed_site_policy() -> None:
    from secure_fl.errors import PolicyError

    # The in-process halves are the deployed ones: a threshold below the sites' own minimum is
    # refused by every site before it sends anything, as over gRPC.
    with pytest.raises(PolicyError, match="threshold 2 is below"):
        aggregators.create("secagg", threshold=2, seed=0).aggregate(_updates(6))


def test_an_option_of_another_aggregator_is_refused_listing_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        aggregators.create("plain", threshold=3)
    assert "invalid option" in str(info.value) and "allowed: ['l2_clip']" in str(info.value)
    with pytest.raises(ConfigError, match=r"options\.dropout_rate must be a finite number"):
        aggregators.create("secagg+", dropout_rate=0.7)
