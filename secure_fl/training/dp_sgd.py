"""Sample-level DP-SGD for the site trainer, through Opacus.

Each optimiser step draws a Poisson sample of the site's training *cases* (each case independently
with probability ``q = batch_size / n_cases``), computes one gradient per case with Opacus'
per-sample gradients (functorch mode, which handles MONAI's Conv3d, ConvTranspose3d, PReLU and
instance-norm layers), clips each to ``clip`` in L2, sums them, adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` and divides by the expected batch size. An empty sample still
takes a (noise-only) step, as the analysis of the Poisson-subsampled Gaussian assumes. Only the
trainable parameters (``train.trainable``: :mod:`secure_fl.training.finetune`) are clipped, noised
and updated. Augmentation multiplicity, physical batches (Opacus' BatchMemoryManager) and the EMA
of the iterates live in the step loop, :mod:`secure_fl.training.dp_loop`; none of them changes the
privacy unit or the accounting.

Guarantee: each round is ``steps`` compositions of the Poisson-subsampled Gaussian mechanism with
(``noise_multiplier``, ``q``) over the site's patients; the privacy unit is one patient (one case)
of the site's fixed training set, which is why sample-level DP requires one patch per case per draw
(``samples_per_volume == 1``). The Gaussian sum is divided by the *expected* batch size ``q * n``
(Opacus' ``expected_batch_size``; a fixed divisor keeps the sensitivity of the step at
``clip / (q n)``).

Randomness (:func:`dp_generators`): the Poisson sample and the noise come from two *independent*
generators, so the noise reveals nothing about which patients were drawn. By default each is a
torch generator seeded with 64 fresh bits from the OS CSPRNG (``os.urandom``) per round: nobody -
not the holder of the run's published seed, not the server - can regenerate the noise. Opacus'
``secure_mode`` needs ``torchcsprng`` (not installed), so the generator itself is torch's
(Mersenne Twister on CPU, Philox on CUDA) with a secret seed; its floating-point hardening (noise as
the mean of 4 draws, Holohan & Braghin 2021) is switched on. ``SampleDP(reproducible=True)`` (the
named research mode, ``privacy.reproducible_noise``) derives both seeds from the round seed
instead: the noise is then predictable by anyone holding ``config.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.training.dp_loop import PoissonDraws, run_steps


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings of one site: noise multiplier, per-patient clip norm, and whether the noise
    and sampling are seeded (``reproducible``: research runs only; see the module docstring)."""

    noise_multiplier: float
    clip: float
    reproducible: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.reproducible, bool):
            raise ConfigError(
                f"privacy.reproducible_noise must be true or false, got {self.reproducible!r}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(
                f"privacy.noise_multiplier must be > 0 for DP-SGD, got {self.noise_multiplier}"
            )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"privacy.clip must be > 0, got {self.clip}")


@dataclass(frozen=True)
class DPSGDResult:
    """What a DP-SGD round did: optimiser steps (empty samples included), sampling rate, loss,
    the divisor of the noisy gradient sum (``q * n``) and where the randomness came from
    (``"csprng"`` or ``"seeded"``)."""

    steps: int
    sample_rate: float
    mean_loss: float
    empty_steps: int
    expected_batch_size: float = 0.0
    noise_source: str = "csprng"
    physical_batches: int = 0
    augment_multiplicity: int = 1


