"""An exponential moving average (EMA) of the weights over a round's optimiser steps.

De et al. (2022) average the DP-SGD iterates: the average is post-processing of the (already
private) iterates, so it costs no privacy, and it averages out part of the noise. Here the
average runs over the steps of one local round, starting from the weights the round starts from,
and the round returns the average instead of the last iterate. The decay warms up as in De et
al.: step ``t`` (from 0) uses ``min(decay, (1 + t) / (10 + t))``, so a round of a few steps still
moves the average (a fixed 0.999 would keep it at the starting weights).

Only trainable floating-point parameters are averaged; frozen parameters and buffers keep the
network's values.
"""

from __future__ import annotations

from typing import Any

from secure_fl.errors import ConfigError


class WeightEMA:
    """The EMA of ``network``'s trainable parameters (module docstring).

    Errors: ConfigError when ``decay`` is not in (0, 1).
    """

    def __init__(self, network: Any, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, float | int) or not 0 < decay < 1:
            raise ConfigError(f"train.ema must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.steps = 0
        self._params = [
            p for p in network.parameters() if p.requires_grad and p.is_floating_point()
        ]
        self._average = [p.detach().clone() for p in self._params]

    def rate(self, step: int) -> float:
        """The decay applied at 0-based ``step``: ``min(decay, (1 + step) / (10 + step))``."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def update(self) -> None:
        """Fold the network's current parameters into the average (after an optimiser step)."""
        import torch

        beta = self.rate(self.steps)
        with torch.no_grad():
            for avg, p in zip(self._average, self._params, strict=True):
                avg.mul_(beta).add_(p.detach(), alpha=1.0 - beta)
        self.steps += 1

    def copy_to_network(self) -> None:
        """Overwrite the network's averaged parameters with the average (in place)."""
        import torch

        with torch.no_grad():
            for avg, p in zip(self._average, self._params, strict=True):
                p.copy_(avg)
