"""DP that learns, the optimiser side: augmentation multiplicity (one clipped gradient per
patient), large logical batches through Opacus' BatchMemoryManager (same accounting, same
model), and the EMA of the iterates (what a round returns)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from dp_learns_helpers import Patches, dp_round
from torch import nn

from secure_fl.errors import ConfigError
from secure_fl.training.dp_loop import CaseViews, average_views
from secure_fl.training.dp_sgd import SampleDP
from secure_fl.training.ema import WeightEMA
from secure_fl.training.local_sgd import train_local
from secure_fl.training.model import ModelConfig, build_unet, get_state

CLIP = 0.05


class Flipped(Patches):
    """Each read flips the case along a random axis: every read is a new augmented patch."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        axis = int(torch.randint(1, 4, ()))
        return {k: torch.flip(v, dims=(axis,)) for k, v in item.items()}


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv3d(4, 2, 1)
    )


def loss_fn(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, label[:, 0].long())


def private(net: nn.Module, batch: int) -> tuple[Any, Any]:
    from opacus import PrivacyEngine

    optim = torch.optim.SGD(net.parameters(), lr=0.1)
    hint = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(4)), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, dp_optim, _ = PrivacyEngine().make_private(
            module=net,
            optimizer=optim,
            data_loader=hint,
            noise_multiplier=0.0,
            max_grad_norm=CLIP,
            grad_sample_mode="functorch",
            poisson_sampling=False,
        )
    return module, dp_optim


