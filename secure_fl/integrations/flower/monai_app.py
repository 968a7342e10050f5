"""The MONAI 3D-UNet as a Flower app: a ClientApp over :class:`SiteTrainer` behind the secure_fl
mod, and a ServerApp that runs :class:`SecureAggregationWorkflow` round after round.

Client (:func:`make_monai_client_app`): ``@app.train()`` loads the global ``"arrays"`` into the
UNet, trains locally (DP-SGD through Opacus when the site asks for it) and replies ``"arrays"``
(the trained weights: the secure_fl mod turns them into a sealed delta and never forwards them)
and ``"metrics"`` (``num-examples``, ``steps``, ``val-dice``, ``train-loss`` without DP,
``dp-epsilon`` with DP). ``@app.evaluate()`` scores the global model (Dice on held-out cases).

Where a node's data and secure_fl identity come from (the node's own config wins):

* deployment: node config ``secure-fl-site`` (the site's JSON, :mod:`.node`) and ``datalist``
  (a MONAI datalist of this site's cases); ``dp-target-epsilon`` (default 0: none) /
  ``dp-clip`` (1.0) / ``dp-delta`` (1e-5) are the site's DP-SGD, ALL of it: the run config's
  ``dp-*`` keys are ignored with a WARNING (:func:`.app_config.site_privacy`); the held-out
  split and the training are seeded from a site-local secret (``state_dir/flower/train-seed``;
  training: with the round and a fresh nonce), never from the run config, so the server cannot
  replay a site's training (metric ``seed-site-secret`` = 1);
* simulation (node config ``partition-id`` / ``num-partitions``, no ``secure-fl-site``): the
  synthetic federation and the provisioned keys under the work folder (run config ``work-dir``,
  else ``$SECURE_FL_FLOWER_WORKDIR``, else ``<tempdir>/secure-fl-flower``): partition ``p`` is
  site ``site_name(p)``. The ServerApp provisions that folder (every key on one machine: a
  simulation, not a deployment); the run config's ``dp-*`` keys apply where the node config
  has none, and its ``seed`` seeds the data and training (reproducible runs,
  ``seed-site-secret`` = 0). The initial global model is seeded by ``seed`` when given (> 0),
  else by a fresh random value per run (recorded in ``metrics.json``): sites refuse to train
  twice on one model, so a rerun from the same model on the same sites would abort every round.

Run config keys (all optional, :class:`AppConfig`): ``num-server-rounds``, ``protocol``,
``min-sites``, ``num-sites``, ``stage-timeout``, ``work-dir``, ``out-dir``, ``seed``,
``grid-size``, ``cases-per-site``, ``channels``, ``local-epochs``, ``lr``, ``batch-size``,
``threads``, ``dp-target-epsilon`` (0: no DP-SGD), ``dp-clip``, ``dp-delta`` (these three in
simulation only), ``federation``.

Guarantees: the ServerApp never sees a site's update (only the workflow's mean); a site's
DP-SGD spend lives in its own ``state_dir`` (``state_dir/flower/dp_sgd.jsonl``, :mod:`.dp_log`):
read at every train message, appended before the trained arrays leave the ClientApp, never
taken from ``context.state``; it survives messages, processes, restarts and Flower runs, so a
round past the site's target epsilon is refused (BudgetExceededError) whatever run asks for
it. DP-SGD therefore needs a site (``secure-fl-site``, or the simulation's provisioned one).
Limits: ``partition-id`` without ``secure-fl-site`` trusts the run config's work folder for the
site's keys and DP log, which is right only in simulation (a deployed SuperNode must set
``secure-fl-site``).
Errors: ConfigError naming the run/node config key.

Layout: the run config (:class:`AppConfig`) and the federation index (provisioning) live in
:mod:`.app_config`; every one of their names stays importable from here. What remains (about
470 lines) is the client and the server of one app, kept in one module to be read together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.errors import ConfigError
from secure_fl.integrations.flower.app_config import (
    FEDERATION_INDEX,
    PROTOCOLS,
    WORKDIR_ENV,
    AppConfig,
    federation_for_run,
    initial_model_seed,
    is_simulation,
    merged_config,
    read_federation_index,
    simulation_dir,
    simulation_site,
    site_privacy,
    site_secret_seed,
    site_train_seed,
    write_federation_index,
)

_LOG = logging.getLogger(__name__)

# -- the site ------------------------------------------------------------------------------


def _site_data(context: Any, cfg: AppConfig, split_seed: int) -> tuple[str, list[Any], list[Any]]:
    """(site name, train cases, held-out cases) of this node (module docstring); the held-out
    cases are drawn with ``split_seed``."""
    from secure_fl.data import load_datalist, site_name, split_by_site
    from secure_fl.data.synthetic import generate_federation

    node = dict(context.node_config)
    if "datalist" in node:
        cases = load_datalist(str(node["datalist"]))
    elif "partition-id" in node:
        pid, parts = node["partition-id"], node.get("num-partitions", cfg.num_sites)
        if not isinstance(pid, int) or not 0 <= pid < parts:
            raise ConfigError(f"node config partition-id must be in [0, {parts}), got {pid!r}")
        datalist = generate_federation(
            cfg.work_path() / "data",
            sites=int(parts),
            cases_per_site=cfg.cases_per_site,
            shape=(cfg.grid_size,) * 3,
            seed=cfg.seed,
        )
        wanted = site_name(pid)
        cases = [c for c in load_datalist(datalist) if c.site == wanted]
    else:
        raise ConfigError(
            "node config needs 'datalist' (deployment) or 'partition-id' (simulation)"
        )
    splits = split_by_site(cases, seed=split_seed)
    if len(splits) != 1:
        raise ConfigError(f"this node's cases must belong to one site, got {sorted(splits)}")
    ((name, (train, val)),) = splits.items()
    return name, train, val


def _privacy(context: Any, defaults: Mapping[str, Any] | None) -> Any:
    """The site's DP-SGD (:func:`.app_config.site_privacy`: deployed, the node config alone)."""
    return site_privacy(dict(context.node_config), {**(defaults or {}), **context.run_config})