def _seed_from(label: str, seed: int | None) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "big")
    digest = hashlib.sha256(f"secure_fl dp-sgd {label}\x00{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def dp_generators(device: Any, *, seed: int | None) -> tuple[Any, Any]:
    """``(sampling, noise)``: two independent torch generators for one DP-SGD round.

    Guarantee: with ``seed=None`` (the default mode) each is seeded with its own 64 fresh bits from
    the OS CSPRNG, so neither the run's seed nor the other generator predicts it; the noise
    generator lives on ``device`` (where the gradients are). With an integer ``seed`` (the named
    reproducible mode) the two seeds are distinct SHA-256 derivations of it: reproducible, still
    two separate streams, but predictable by whoever knows ``seed``.
    """
    import torch

    sampling = torch.Generator().manual_seed(_seed_from("sampling", seed))
    noise = torch.Generator(device=device).manual_seed(_seed_from("noise", seed))
    return sampling, noise


def sample_rate(batch_size: int, n_cases: int) -> float:
    """The Poisson sampling rate ``q = batch_size / n_cases`` (at most 1)."""
    if n_cases < 1:
        raise ConfigError("a site needs at least one training case for DP-SGD")
    return min(1.0, batch_size / n_cases)


def steps_per_epoch(batch_size: int, n_cases: int) -> int:
    """Poisson draws per local epoch: ``ceil(1 / q)``."""
    return math.ceil(1.0 / sample_rate(batch_size, n_cases))


def check_dp_compatible(network: Any) -> None:
    """Refuse a network Opacus cannot compute per-sample gradients for (e.g. batch norm).

    Errors: ConfigError naming the offending layers and the fix (model.norm = "instance").
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(network, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:3])
        raise ConfigError(
            f"the model is not compatible with DP-SGD ({listed}); batch norm "
            "(model.norm = 'batch') mixes the patients of a batch, so Opacus refuses it: use "
            "model.norm = 'group' or 'instance'"
        )


def train_dp_sgd(
    network: Any,
    dataset: Any,
    *,
    settings: SampleDP,
    batch_size: int,
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    loss_fn: Any,
    device: Any,
    seed: int,
    augment_multiplicity: int = 1,
    max_physical_batch: int | None = None,
    ema: float | None = None,
) -> DPSGDResult:
    """Run ``epochs`` local epochs of DP-SGD on ``network`` (in place) over ``dataset``'s cases.

    Guarantee: as the module docstring: the sample and the noise come from independent generators
    (:func:`dp_generators`), seeded from the OS CSPRNG unless ``settings.reproducible`` (then from
    ``seed``); the noisy sum is divided by ``q * n``. Only parameters with ``requires_grad`` are
    trained (and clipped and noised). ``augment_multiplicity``, ``max_physical_batch`` and ``ema``
    change neither the privacy unit (one case) nor the accounting (``steps`` noisy steps at rate
    ``q``): see :mod:`secure_fl.training.dp_loop`. Errors: ConfigError for an incompatible network
    (batch norm), more than one patch per case, or no trainable parameter.
    """
    import torch
    from opacus import PrivacyEngine

    check_dp_compatible(network)
    n = len(dataset)
    q = sample_rate(batch_size, n)
    expected = max(1, round(q * n))
    steps_total = epochs * steps_per_epoch(batch_size, n)
    generator, noise_generator = dp_generators(device, seed=seed if settings.reproducible else None)
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("DP-SGD: the model has no trainable parameter (see train.trainable)")
    if optimizer == "adam":
        optim: Any = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    # The loader only tells Opacus the expected batch size; batches are drawn below.
    size_hint: Any = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(n)), batch_size=expected
    )
    with warnings.catch_warnings():
        # "Secure RNG turned off": Opacus' secure_mode needs torchcsprng; the noise generator is
        # seeded from the OS CSPRNG instead (module docstring).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        module, dp_optim, _ = engine.make_private(
            module=network,
            optimizer=optim,
            data_loader=size_hint,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.clip,
            poisson_sampling=False,
            grad_sample_mode="functorch",
            noise_generator=noise_generator,
        )
    # Opacus infers the divisor from the hint loader as int(n / len(loader)), which is not q * n
    # when batch_size does not divide n; the analysis (and the utility) need q * n.
    dp_optim.expected_batch_size = q * n
    # Opacus' floating-point hardening (mean of 4 draws), with our generator.
    dp_optim.secure_mode = True
    module.train()
    with warnings.catch_warnings():
        # The input needs no gradient, so torch notes that full backward hooks fire on outputs:
        # expected with per-sample gradients, and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loop = run_steps(
            module,
            dp_optim,
            params,
            dataset,
            PoissonDraws(n, q, steps_total, generator),
            loss_fn=loss_fn,
            device=device,
            multiplicity=augment_multiplicity,
            max_physical_batch=max_physical_batch,
            ema=ema,
        )
    result = DPSGDResult(
        steps=loop.logical_steps,
        sample_rate=q,
        mean_loss=loop.mean_loss,
        empty_steps=loop.empty_steps,
        expected_batch_size=float(dp_optim.expected_batch_size),
        physical_batches=loop.physical_batches,
        augment_multiplicity=augment_multiplicity,
    )
    return dataclasses.replace(result, noise_source="seeded" if settings.reproducible else "csprng")
