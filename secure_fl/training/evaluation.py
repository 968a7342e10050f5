"""Evaluation with sliding-window inference: whole-tumour Dice (MONAI's metric) by default, or any
per-case metric of any torch model; Dice and Hausdorff 95 together (:func:`case_scores`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from secure_fl.training.model import ModelConfig, State, build_unet, set_state
from secure_fl.training.progress import track

#: ``metric(probs, label) -> float``: one case's score from the (ensemble-mean) softmax
#: probabilities ``probs`` (1, C, *spatial) and its label ``label`` (1, 1, *spatial).
Metric = Callable[[Any, Any], float]


def whole_tumour_dice(probs: Any, label: Any) -> float:
    """Dice of the foreground (class 1 of the argmax of ``probs``) against ``label > 0.5``; a
    case whose ground truth and prediction are both empty scores 1.0 (MONAI's ``DiceMetric``)."""
    import torch
    from monai.metrics.meandice import DiceMetric

    pred = probs.argmax(dim=1, keepdim=True)
    pred_onehot = torch.cat([pred == 0, pred == 1], dim=1).float()
    gt = (label > 0.5).long()
    gt_onehot = torch.cat([gt == 0, gt == 1], dim=1).float()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    value = torch.as_tensor(metric(y_pred=pred_onehot, y=gt_onehot))
    return float(value.detach().cpu().reshape(-1)[0])


def hausdorff95(probs: Any, label: Any, spacing: Sequence[float] | None = None) -> float:
    """The 95th-percentile symmetric Hausdorff distance between the foreground of the argmax of
    ``probs`` (1, C, *spatial) and ``label > 0.5`` (1, 1, *spatial): MONAI's
    ``compute_hausdorff_distance`` (Euclidean, ``percentile=95``), in mm when ``spacing`` gives
    the voxel size along each axis, else in voxels.

    Empty masks (where MONAI returns inf or NaN): both empty scores 0.0 (perfect agreement); one
    of them empty (a missed tumour or a hallucinated one) scores the diagonal of the volume,
    ``sqrt(sum((size_i * spacing_i)^2))``, the largest distance possible on the grid (the
    BraTS challenge's convention of a worst-case value, so that means stay finite and penalise
    the miss). Guarantee: the result is finite and >= 0.

    Errors: ConfigError if ``spacing`` does not give one positive number per spatial axis.
    """
    import torch
    from monai.metrics.hausdorff_distance import compute_hausdorff_distance

    from secure_fl.errors import ConfigError

    shape = tuple(int(s) for s in label.shape[2:])
    if spacing is None:
        step = [1.0] * len(shape)
    else:
        step = [float(v) for v in spacing]
        if len(step) != len(shape) or not all(math.isfinite(v) and v > 0 for v in step):
            raise ConfigError(
                f"hausdorff95: spacing must give {len(shape)} positive numbers, got {spacing!r}"
            )
    pred = probs.argmax(dim=1, keepdim=True) == 1
    gt = label > 0.5
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if not has_pred or not has_gt:
        return math.sqrt(sum((n * v) ** 2 for n, v in zip(shape, step, strict=True)))
    pred_onehot = torch.cat([~pred, pred], dim=1).float()
    gt_onehot = torch.cat([~gt, gt], dim=1).float()
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            pred_onehot, gt_onehot, include_background=False, percentile=95, spacing=step
        )
    return float(torch.as_tensor(value).detach().cpu().reshape(-1)[0])


def _predictions(
    dataset: Any,
    states: Sequence[State],
    *,
    model_config: ModelConfig | None,
    model_factory: Callable[[], Any] | None,
    roi_size: Sequence[int],
    device: Any,
    sw_batch_size: int,
    progress: bool | None,
    progress_desc: str,
) -> Iterator[tuple[Any, Any, Any]]:
    """(item, probs, label) per case: the ensemble-mean softmax of the ``states``' networks
    (``model_factory()``, default the UNet of ``model_config``) by sliding-window inference;
    nothing without states."""
    import torch
    from monai.inferers.utils import sliding_window_inference

    if not states:
        return
    config = model_config if model_config is not None else ModelConfig()
    factory = model_factory if model_factory is not None else (lambda: build_unet(config))
    models = []
    for state in states:
        net = factory().to(device)
        set_state(net, state)
        net.eval()
        models.append(net)
    with torch.no_grad():
        cases = range(len(dataset))
        for index in track(cases, desc=progress_desc, unit="case", enabled=progress):
            item = dataset[index]
            image = item["image"].unsqueeze(0).to(device)
            label = item["label"].unsqueeze(0).to(device)
            probs: Any = None
            for net in models:
                logits = sliding_window_inference(
                    image, tuple(roi_size), sw_batch_size, net, overlap=0.25
                )
                p = torch.softmax(torch.as_tensor(logits), dim=1)
                probs = p if probs is None else probs + p
            yield item, probs / len(models), label