def _seeds(
    context: Any, cfg: AppConfig, defaults: Mapping[str, Any] | None, server_round: int
) -> tuple[int, int, str]:
    """(split seed, training seed, where from): in simulation the run config's ``seed``
    (reproducible research runs); deployed, the site's secret (:func:`.app_config.site_secret_seed`
    for the held-out split, stable; :func:`.app_config.site_train_seed`, new every message)."""
    if is_simulation(context.node_config):
        return cfg.seed, cfg.seed, "run-config"
    node_dir = resolve_site(context, defaults).node_dir
    split = site_secret_seed(node_dir, "split")
    return split, site_train_seed(node_dir, server_round), "site-secret"


def _trainer(
    context: Any,
    cfg: AppConfig,
    *,
    private: bool,
    defaults: Mapping[str, Any] | None = None,
    server_round: int = 1,
) -> Any:
    from secure_fl.data import PreprocessConfig
    from secure_fl.training.model import ModelConfig
    from secure_fl.training.trainer import SiteTrainer, TrainConfig

    split_seed, seed, source = _seeds(context, cfg, defaults, server_round)
    _LOG.info("round %d: seeds from the %s", server_round, source)
    name, train, val = _site_data(context, cfg, split_seed)
    privacy = _privacy(context, defaults) if private else None
    grid = (cfg.grid_size,) * 3
    trainer = SiteTrainer(
        name,
        train,
        val,
        preprocess=PreprocessConfig(grid=grid, patch=grid, samples_per_volume=1),
        model=ModelConfig(channels=cfg.model_channels(), num_res_units=1),
        train=TrainConfig(
            lr=cfg.lr,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            device="cpu",
            amp=False,
            lr_schedule="constant",
        ),
        seed=seed,
        threads=cfg.threads,
        progress=False,
        privacy=privacy,
    )
    trainer.rounds = cfg.num_server_rounds
    return trainer


