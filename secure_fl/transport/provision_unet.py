"""``secure-fl provision --task unet``: every site trains the 3D-UNet on its own datalist.

Split from :mod:`secure_fl.transport.provision` (which re-exports these names)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from secure_fl.errors import ConfigError

UNET_FACTORY = "secure_fl.training.remote:unet_site_task"
INITIAL_MODEL = "initial_model.tensors"


def _shape(name: str, value: Sequence[int], size: int | None) -> tuple[int, ...]:
    out = tuple(value)
    if (
        not out
        or (size is not None and len(out) != size)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out)
    ):
        count = f"{size} integers" if size is not None else "integers"
        raise ConfigError(f"{name} must be {count} >= 1, got {list(out)!r}")
    return out


@dataclass(frozen=True)
class UNetTask:
    """The 3D-UNet training task written into every site's config by :func:`provision`.

    ``datalists``: site name -> the path of that site's datalist *as read on the site's machine*
    (a relative path is relative to the directory ``secure-fl site`` runs in; the file is not
    read at provisioning). A site trains the cases whose ``site`` is its name (every case when
    none is). ``grid``, ``patch``, ``channels``, ``lr``, ``local_epochs``, ``batch_size`` and
    ``seed`` are the options of :func:`secure_fl.training.remote.unet_site_task`; ``channels``
    and ``seed`` also make the server's initial model. ``extra``: further task options, as is.

    Errors: ConfigError naming the field and its allowed range.
    """

    datalists: Mapping[str, str]
    grid: tuple[int, ...] = (48, 48, 48)
    patch: tuple[int, ...] = (32, 32, 32)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    lr: float = 3e-3
    local_epochs: int = 1
    batch_size: int = 2
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.datalists, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.datalists.items()
        ):
            raise ConfigError("datalists must map site names to non-empty paths")
        object.__setattr__(self, "datalists", MappingProxyType(dict(self.datalists)))
        object.__setattr__(self, "grid", _shape("grid", self.grid, 3))
        object.__setattr__(self, "patch", _shape("patch", self.patch, 3))
        object.__setattr__(self, "channels", _shape("channels", self.channels, None))
        if len(self.channels) < 2:
            raise ConfigError(f"channels must list at least 2 widths, got {list(self.channels)}")
        if any(p > g for p, g in zip(self.patch, self.grid, strict=True)):
            raise ConfigError(f"patch {list(self.patch)} must fit in grid {list(self.grid)}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("local_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def site_task(self, site: str, rounds: int) -> dict[str, Any]:
        """The ``task`` section of ``site``'s config. Errors: ConfigError without a datalist."""
        if site not in self.datalists:
            raise ConfigError(
                f"no datalist for site {site!r} (--site-datalist or --datalist-template)"
            )
        options: dict[str, Any] = {
            "datalist": self.datalists[site],
            "grid": list(self.grid),
            "patch": list(self.patch),
            "channels": list(self.channels),
            "lr": self.lr,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "rounds": rounds,
            "seed": self.seed,
            **self.extra,
        }
        return {"kind": "python", "factory": UNET_FACTORY, "options": options}


def site_datalists(
    sites: Sequence[str], *, template: str | None = None, per_site: Sequence[str] = ()
) -> dict[str, str]:
    """Each site's datalist path from a ``template`` (``{site}`` is replaced by the site's name)
    and ``NAME=PATH`` entries (which win over the template).

    Errors: ConfigError for an entry without ``=``, a name off ``sites``, a repeated name, or a
    site left without a datalist."""
    out = {name: template.replace("{site}", name) for name in sites} if template else {}
    seen: set[str] = set()
    for entry in per_site:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--site-datalist must be NAME=PATH, got {entry!r}")
        if name not in sites:
            raise ConfigError(f"--site-datalist names {name!r}, which is not in --sites")
        if name in seen:
            raise ConfigError(f"--site-datalist names {name!r} twice")
        seen.add(name)
        out[name] = path
    missing = [name for name in sites if name not in out]
    if missing:
        raise ConfigError(
            f"no datalist for site(s) {', '.join(missing)}: give --datalist-template "
            "(e.g. /data/{site}/datalist.json) or --site-datalist NAME=PATH for each"
        )
    return out


def _unet_remote() -> Any:
    """:mod:`secure_fl.training.remote` (imports torch and MONAI). Errors: ConfigError."""
    try:
        return importlib.import_module("secure_fl.training.remote")
    except ImportError as exc:
        raise ConfigError(f"--task unet needs torch and MONAI (secure_fl.training): {exc}") from exc


__all__ = ["INITIAL_MODEL", "UNET_FACTORY", "UNetTask", "site_datalists"]