def case_scores(
    dataset: Any,
    states: Sequence[State],
    *,
    model_config: ModelConfig | None = None,
    model_factory: Callable[[], Any] | None = None,
    roi_size: Sequence[int],
    device: Any,
    hd95_units: str = "mm",
    sw_batch_size: int = 4,
    progress: bool | None = None,
    progress_desc: str = "Dice, HD95",
) -> list[dict[str, Any]]:
    """Dice (:func:`whole_tumour_dice`: the target region against the foreground class) and
    Hausdorff 95 (:func:`hausdorff95`) of each case of ``dataset`` under the ensemble of
    ``states`` (as :func:`dice_per_case`), one inference per case: ``[{"case_id", "site",
    "dice", "hd95", "hd95_empty"}, ...]`` in dataset order (``hd95_empty``: True when the
    prediction or the label was empty, so that HD95 holds the stated 0 or diagonal value).

    ``hd95_units``: ``"mm"`` uses each item's ``spacing`` (mm per grid voxel, written by
    :func:`secure_fl.data.transforms.eval_transforms`; voxels when an item has none),
    ``"voxel"`` counts grid voxels. Errors: ConfigError for another ``hd95_units`` or a state
    that does not fit the network.
    """
    from secure_fl.errors import ConfigError

    if hd95_units not in ("mm", "voxel"):
        raise ConfigError(f"hd95_units must be 'mm' or 'voxel', got {hd95_units!r}")
    out: list[dict[str, Any]] = []
    for item, probs, label in _predictions(
        dataset,
        states,
        model_config=model_config,
        model_factory=model_factory,
        roi_size=roi_size,
        device=device,
        sw_batch_size=sw_batch_size,
        progress=progress,
        progress_desc=progress_desc,
    ):
        spacing = item.get("spacing") if hd95_units == "mm" else None
        step = None if spacing is None else [float(v) for v in spacing]
        pred_any = bool((probs.argmax(dim=1) == 1).any())
        out.append(
            {
                "case_id": str(item.get("case_id", len(out))),
                "site": str(item.get("site", "")),
                "dice": whole_tumour_dice(probs, label),
                "hd95": hausdorff95(probs, label, step),
                "hd95_empty": not (pred_any and bool((label > 0.5).any())),
            }
        )
    return out


def dice_per_case(
    dataset: Any,
    states: Sequence[State],
    *,
    model_config: ModelConfig | None = None,
    model_factory: Callable[[], Any] | None = None,
    metric: Metric | None = None,
    roi_size: Sequence[int],
    device: Any,
    sw_batch_size: int = 4,
    progress: bool | None = None,
    progress_desc: str = "Dice",
) -> list[float]:
    """``metric`` (default :func:`whole_tumour_dice`) of each case of ``dataset``.

    The network is ``model_factory()`` (default: the UNet of ``model_config``, or of the default
    :class:`ModelConfig`) loaded with each state. With several ``states`` the prediction is their
    ensemble: the mean of the models' softmax probabilities (Chang et al. 2018). Inference slides
    a window of ``roi_size`` over the whole volume. A progress bar labelled ``progress_desc``
    counts the cases (``progress``: True/False, or None for only when stderr is a terminal;
    :mod:`secure_fl.training.progress`). Errors: ConfigError when a state does not fit the
    network (:func:`~secure_fl.training.model.set_state`).
    """
    score = metric if metric is not None else whole_tumour_dice
    predictions = _predictions(
        dataset,
        states,
        model_config=model_config,
        model_factory=model_factory,
        roi_size=roi_size,
        device=device,
        sw_batch_size=sw_batch_size,
        progress=progress,
        progress_desc=progress_desc,
    )
    return [float(score(probs, label)) for _, probs, label in predictions]