def _dp_history(trainer: Any, context: Any, defaults: Mapping[str, Any] | None) -> Any:
    """The block that trains: with the trainer's own DP-SGD, its history is read from and
    appended to the node's durable log (:mod:`.dp_log`, in the state_dir of
    :func:`resolve_site`), never from ``context.state``. Errors: ConfigError (no site to keep
    the log in, a malformed log)."""
    from contextlib import nullcontext

    from secure_fl.integrations.flower.dp_log import DPSGDLog, durable_dp_history

    if trainer.own_dp is None:
        return nullcontext()
    try:
        site = resolve_site(context, defaults)
    except ConfigError as exc:
        raise ConfigError(
            f"DP-SGD keeps the site's spend in its state_dir, and this node has none: {exc}"
        ) from exc
    return durable_dp_history(trainer, DPSGDLog.of_site(site))


def _state_of(message: Any, where: str) -> dict[str, np.ndarray]:
    content = message.content
    if "arrays" not in content.array_records:
        raise ConfigError(f"the {where} message holds no 'arrays' record (the global model)")
    return {str(k): np.asarray(v.numpy()) for k, v in content.array_records["arrays"].items()}


def _round_of(message: Any) -> int:
    config = message.content.config_records.get("config")
    value = config.get("server-round", 1) if config is not None else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config server-round must be an int >= 1, got {value!r}")
    return value


def train_fn(message: Any, context: Any, defaults: Mapping[str, Any] | None = None) -> Any:
    """The ClientApp's train step (module docstring). Errors: ConfigError for a bad config or a
    message without ``"arrays"``; BudgetExceededError when DP-SGD would exceed the site's
    target epsilon."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from monai.fl.utils.exchange_object import ExchangeObject

    cfg = merged_config(defaults, context.run_config)
    server_round = _round_of(message)
    trainer = _trainer(context, cfg, private=True, defaults=defaults, server_round=server_round)
    weights = _state_of(message, "train")
    with _dp_history(trainer, context, defaults):  # appended before the arrays leave
        trainer.train(
            ExchangeObject(weights=weights),
            extra={"round": server_round - 1, "rounds": cfg.num_server_rounds},
        )
    result = trainer.get_weights()
    stats = result.statistics or {}
    metrics: dict[str, Any] = {
        "num-examples": int(trainer.num_train_cases),
        "steps": int(trainer.last_steps),
        "seed-site-secret": int(not is_simulation(context.node_config)),
    }
    if "train_loss" in stats and np.isfinite(stats["train_loss"]):
        metrics["train-loss"] = float(stats["train_loss"])
    if "dp_epsilon" in stats:
        metrics["dp-epsilon"] = float(stats["dp_epsilon"])
    dice = trainer.evaluate(ExchangeObject()).metrics["val_dice"]
    if np.isfinite(dice):
        metrics["val-dice"] = float(dice)
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in result.weights.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def evaluate_fn(message: Any, context: Any, defaults: Mapping[str, Any] | None = None) -> Any:
    """The ClientApp's evaluate step: Dice of the message's ``"arrays"`` on this site's held-out
    cases (``num-examples`` = their number; ``val-dice`` absent without held-out cases)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from monai.fl.utils.exchange_object import ExchangeObject

    cfg = merged_config(defaults, context.run_config)
    trainer = _trainer(context, cfg, private=False, defaults=defaults)
    scores = trainer.evaluate(ExchangeObject(weights=_state_of(message, "evaluate")))
    metrics: dict[str, Any] = {"num-examples": len(trainer.val_cases)}
    if np.isfinite(scores.metrics["val_dice"]):
        metrics["val-dice"] = float(scores.metrics["val_dice"])
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def resolve_site(context: Any, defaults: Mapping[str, Any] | None = None) -> Any:
    """This node's :class:`FlowerSite`: node config ``secure-fl-site`` (deployment), else in
    simulation (``partition-id``) the site provisioned in the work folder. Errors: ConfigError."""
    from secure_fl.integrations.flower.node import site_from_node_config

    node = dict(context.node_config)
    if "secure-fl-site" in node or "partition-id" not in node:
        return site_from_node_config(node)
    cfg = merged_config(defaults, context.run_config)
    return simulation_site(cfg, int(node["partition-id"]))


