"""Where DP randomness comes from: the OS CSPRNG by default, a seed only in the named mode.

Adversary: anyone holding a run's config.json (it publishes the seed) trying to regenerate the
DP noise and subtract it, or to read from the noise which patients were sampled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from secure_fl.training.dp_fedavg import DPFedAvg, SiteDP
from secure_fl.training.dp_sgd import SampleDP, dp_generators, train_dp_sgd

SIGMA = 1.0
CLIP = 1.0


def _zero_loss(output: Any, label: Any) -> Any:
    # No data gradient: every parameter move is DP noise, so the test can read the noise exactly.
    return (output * 0.0).sum()


def _dataset(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": torch.ones(1, 2, 2, 2), "label": torch.zeros(1, 2, 2, 2)} for _ in range(n)]


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 256, kernel_size=2)


def _noise_moves(
    *, seed: int, reproducible: bool = False, n: int = 4, batch_size: int = 4
) -> tuple[np.ndarray, Any]:
    """The parameter moves of one DP-SGD round with zero gradients (lr = 1), and the result."""
    net = _network()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    result = train_dp_sgd(
        net,
        _dataset(n),
        settings=SampleDP(noise_multiplier=SIGMA, clip=CLIP, reproducible=reproducible),
        batch_size=batch_size,
        epochs=1,
        lr=1.0,
        optimizer="sgd",
        weight_decay=0.0,
        loss_fn=_zero_loss,
        device=torch.device("cpu"),
        seed=seed,
    )
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    return (before - after).numpy().astype(np.float64), result


def test_dp_sgd_noise_is_not_reproducible_from_the_published_seed() -> None:
    first, result = _noise_moves(seed=1234)
    second, _ = _noise_moves(seed=1234)
    assert result.noise_source == "csprng"
    assert np.std(first) > 0.1  # noise was added
    assert not np.allclose(first, second)  # same seed, same weights: fresh noise each time


def test_dp_sgd_noise_is_not_the_sampling_stream() -> None:
    """Whoever replays a generator seeded with the run's round seed (the sampler's stream before
    the fix) must not obtain the noise, in either mode."""
    seed = 99
    for reproducible in (False, True):
        moves, result = _noise_moves(seed=seed, reproducible=reproducible)
        # q = 1, one step: moves = noise / expected_batch_size for the first parameter block
        noise = moves[: 256 * 8] * result.expected_batch_size
        replay = torch.normal(
            0.0, SIGMA * CLIP, (256 * 8,), generator=torch.Generator().manual_seed(seed)
        ).numpy()
        assert not np.allclose(noise, replay, atol=1e-4)


def test_sampling_and_noise_generators_are_independent() -> None:
    for seed in (None, 7):
        sampling, noise = dp_generators(torch.device("cpu"), seed=seed)
        assert sampling is not noise
        assert sampling.initial_seed() != noise.initial_seed()
        assert noise is not torch.default_generator
    fresh = {dp_generators(torch.device("cpu"), seed=None)[1].initial_seed() for _ in range(4)}
    assert len(fresh) == 4  # CSPRNG: a new seed every time
    a = dp_generators(torch.device("cpu"), seed=7)
    b = dp_generators(torch.device("cpu"), seed=7)
    assert a[0].initial_seed() == b[0].initial_seed() and a[1].initial_seed() == b[1].initial_seed()


def test_reproducible_mode_repeats_the_noise() -> None:
    first, result = _noise_moves(seed=1234, reproducible=True)
    second, _ = _noise_moves(seed=1234, reproducible=True)
    other, _ = _noise_moves(seed=1235, reproducible=True)
    assert result.noise_source == "seeded"
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_dp_sgd_divides_by_the_expected_batch_size() -> None:
    # n = 8, batch_size = 3: q = 3/8, 3 draws per epoch; Opacus' own hint would divide by 2.
    n, batch = 8, 3
    moves, result = _noise_moves(seed=5, n=n, batch_size=batch)
    assert result.steps == 3
    assert result.expected_batch_size == pytest.approx(batch)
    # SGD with momentum 0.9, lr 1, zero gradients: moves = (2.71 z1 + 1.9 z2 + z3) / divisor
    expected_std = SIGMA * CLIP * math.sqrt(2.71**2 + 1.9**2 + 1.0) / batch
    assert np.std(moves) == pytest.approx(expected_std, rel=0.1)


# -- site level (DP-FedAvg) ------------------------------------------------------------------


def _central_noise(reproducible: bool, seed: int = 3) -> np.ndarray:
    strategy = DPFedAvg(
        SiteDP(noise_multiplier=1.0, clip=1.0, seed=seed, reproducible=reproducible),
        aggregator="plain",
    )
    deltas = {"a": np.zeros(1000), "b": np.zeros(1000)}
    total, report = strategy._central_sum(deltas, [], round_id=0)
    assert report["noise_std"] == 1.0
    return total


def test_site_level_noise_is_fresh_unless_reproducible() -> None:
    assert not np.allclose(_central_noise(False), _central_noise(False))
    np.testing.assert_array_equal(_central_noise(True), _central_noise(True))
    assert not np.allclose(_central_noise(True, seed=3), _central_noise(True, seed=4))


class _Fed:
    def __init__(self, names: list[str]) -> None:
        self.names = names


def test_site_participation_is_drawn_from_the_csprng() -> None:
    names = [f"site-{i}" for i in range(40)]
    fed: Any = _Fed(names)

    def draw(reproducible: bool) -> list[str]:
        strategy = DPFedAvg(
            SiteDP(
                noise_multiplier=1.0, clip=1.0, sample_rate=0.5, seed=11, reproducible=reproducible
            ),
            aggregator="plain",
        )
        return strategy.sampled_sites(fed, 0)

    # the run seed does not determine who takes part (2**-40 chance of a false failure)
    assert draw(False) != draw(False)
    assert draw(True) == draw(True)
    strategy = DPFedAvg(SiteDP(noise_multiplier=1.0, clip=1.0, sample_rate=0.5), aggregator="plain")
    assert strategy.sampled_sites(fed, 2) == strategy.sampled_sites(fed, 2)  # one draw per round


def _distributed_total(reproducible: bool) -> np.ndarray:
    strategy = DPFedAvg(
        SiteDP(
            noise_multiplier=1.0,
            clip=1.0,
            trust="distributed",
            mechanism="discrete_gaussian",
            seed=3,
            reproducible=reproducible,
        ),
        aggregator="secagg",
        aggregator_options={"threshold": 2},
    )
    deltas = {name: np.zeros(64) for name in ("a", "b", "c")}
    total, _ = strategy._distributed_sum(deltas, [], round_id=0)
    return total


def test_distributed_noise_shares_are_fresh_unless_reproducible() -> None:
    assert not np.allclose(_distributed_total(False), _distributed_total(False))
    np.testing.assert_array_equal(_distributed_total(True), _distributed_total(True))