@pytest.mark.parametrize("patients,k", [(1, 4), (2, 3)])
def test_multiplicity_averages_each_patients_views_before_clipping(patients: int, k: int) -> None:
    torch.manual_seed(5)
    views = [Flipped(patients)[i // k] for i in range(patients * k)]
    image = torch.stack([v["image"] for v in views])
    label = torch.stack([v["label"] for v in views])
    reference = small_net()
    net = copy.deepcopy(reference)
    module, dp_optim = private(net, patients)
    params: list[Any] = [p for p in net.parameters() if p.requires_grad]
    dp_optim.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss: Any = loss_fn(module(image), label)
        loss.backward()
    average_views(params, k)
    assert all(p.grad_sample.shape[0] == patients for p in params)
    dp_optim.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    # By hand: each patient's K per-view gradients (plain autograd), averaged, clipped.
    expected = torch.zeros_like(summed)
    for j in range(patients):
        grads = []
        for i in range(j * k, (j + 1) * k):
            reference.zero_grad()
            one: Any = loss_fn(reference(image[i : i + 1]), label[i : i + 1])
            one.backward()
            grads.append(
                torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
            )
        mean = torch.stack(grads).mean(0)
        assert mean.norm() > CLIP  # the clip binds, so the test sees it
        clipped = mean * min(1.0, CLIP / (float(mean.norm()) + 1e-6))
        assert clipped.norm() <= CLIP + 1e-6  # one patient, one gradient of norm <= clip
        expected += clipped
    assert torch.allclose(summed, expected, atol=1e-5)
    module._close()


def test_multiplicity_keeps_the_per_patient_sample_rate_and_feeds_k_patches() -> None:
    seen: list[int] = []

    def counting(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        seen.append(out.shape[0])
        return loss_fn(out, label)

    data = Flipped(6)
    plain = dp_round(small_net(), data, loss_fn=counting, batch_size=2, epochs=2)
    drawn = sum(seen)
    seen.clear()
    result = dp_round(
        small_net(), data, loss_fn=counting, batch_size=2, epochs=2, augment_multiplicity=3
    )
    assert (result.sample_rate, result.steps) == (plain.sample_rate, plain.steps) == (2 / 6, 6)
    assert result.expected_batch_size == pytest.approx(2.0)
    assert result.augment_multiplicity == 3
    assert all(b % 3 == 0 for b in seen) and sum(seen) == 3 * drawn  # same draws, K views each


def test_multiplicity_needs_one_patch_per_read() -> None:
    class Two(Patches):
        def __getitem__(self, index: int) -> Any:
            item = super().__getitem__(index)
            return [item, item]

    with pytest.raises(ConfigError, match="samples_per_volume = 1"):
        CaseViews(Two(2), 3)[0]
    assert len(CaseViews(Two(2), 3, one_patch=False)[0]) == 6


@pytest.mark.parametrize("chunk", [1, 3])
def test_physical_batches_keep_the_accounting_and_the_model(chunk: int) -> None:
    data = Patches(12, seed=4)
    options: dict[str, Any] = {
        "batch_size": 6,
        "epochs": 2,
        "settings": SampleDP(noise_multiplier=0.8, clip=CLIP, reproducible=True),
        "loss_fn": loss_fn,
    }
    one = small_net(3)
    whole = dp_round(one, data, **options)
    two = small_net(3)
    split = dp_round(two, data, max_physical_batch=chunk, **options)
    for field in ("steps", "sample_rate", "expected_batch_size", "empty_steps", "noise_source"):
        assert getattr(split, field) == getattr(whole, field), field
    assert whole.physical_batches == whole.steps == 4
    assert split.physical_batches > split.steps  # the logical batches were split
    a, b = get_state(one), get_state(two)
    assert all(torch.allclose(torch.from_numpy(a[k]), torch.from_numpy(b[k]), atol=1e-5) for k in a)


def test_ema_follows_the_warm_up_formula() -> None:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = WeightEMA(net, 0.5)
    expected = 0.0
    for t, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update()
        beta = min(0.5, (1 + t) / (10 + t))
        expected = beta * expected + (1 - beta) * value
    assert ema.rate(0) == pytest.approx(0.1) and ema.rate(100) == 0.5
    ema.copy_to_network()
    assert float(net.weight.detach()) == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"train.ema must be in \(0, 1\)"):
        WeightEMA(net, 1.0)


def test_a_round_returns_the_ema_of_its_dp_iterates() -> None:
    data = Patches(8, seed=2)
    options: dict[str, Any] = {"batch_size": 2, "epochs": 2, "loss_fn": loss_fn}
    last, tiny, averaged = small_net(1), small_net(1), small_net(1)
    dp_round(last, data, **options)
    dp_round(tiny, data, ema=1e-9, **options)  # decay ~0: the average is the last iterate
    dp_round(averaged, data, ema=0.9, **options)
    a, b, c = get_state(last), get_state(tiny), get_state(averaged)
    assert all(torch.allclose(torch.from_numpy(a[k]), torch.from_numpy(b[k]), atol=1e-6) for k in a)
    assert any(not torch.allclose(torch.from_numpy(a[k]), torch.from_numpy(c[k])) for k in a)


def test_local_training_returns_the_ema_too() -> None:
    data = Patches(4)
    loader = torch.utils.data.DataLoader(data, batch_size=2)

    def run(ema: float | None) -> dict[str, Any]:
        net = build_unet(ModelConfig(channels=(4, 8), num_res_units=1))
        torch.manual_seed(0)
        train_local(
            net,
            loader,
            optimizer="sgd",
            lr=0.05,
            weight_decay=0.0,
            epochs=2,
            max_steps=None,
            fedprox_mu=0.0,
            amp=False,
            loss_fn=loss_fn,
            device=torch.device("cpu"),
            desc="t",
            progress=False,
            show_loss=False,
            ema=ema,
        )
        return get_state(net)

    torch.manual_seed(9)
    plain = run(None)
    torch.manual_seed(9)
    same = run(1e-9)
    torch.manual_seed(9)
    averaged = run(0.9)
    assert all((plain[k] == same[k]).all() or abs(plain[k] - same[k]).max() < 1e-6 for k in plain)
    assert any(abs(plain[k] - averaged[k]).max() > 1e-6 for k in plain)
