"""The MONAI Flower app's configuration and provisioning (split from :mod:`.monai_app`, which
re-exports every name here): :class:`AppConfig` (the run config, keys with dashes), the work
folder, and the federation index: the server's view of a federation (roster, and in simulation
where each site's JSON is; :func:`write_federation_index`, :func:`read_federation_index`), the
simulation's provisioned folder (:func:`simulation_dir`, provisioned on first use by
:func:`federation_for_run`) and a simulation partition's site (:func:`simulation_site`).

Guarantees: every run config value is checked (ConfigError naming the key with dashes and its
allowed range); the index never holds a site secret (names, ids, public verify keys, cert
digests, and in simulation relative paths to the sites' JSON); it is written atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError

#: The federation index in a provisioned folder (:func:`write_federation_index`).
FEDERATION_INDEX = "federation.json"
#: The environment variable naming the work folder when the run config has no ``work-dir``.
WORKDIR_ENV = "SECURE_FL_FLOWER_WORKDIR"
#: The protocols the app runs (run config ``protocol``).
PROTOCOLS = ("plain", "secagg", "secagg+")


@dataclass(frozen=True)
class AppConfig:
    """The app's settings from a Flower run config (keys with dashes, :func:`from_config`)."""

    num_server_rounds: int = 2
    protocol: str = "secagg+"
    min_sites: int = 2
    num_sites: int = 3
    stage_timeout: float = 600.0
    work_dir: str = ""
    out_dir: str = ""
    seed: int = 0
    grid_size: int = 16
    cases_per_site: int = 4
    channels: str = "4,8,16"
    local_epochs: int = 1
    lr: float = 3e-3
    batch_size: int = 2
    threads: int = 1
    dp_target_epsilon: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    federation: str = ""

    def __post_init__(self) -> None:
        ints = {
            "num_server_rounds": (1, 10_000),
            "min_sites": (2, 10_000),
            "num_sites": (2, 64),
            "seed": (0, 2**32 - 1),
            "grid_size": (16, 256),
            "cases_per_site": (2, 10_000),
            "local_epochs": (1, 1000),
            "batch_size": (1, 4096),
            "threads": (1, 1024),
        }
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{_key(name)} must be an int in [{low}, {high}], got {value!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        positive = ("stage_timeout", "lr", "dp_clip")
        for name in (*positive, "dp_target_epsilon", "dp_delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{_key(name)} must be a number, got {value!r}")
            if not np.isfinite(value) or value < 0 or (name in positive and value == 0):
                raise ConfigError(f"{_key(name)} must be a finite number > 0, got {value!r}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1), got {self.dp_delta!r}")
        self.model_channels()  # validates channels

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AppConfig:
        """The settings of a run config (unknown keys are ignored: the user's own). Ints are
        accepted where a float is expected. Errors: ConfigError naming the key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = _key(f.name)
            if key in config:
                value = config[key]
                if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                values[f.name] = value
        return cls(**values)

    def model_channels(self) -> tuple[int, ...]:
        """``channels`` as a tuple (comma-separated widths, at least 2, each in [1, 1024], the
        grid divisible by the UNet's downsampling). Errors: ConfigError naming ``channels``."""
        try:
            widths = tuple(int(part) for part in str(self.channels).split(","))
        except ValueError:
            widths = ()
        if len(widths) < 2 or any(not 1 <= w <= 1024 for w in widths):
            raise ConfigError(
                f"channels must be >= 2 comma-separated widths in [1, 1024], got {self.channels!r}"
            )
        if self.grid_size % 2 ** (len(widths) - 1):
            raise ConfigError(
                f"grid-size {self.grid_size} must be divisible by 2^{len(widths) - 1} "
                f"(channels {self.channels!r})"
            )
        return widths

    def work_path(self) -> Path:
        """The work folder (``work-dir``, else ``$SECURE_FL_FLOWER_WORKDIR``, else the temp dir)."""
        chosen = self.work_dir or os.environ.get(WORKDIR_ENV, "")
        return Path(chosen) if chosen else Path(tempfile.gettempdir()) / "secure-fl-flower"


def _key(name: str) -> str:
    return name.replace("_", "-")


def merged_config(defaults: Mapping[str, Any] | None, run_config: Mapping[str, Any]) -> AppConfig:
    """The :class:`AppConfig` of ``run_config`` over ``defaults`` (a run config value wins).
    Errors: ConfigError naming the key (:meth:`AppConfig.from_config`)."""
    return AppConfig.from_config({**(defaults or {}), **dict(run_config)})


def initial_model_seed(cfg: AppConfig) -> int:
    """The seed of a run's initial global model: the run config's ``seed`` when given (> 0),
    else a fresh value in [1, 2**32 - 1] from ``os.urandom``, new for every call (every run).

    Why: a site refuses to train twice on the same model (its release record), so a second run
    from the same initial model on the same provisioned sites would abort every round; with
    ``seed`` 0 (unset) every run starts from a new model. An explicit ``seed`` reproduces the
    model (the run reports which seed it used) and such a rerun needs fresh sites."""
    if cfg.seed:
        return cfg.seed
    while True:
        value = int.from_bytes(os.urandom(4), "big")
        if value:
            return value


# -- the federation (who is on the roster, where each site's JSON is) ------------------------


def write_federation_index(
    path: str | os.PathLike[str],
    *,
    federation: str,
    roster: Sequence[Any],
    sites: Mapping[str, Path] | None = None,
) -> Path:
    """Write the server's view of a federation: ``{"federation", "roster": [{name, site_id,
    verify_key (hex)}], "sites": {name: site JSON}}`` (``sites`` only in simulation, paths
    relative to the file). Returns the path. Errors: ConfigError for an empty roster."""
    if not roster:
        raise ConfigError("roster must list at least one site")
    target = Path(path)
    entries = [
        {
            "name": e.name,
            "site_id": e.site_id,
            **({"verify_key": e.verify_key.hex()} if e.verify_key is not None else {}),
            **({"cert_sha256": e.cert_sha256} if e.cert_sha256 is not None else {}),
        }
        for e in roster
    ]
    data: dict[str, Any] = {"federation": federation, "roster": entries}
    if sites:
        base = target.parent.resolve()
        data["sites"] = {n: os.path.relpath(Path(p).resolve(), base) for n, p in sites.items()}
    return atomic_write(target, json.dumps(data, indent=2) + "\n")


def read_federation_index(
    path: str | os.PathLike[str],
) -> tuple[str, tuple[Any, ...], dict[str, Path]]:
    """(federation, roster, site JSON by name) of a file of :func:`write_federation_index`.
    Errors: ConfigError naming the field (unknown fields are refused)."""
    from secure_fl.transport.config_common import _roster
    from secure_fl.transport.config_section import _read_json, _Section

    data, base = _read_json(Path(path))
    s = _Section(data, "", base)
    roster = _roster(s)
    raw_sites = s.raw("sites", {})
    if not isinstance(raw_sites, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_sites.items()
    ):
        raise ConfigError(f"{path}: sites must map site names to JSON paths")
    sites = {name: base / rel for name, rel in raw_sites.items()}
    name = s.str_("federation")
    s.done()
    return name, roster, sites


def simulation_dir(cfg: AppConfig) -> Path:
    """The simulation's provisioned federation: ``<work>/federation/<protocol>-<num-sites>``."""
    return cfg.work_path() / "federation" / f"{cfg.protocol}-{cfg.num_sites}"


def federation_for_run(cfg: AppConfig) -> tuple[Any, ...]:
    """The roster the server runs with: read from run config ``federation`` (deployment: the
    server's index, no site secrets), else the simulation's folder, provisioned on first use
    (:func:`simulation_dir`; reused by later runs). Errors: ConfigError."""
    if cfg.federation:
        return read_federation_index(cfg.federation)[1]
    folder = simulation_dir(cfg)
    index = folder / FEDERATION_INDEX
    if not index.is_file():
        from secure_fl.data import site_name
        from secure_fl.integrations.flower.provision import provision_flower
        from secure_fl.rounds.policy import SitePolicy

        plain = cfg.protocol == "plain"
        policy = SitePolicy(aggregations=(cfg.protocol,), allow_plain=plain)
        names = [site_name(i) for i in range(cfg.num_sites)]
        fed = provision_flower(names, folder / "sites", federation="flower-app", policy=policy)
        write_federation_index(
            index, federation=fed.federation, roster=fed.roster, sites=fed.site_configs
        )
    return read_federation_index(index)[1]


def simulation_site(cfg: AppConfig, partition_id: int) -> Any:
    """The :class:`FlowerSite` of simulation partition ``partition_id`` (site
    ``site_name(partition_id)`` of :func:`simulation_dir`). Errors: ConfigError when the folder
    is not provisioned or has no such site."""
    from secure_fl.data import site_name
    from secure_fl.integrations.flower.node import load_flower_site

    index = simulation_dir(cfg) / FEDERATION_INDEX
    if not index.is_file():
        raise ConfigError(f"no provisioned federation at {index} (the ServerApp writes it)")
    sites = read_federation_index(index)[2]
    wanted = site_name(partition_id)
    if wanted not in sites:
        raise ConfigError(f"partition-id {partition_id}: site {wanted!r} is not in {index}")
    return load_flower_site(sites[wanted])


# -- what only the site decides: its DP-SGD and its training seed ----------------------------

#: The run/node config keys of a site's DP-SGD.
DP_KEYS = ("dp-target-epsilon", "dp-delta", "dp-clip")
#: The site-local secret the deployed training seed is derived from (in ``state_dir/flower``).
TRAIN_SEED_FILE = "train-seed"
_LOG = logging.getLogger(__name__)


def is_simulation(node_config: Mapping[str, Any]) -> bool:
    """True for a simulation node (``partition-id`` and no ``secure-fl-site``: the ServerApp
    provisioned the sites), False for a deployed one (everything else)."""
    return "partition-id" in node_config and "secure-fl-site" not in node_config


def site_privacy(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Any:
    """The site's DP-SGD (a :class:`~secure_fl.privacy.config.PrivacyConfig`, None for no
    DP-SGD: target epsilon 0). ``run_config``: the run config over the app's defaults.

    Deployment (:func:`is_simulation` False): every DP-SGD setting is the node config's
    (``dp-target-epsilon``, default 0: no DP-SGD; ``dp-delta``, default 1e-5; ``dp-clip``,
    default 1.0); the run config's ``dp-*`` keys are ignored, with a WARNING naming those that
    differ, so a server can neither weaken (a larger delta or clip) nor switch off a site's
    DP-SGD. Simulation: a node config key wins, else the run config's, else the default.
    Errors: ConfigError naming the key and its allowed range."""
    from secure_fl.privacy.config import PrivacyConfig

    node = {k: node_config[k] for k in DP_KEYS if k in node_config}
    try:
        mine = AppConfig.from_config(node)
    except ConfigError as exc:
        raise ConfigError(f"node config: {exc}") from exc
    if is_simulation(node_config):
        chosen = AppConfig.from_config({**dict(run_config), **node})
    else:
        chosen = mine
        server = AppConfig.from_config({k: run_config[k] for k in DP_KEYS if k in run_config})
        ignored = [
            f"{k}={getattr(server, n)!r}"
            for k, n in zip(DP_KEYS, ("dp_target_epsilon", "dp_delta", "dp_clip"), strict=True)
            if k in run_config and getattr(server, n) != getattr(mine, n)
        ]
        if ignored:
            _LOG.warning(
                "run config %s ignored: a deployed site's DP-SGD comes from its node config "
                "(dp-target-epsilon=%r, dp-delta=%r, dp-clip=%r)",
                ", ".join(ignored),
                mine.dp_target_epsilon,
                mine.dp_delta,
                mine.dp_clip,
            )
    if chosen.dp_target_epsilon == 0:
        return None
    return PrivacyConfig(
        level="sample",
        target_epsilon=chosen.dp_target_epsilon,
        clip=chosen.dp_clip,
        delta=chosen.dp_delta,
    )


def _train_secret(node_dir: Path) -> bytes:
    """The site-local training secret (``node_dir/train-seed``, 32 bytes, 0600, created once)."""
    from secure_fl.integrations.flower.node import load_or_create_key

    return load_or_create_key(node_dir / TRAIN_SEED_FILE, "the site's training secret")


def site_secret_seed(node_dir: str | os.PathLike[str], purpose: str) -> int:
    """A 256-bit seed for ``purpose``: HMAC-SHA256 of ``purpose`` under the site-local secret
    ``node_dir/train-seed`` (32 bytes of ``os.urandom``, 0600, created on first use and never
    replaced). The same purpose gives the same seed at this site only. Errors: ConfigError
    when the secret file is open to other users or not 32 bytes."""
    secret = _train_secret(Path(node_dir))
    tag = f"secure-fl/flower/{purpose}".encode()
    return int.from_bytes(hmac.new(secret, tag, hashlib.sha256).digest(), "big")


def site_train_seed(
    node_dir: str | os.PathLike[str], server_round: int, nonce: bytes | None = None
) -> int:
    """A deployed site's training seed for one train message: :func:`site_secret_seed` of the
    round and a fresh 16-byte ``os.urandom`` nonce (``nonce``: tests only). The server chooses
    the round number (it can send ``server-round`` 1 twice), so the round alone would let it
    replay the site's training (batch order, augmentation) on two nearly equal models and
    difference the updates exactly (B2); the nonce makes every training's randomness new.
    Limits: the trainer seeds torch with 32 bits derived from it. Errors: ConfigError (a bad
    round, or :func:`site_secret_seed`'s)."""
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise ConfigError(f"server-round must be an int >= 1, got {server_round!r}")
    fresh = os.urandom(16) if nonce is None else nonce
    return site_secret_seed(node_dir, f"train/{server_round}/{fresh.hex()}")


__all__ = [
    "DP_KEYS",
    "FEDERATION_INDEX",
    "PROTOCOLS",
    "TRAIN_SEED_FILE",
    "WORKDIR_ENV",
    "AppConfig",
    "federation_for_run",
    "initial_model_seed",
    "is_simulation",
    "merged_config",
    "read_federation_index",
    "simulation_dir",
    "simulation_site",
    "site_privacy",
    "site_secret_seed",
    "site_train_seed",
    "write_federation_index",
]