def make_monai_client_app(
    *, defaults: Mapping[str, Any] | None = None, mods: Sequence[Any] | None = None
) -> Any:
    """A Flower ``ClientApp`` training the MONAI 3D-UNet (module docstring). ``defaults``: run
    config values used where the run config has none; ``mods``: None for the secure_fl mod
    (:func:`resolve_site` picks the node's site), ``[]`` for none (tests only)."""
    from flwr.clientapp import ClientApp

    if mods is None:
        from secure_fl.integrations.flower.mod import make_secure_fl_mod

        mods = [make_secure_fl_mod(lambda context: resolve_site(context, defaults))]
    app = ClientApp(mods=list(mods))

    @app.train()
    def _train(message: Any, context: Any) -> Any:
        return train_fn(message, context, defaults)

    @app.evaluate()
    def _evaluate(message: Any, context: Any) -> Any:
        return evaluate_fn(message, context, defaults)

    return app


# -- the server ------------------------------------------------------------------------------


def initial_arrays(cfg: AppConfig, seed: int | None = None) -> Any:
    """The initial global UNet as an ``ArrayRecord``, seeded by ``seed`` (None: the run
    config's ``seed``; :func:`run_server` passes :func:`.app_config.initial_model_seed`)."""
    import torch
    from flwr.app import Array, ArrayRecord

    from secure_fl.training.model import ModelConfig, build_unet, get_state

    torch.manual_seed(cfg.seed if seed is None else seed)
    net = build_unet(ModelConfig(channels=cfg.model_channels(), num_res_units=1))
    return ArrayRecord({k: Array(v) for k, v in get_state(net).items()})


def _evaluate_global(
    grid: Any, arrays: Any, node_ids: Sequence[int], cfg: AppConfig
) -> tuple[float | None, int]:
    """(mean val Dice weighted by held-out cases, held-out cases) over the nodes that answered;
    (None, 0) when none reported a Dice."""
    from flwr.app import ConfigRecord, Message, RecordDict

    config = ConfigRecord({"server-round": cfg.num_server_rounds})
    messages = [
        Message(RecordDict({"arrays": arrays, "config": config}), node, "evaluate")
        for node in node_ids
    ]
    total, weight = 0.0, 0
    for reply in grid.send_and_receive(messages, timeout=cfg.stage_timeout):
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            continue
        m = reply.content.metric_records["metrics"]
        n, dice = m.get("num-examples", 0), m.get("val-dice")
        if isinstance(n, int | float) and n > 0 and isinstance(dice, float) and 0 <= dice <= 1:
            total, weight = total + dice * n, weight + int(n)
    return (total / weight if weight else None), weight


