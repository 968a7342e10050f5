"""Public pretraining, then DP fine-tuning: load a pretrained checkpoint and choose the trainable
subset of the parameters.

DP-SGD's noise grows with the number ``d`` of trainable parameters (the signal-to-noise of a run
is about ``epsilon * n / sqrt(2 d ln(1/delta))``), so fine-tuning a few thousand parameters of a
network pretrained on public data learns where training 1.2 M from scratch cannot.

* :func:`load_pretrained` loads a state dict (``name -> tensor``, as :func:`torch.save` of
  ``model.state_dict()`` or of :func:`secure_fl.training.model.get_state`) into a network; any
  missing, unexpected or mis-shaped entry is a ConfigError naming the file.
* :func:`freeze_except` sets ``requires_grad = False`` on every parameter that no pattern of
  ``train.trainable`` selects. It must run before Opacus wraps the model (the trainer does it
  when it builds the network), so that per-sample gradients, clipping and noise cover only the
  trainable parameters: ``d`` shrinks.

Patterns (``train.trainable``): the named groups of the MONAI UNet (:data:`GROUPS`) or
``fnmatch`` globs over parameter names (``"model.2.*"``, ``"*.adn.N.*"``). Every pattern must
select at least one parameter (no silent no-op).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError

#: Named parameter groups of the MONAI UNet (regular expressions over parameter names; ``norm``
#: is found by module type and works for any network).
GROUPS: dict[str, str] = {
    "encoder": r"^model(\.1\.submodule)*\.0\.",
    "bottleneck": r"^model(\.1\.submodule)+\.(?!\d)",
    "decoder": r"^model(\.1\.submodule)*\.2\.",
    "head": r"^model\.2\.",
    "bias": r"\.bias$",
}

_NORM_TYPES: tuple[str, ...] = ("GroupNorm", "LayerNorm", "InstanceNorm", "BatchNorm")

_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _read_checkpoint(path: str) -> dict[str, Any]:
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file not found: {path}")
    stat = os.stat(p)
    key = (str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors have many types
            raise ConfigError(f"model.pretrained: cannot read {path}: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
        ):
            raise ConfigError(
                f"model.pretrained: {path} is not a state dict (a mapping of parameter names "
                "to tensors)"
            )
        _CACHE.clear()  # keep one checkpoint in memory
        _CACHE[key] = data
    return _CACHE[key]


def load_pretrained(network: Any, path: str) -> None:
    """Load the checkpoint at ``path`` into ``network``'s floating-point entries, in place.

    Guarantee: either every floating-point parameter and buffer of the network is replaced by the
    checkpoint's, or nothing is changed. Errors: ConfigError naming ``path`` when the file is
    missing or not a state dict, or when names are missing or unexpected (first few listed) or a
    shape differs.
    """
    import torch

    state = _read_checkpoint(path)
    current = network.state_dict()
    floats = {k for k, v in current.items() if v.is_floating_point()}
    given = {k for k, v in state.items() if v.is_floating_point()}
    if given != floats:
        missing, extra = sorted(floats - given), sorted(given - floats)
        raise ConfigError(
            f"model.pretrained: {path} does not fit model (check model.channels, "
            f"num_res_units, norm): missing {len(missing)} key(s) {missing[:3]}, unexpected "
            f"{len(extra)} key(s) {extra[:3]}"
        )
    for name in sorted(floats):
        if tuple(current[name].shape) != tuple(state[name].shape):
            raise ConfigError(
                f"model.pretrained: {path}: {name!r} has shape {tuple(state[name].shape)}, the "
                f"model expects {tuple(current[name].shape)}"
            )
    with torch.no_grad():
        for name in floats:
            current[name].copy_(state[name].to(current[name].dtype))


def _norm_parameters(network: Any) -> set[str]:
    names: set[str] = set()
    for module_name, module in network.named_modules():
        if any(t in type(module).__name__ for t in _NORM_TYPES):
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def select_parameters(network: Any, patterns: Sequence[str]) -> set[str]:
    """The names of the parameters of ``network`` that any of ``patterns`` selects (see the
    module docstring). Errors: ConfigError naming ``train.trainable[i]`` when a pattern selects
    no parameter (listing the named groups)."""
    names = [n for n, _ in network.named_parameters()]
    norms = _norm_parameters(network)
    chosen: set[str] = set()
    for i, pattern in enumerate(patterns):
        if pattern == "norm":
            hits = {n for n in names if n in norms}
        elif pattern in GROUPS:
            regex = re.compile(GROUPS[pattern])
            hits = {n for n in names if regex.search(n)}
        else:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            hint = (
                " (model.norm='instance' has no affine parameters: use model.norm='group')"
                if pattern == "norm"
                else ""
            )
            raise ConfigError(
                f"train.trainable[{i}]={pattern!r} selects no parameter of the model{hint}; "
                f"use a named group ({', '.join(['norm', *GROUPS])}) or a glob over parameter "
                f"names such as {names[0]!r}"
            )
        chosen |= hits
    return chosen


def freeze_except(network: Any, patterns: Sequence[str]) -> int:
    """Make only the parameters selected by ``patterns`` trainable (``requires_grad``); the rest
    are frozen. An empty ``patterns`` makes every parameter trainable. Returns ``d``, the number
    of trainable scalars. Errors: as :func:`select_parameters`."""
    chosen = (
        {n for n, _ in network.named_parameters()}
        if not patterns
        else select_parameters(network, patterns)
    )
    d = 0
    for name, param in network.named_parameters():
        param.requires_grad_(name in chosen)
        if name in chosen:
            d += int(param.numel())
    return d


def trainable_dimension(network: Any) -> int:
    """The number of trainable scalars of ``network`` (parameters with ``requires_grad``)."""
    return sum(int(p.numel()) for p in network.parameters() if p.requires_grad)


def trainable_summary(model: Any, patterns: Sequence[str]) -> str:
    """One log line with DP-SGD's dimension ``d`` for ``model`` (a ModelConfig) and ``patterns``
    (``train.trainable``): ``trainable parameters d = ... of ...``. Builds the network once, so a
    missing checkpoint or a pattern that selects nothing fails here, before any data is cached.
    Errors: ConfigError as :func:`freeze_except` and :func:`load_pretrained`."""
    import torch

    from secure_fl.training.model import build_unet

    with torch.random.fork_rng(devices=[]):  # leaves the run's random stream untouched
        network = build_unet(model)
    total = sum(int(p.numel()) for p in network.parameters())
    d = freeze_except(network, patterns)
    what = f" ({', '.join(patterns)})" if patterns else ""
    source = f", pretrained from {model.pretrained}" if model.pretrained else ""
    return f"trainable parameters d = {d:,} of {total:,}{what}{source}"
