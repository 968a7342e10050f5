"""Layers that help DP-SGD learn (De et al. 2022): weight-standardised 3-D convolutions and group
normalisation whose group count fits every layer.

* :class:`WSConv3d` standardises its kernel per output channel (zero mean, unit variance over
  input channels and kernel taps) on every forward pass (Qiao et al. 2019). It keeps the
  ``weight`` / ``bias`` parameters of ``nn.Conv3d`` under the same names, so state dicts,
  checkpoints and aggregation are unchanged. Opacus computes its per-sample gradients in
  functorch mode (the trainer's mode), through the standardisation.
* :func:`standardise_convs` swaps, in place, every ``nn.Conv3d`` that is followed by a
  normalisation layer (MONAI's ``Convolution`` blocks with a norm in their ``adn``) for a
  :class:`WSConv3d`. Convolutions without a following norm (the output layer, residual
  projections) and transposed convolutions are left as they are: standardising the logits'
  kernel would cap their scale.
* :func:`regroup_norms` gives every ``nn.GroupNorm`` the largest group count ``<= groups`` that
  divides its channels (the UNet's output-side norms have 2 channels, so a fixed count fails).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secure_fl.errors import ConfigError

#: Added to the standard deviation of a kernel before dividing by it.
WS_EPS = 1e-5


class WSConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose kernel is standardised per output channel before each use."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(dim=1).reshape(-1, 1, 1, 1, 1)
        std = flat.std(dim=1, unbiased=False).reshape(-1, 1, 1, 1, 1)
        out: torch.Tensor = self._conv_forward(input, (w - mean) / (std + WS_EPS), self.bias)
        return out


def _largest_divisor(channels: int, at_most: int) -> int:
    return max(g for g in range(1, min(channels, at_most) + 1) if channels % g == 0)


def regroup_norms(network: nn.Module, groups: int) -> int:
    """Rebuild every ``nn.GroupNorm`` of ``network`` (in place) with the largest number of groups
    ``<= groups`` that divides its channel count; returns how many were rebuilt.

    Guarantee: parameter names and shapes are unchanged (``weight`` and ``bias`` of length
    ``channels``, values kept). Errors: ConfigError when ``groups`` < 1.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"model.norm_groups must be an int >= 1, got {groups!r}")
    count = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.GroupNorm:
                continue
            fresh = nn.GroupNorm(
                _largest_divisor(child.num_channels, groups),
                child.num_channels,
                eps=child.eps,
                affine=child.affine,
            )
            if child.affine:
                fresh.load_state_dict(child.state_dict())
            setattr(parent, name, fresh)
            count += 1
    return count


def _followed_by_norm(block: nn.Module) -> bool:
    adn = getattr(block, "adn", None)
    return adn is not None and any(
        isinstance(m, nn.GroupNorm | nn.modules.batchnorm._NormBase) for m in adn.children()
    )


def standardise_convs(network: nn.Module) -> int:
    """Replace (in place) each ``nn.Conv3d`` that feeds a normalisation layer (MONAI's
    ``Convolution`` with a norm in its ``adn``) by a :class:`WSConv3d` with the same weights;
    returns how many were replaced (the others are listed in the module docstring).

    Guarantee: parameter names, shapes and values are unchanged. Errors: ConfigError when the
    network has no such convolution (the option would be a silent no-op).
    """
    count = 0
    for block in list(network.modules()):
        conv: Any = getattr(block, "conv", None)
        if type(conv) is not nn.Conv3d or not _followed_by_norm(block):
            continue
        fresh = WSConv3d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        fresh.load_state_dict(conv.state_dict())
        block.conv = fresh
        count += 1
    if count == 0:
        raise ConfigError(
            "model.weight_standardisation: the network has no 3-D convolution followed by a "
            "normalisation layer to standardise"
        )
    return count