def run_server(grid: Any, context: Any, defaults: Mapping[str, Any] | None = None) -> Path:
    """Run the federation: ``num-server-rounds`` rounds of the workflow from the initial UNet
    (a round that aborts for too few sites leaves the model unchanged), then an evaluation;
    write ``model.npz`` and ``metrics.json`` to the out folder (``out-dir``, else
    ``<work>/out/run-<run_id>``) and return it. The initial model is seeded by
    :func:`.app_config.initial_model_seed` (run config ``seed``, else fresh per run), recorded
    in ``metrics.json`` as ``initial_model_seed``. Each round's survivors and the output folder
    are logged through Flower's logger (shown by ``flwr run --stream``). Errors: ConfigError
    (bad config; in simulation a node count other than ``num-sites``), the workflow's errors."""
    from flwr.app import ConfigRecord
    from flwr.common.logger import log

    from secure_fl.errors import ThresholdError
    from secure_fl.integrations.flower.records import flatten
    from secure_fl.integrations.flower.workflow import SecureAggregationWorkflow, add_arrays
    from secure_fl.rounds.spec import AggregationSpec

    cfg = merged_config(defaults, context.run_config)
    roster = federation_for_run(cfg)
    workflow = SecureAggregationWorkflow(
        AggregationSpec.from_options(cfg.protocol, {}, where="protocol"),
        roster,
        min_sites=cfg.min_sites,
        stage_timeout_s=cfg.stage_timeout,
    )
    node_ids = workflow.wait_for_nodes(grid)
    if not cfg.federation:  # simulation: one node per provisioned site, the data made once
        from secure_fl.data.synthetic import generate_federation

        if len(node_ids) != cfg.num_sites:
            raise ConfigError(
                f"num-sites is {cfg.num_sites} but {len(node_ids)} SuperNodes run "
                f'(flwr run . --federation-config "num-supernodes={cfg.num_sites}", or '
                f"--run-config 'num-sites={len(node_ids)}')"
            )
        generate_federation(
            cfg.work_path() / "data",
            sites=cfg.num_sites,
            cases_per_site=cfg.cases_per_site,
            shape=(cfg.grid_size,) * 3,
            seed=cfg.seed,
        )
    model_seed = initial_model_seed(cfg)
    log(logging.INFO, "secure_fl: initial model seed %d (run config seed %d)", model_seed, cfg.seed)
    arrays = start = initial_arrays(cfg, seed=model_seed)
    rounds: list[dict[str, Any]] = []
    for r in range(1, cfg.num_server_rounds + 1):
        config = ConfigRecord({"server-round": r, "num-server-rounds": cfg.num_server_rounds})
        try:
            result = workflow.run_round(grid, arrays=arrays, config=config, round_index=r)
        except ThresholdError as exc:
            rounds.append({"round": r, "aborted": str(exc)})
            log(logging.INFO, "secure_fl: round %d aborted, model unchanged: %s", r, exc)
            continue
        if result.mean is None:
            raise ConfigError(f"protocol {cfg.protocol!r} released no mean to the server")
        arrays = add_arrays(arrays, result.mean)
        log(
            logging.INFO,
            "secure_fl: round %d: survivors %s, dropped %s, excluded %s",
            r,
            sorted(result.outcome.survivors),
            sorted(result.outcome.dropped),
            sorted(result.outcome.excluded),
        )
        rounds.append(
            {
                "round": r,
                "survivors": sorted(result.outcome.survivors),
                "dropped": sorted(result.outcome.dropped),
                "excluded": sorted(result.outcome.excluded),
                "weights": {str(k): v for k, v in result.weights.items()},
                "metrics": {str(k): dict(v) for k, v in result.metrics.items()},
                "seconds": result.seconds,
                "bytes_to_sites": result.bytes_to_sites,
                "bytes_from_sites": result.bytes_from_sites,
            }
        )
    dice, n_val = _evaluate_global(grid, arrays, node_ids, cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else cfg.work_path() / "out" / f"run-{context.run_id}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.npz", "wb") as fh:
        np.savez(fh, **{str(k): v.numpy() for k, v in arrays.items()})
    change = flatten(arrays, where="model")[0] - flatten(start, where="initial model")[0]
    summary = {
        "protocol": cfg.protocol,
        "num_server_rounds": cfg.num_server_rounds,
        "seed": cfg.seed,
        "initial_model_seed": model_seed,
        "rounds": rounds,
        "final": {"val_dice": dice, "val_cases": n_val},
        "model_change_l2": float(np.linalg.norm(change)),
    }
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    log(logging.INFO, "secure_fl: final model and metrics written to %s", out)
    return out


def make_monai_server_app(*, defaults: Mapping[str, Any] | None = None) -> Any:
    """A Flower ``ServerApp`` whose ``@app.main()`` is :func:`run_server` (``defaults``: run
    config values used where the run config has none)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        run_server(grid, context, defaults)

    return app


__all__ = [
    "FEDERATION_INDEX",
    "PROTOCOLS",
    "WORKDIR_ENV",
    "AppConfig",
    "evaluate_fn",
    "federation_for_run",
    "initial_arrays",
    "make_monai_client_app",
    "make_monai_server_app",
    "merged_config",
    "read_federation_index",
    "resolve_site",
    "run_server",
    "simulation_dir",
    "simulation_site",
    "train_fn",
    "write_federation_index",
]
