"""Shared helpers of the workflow and simulate tests: a provisioned federation on a LocalGrid."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secure_fl.integrations.flower.grid import LocalGrid
from secure_fl.integrations.flower.mod import make_secure_fl_mod
from secure_fl.integrations.flower.provision import FlowerFederation, provision_flower
from secure_fl.integrations.flower.simulate import DropAtInput, SiteByPartition, TrainFromFile
from secure_fl.rounds.local import in_process_policy
from secure_fl.rounds.spec import AggregationSpec

UPDATE = "update.npy"
WEIGHT = "weight.npy"


def provision(
    spec: AggregationSpec, root: Path, n: int, *, vector_length: int | None = None
) -> FlowerFederation:
    """n sites site-1..site-n pinning the in-process policy of ``spec``."""
    policy = dataclasses.replace(in_process_policy(spec), vector_length=vector_length)
    preset = (spec.preset or "n8192-add") if spec.protocol == "ckks" else None
    return provision_flower(
        [f"site-{i + 1}" for i in range(n)], root / "fed", policy=policy, ckks_preset=preset
    )


def write_updates(root: Path, updates: Sequence[np.ndarray], weights: Sequence[float]) -> list[str]:
    """Each node's folder holding its update and weight (TrainFromFile reads them)."""
    folders = []
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        folder = root / "updates" / f"node-{i}"
        folder.mkdir(parents=True)
        np.save(folder / UPDATE, np.asarray(update, dtype=np.float64))
        np.save(folder / WEIGHT, np.float64(weight))
        folders.append(str(folder))
    return folders


def local_grid(
    fed: FlowerFederation,
    folders: Sequence[str],
    *,
    protocol: str,
    dropped: Sequence[int] = (),
    train: Any = None,
    grid_class: type[LocalGrid] = LocalGrid,
    sites: Sequence[int] | None = None,
    configs: Sequence[str] | None = None,
) -> LocalGrid:
    """A LocalGrid whose node i is site-(i+1) (or site-``sites[i]``), training with ``train``
    (default: its update from ``folders``), nodes ``dropped`` (0-based) failing at their
    masked input; ``configs`` (site config paths, one per node) replaces both."""
    numbers = list(sites) if sites is not None else [i + 1 for i in range(len(folders))]
    if configs is None:
        configs = [str(fed.site_configs[f"site-{i}"]) for i in numbers]
    mods: list[Any] = [DropAtInput(dropped, protocol), make_secure_fl_mod(SiteByPartition(configs))]
    app = ClientApp(mods=mods)
    app.train()(train if train is not None else TrainFromFile(folders))
    return grid_class(app, len(folders))


def delta_train(updates: Mapping[int, Mapping[str, np.ndarray]]) -> Any:
    """A train function returning the received global model plus node i's update."""

    def train(message: Message, context: Any) -> Message:
        index = int(context.node_config["partition-id"])
        sent = message.content.array_records["arrays"]
        out = {k: Array(sent[k].numpy() + updates[index][k]) for k in sent}
        content = RecordDict(
            {"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 10 + index})}
        )
        return Message(content, reply_to=message)

    return train
