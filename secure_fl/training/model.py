"""The MONAI 3D-UNet and conversions between torch state dicts and numpy updates."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError

#: A model's floating-point state as numpy arrays, name -> array (what aggregators receive).
State = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelConfig:
    """A MONAI ``UNet`` for whole-tumour segmentation (1 input channel, 2 output classes).

    ``channels`` (16, 32, 64, 128) gives about 1.2 M parameters, (16, 32, 64, 128, 256) about 4.8 M.
    Each level but the last halves the resolution (stride 2).

    ``norm``: ``"instance"`` (no affine parameters), ``"group"`` (affine; each layer gets the
    largest group count ``<= norm_groups`` dividing its channels) or ``"batch"`` (refused by
    DP-SGD: it mixes patients within a batch). ``weight_standardisation`` standardises the kernels
    of the 3-D convolutions that feed a norm (:mod:`secure_fl.training.layers`).
    ``pretrained``: a state-dict checkpoint loaded into every freshly built network, the initial
    global model included (:func:`secure_fl.training.finetune.load_pretrained`; a relative path is
    taken from the current directory).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0
    norm_groups: int = 4
    weight_standardisation: bool = False
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ConfigError(
                f"model.channels must list at least 2 positive widths, got {self.channels}"
            )
        if not 0 <= self.num_res_units <= 8:
            raise ConfigError(f"model.num_res_units must be in [0, 8], got {self.num_res_units}")
        if self.norm not in ("instance", "batch", "group"):
            raise ConfigError(f"model.norm must be instance, batch or group, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if (
            isinstance(self.norm_groups, bool)
            or not isinstance(self.norm_groups, int)
            or not 1 <= self.norm_groups <= 1024
        ):
            raise ConfigError(
                f"model.norm_groups must be an int in [1, 1024], got {self.norm_groups!r}"
            )
        if not isinstance(self.weight_standardisation, bool):
            raise ConfigError(
                f"model.weight_standardisation must be true or false, got "
                f"{self.weight_standardisation!r}"
            )
        if self.pretrained is not None and (
            not isinstance(self.pretrained, str) or not self.pretrained
        ):
            raise ConfigError(
                f"model.pretrained must be a non-empty path or unset, got {self.pretrained!r}"
            )

    @property
    def downsampling(self) -> int:
        """The factor by which the input size must be divisible."""
        return int(2 ** (len(self.channels) - 1))


def build_unet(cfg: ModelConfig) -> Any:
    """A fresh MONAI 3D ``UNet`` for ``cfg``: weights from torch's current RNG state, or from
    ``cfg.pretrained`` when set; group norms regrouped and convolutions weight-standardised as
    ``cfg`` says (:class:`ModelConfig`).

    Errors: ConfigError when the pretrained checkpoint is missing or does not fit the model
    (naming the file).
    """
    from monai.networks.nets.unet import UNet

    from secure_fl.training.finetune import load_pretrained
    from secure_fl.training.layers import regroup_norms, standardise_convs

    norm: Any = {"instance": "INSTANCE", "batch": "BATCH", "group": ("GROUP", {"num_groups": 1})}[
        cfg.norm
    ]
    network = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=cfg.num_res_units,
        norm=norm,
        dropout=cfg.dropout,
    )
    if cfg.norm == "group":
        regroup_norms(network, cfg.norm_groups)
    if cfg.weight_standardisation:
        standardise_convs(network)
    if cfg.pretrained is not None:
        load_pretrained(network, cfg.pretrained)
    return network


def get_state(model: Any) -> State:
    """Copy the model's floating-point parameters and buffers to numpy (float32)."""
    out: State = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            out[name] = tensor.detach().cpu().numpy().astype(np.float32, copy=True)
    return out


def set_state(model: Any, state: Mapping[str, np.ndarray]) -> None:
    """Load ``state`` into ``model``'s floating-point entries.

    Errors: ConfigError when a name is missing or extra, or a shape differs.
    """
    import torch

    current = model.state_dict()
    floats = {k for k, v in current.items() if v.is_floating_point()}
    if set(state) != floats:
        missing, extra = sorted(floats - set(state)), sorted(set(state) - floats)
        raise ConfigError(f"model state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in floats:
        if tuple(current[name].shape) != tuple(state[name].shape):
            raise ConfigError(
                f"model state {name!r}: shape {state[name].shape}, expected "
                f"{tuple(current[name].shape)}"
            )
    with torch.no_grad():
        for name in floats:
            current[name].copy_(torch.from_numpy(np.asarray(state[name])))


def state_add(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], scale: float = 1.0
) -> State:
    """``a + scale * b`` entry by entry, in float32."""
    return {k: (a[k] + scale * b[k]).astype(np.float32) for k in a}


def state_sub(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> State:
    """``a - b`` entry by entry, in float32."""
    return {k: (a[k] - b[k]).astype(np.float32) for k in a}


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 over names, shapes and values: equal digests mean bit-identical states."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name])
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def derive_seed(*parts: object) -> int:
    """A 32-bit seed derived from ``parts`` (run seed, strategy, round, site), so that every
    round's randomness depends only on where it is, and a resumed run repeats it exactly."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big")
