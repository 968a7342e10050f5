"""Dice evaluation with MONAI's metric and sliding-window inference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secure_fl.training.model import ModelConfig, State, build_unet, set_state
from secure_fl.training.progress import track


def dice_per_case(
    dataset: Any,
    states: Sequence[State],
    *,
    model_config: ModelConfig,
    roi_size: Sequence[int],
    device: Any,
    sw_batch_size: int = 4,
    progress: bool | None = None,
    progress_desc: str = "Dice",
) -> list[float]:
    """Whole-tumour Dice of each case of ``dataset``.

    With several ``states`` the prediction is their ensemble: the mean of the models' softmax
    probabilities (Chang et al. 2018). Inference slides a window of ``roi_size`` over the whole
    volume. A case whose ground truth and prediction are both empty scores 1.0. A progress bar
    labelled ``progress_desc`` counts the cases (``progress``: True/False, or None for only when
    stderr is a terminal; :mod:`secure_fl.training.progress`).
    """
    import torch
    from monai.inferers.utils import sliding_window_inference
    from monai.metrics.meandice import DiceMetric

    models = []
    for state in states:
        net = build_unet(model_config).to(device)
        set_state(net, state)
        net.eval()
        models.append(net)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    scores: list[float] = []
    with torch.no_grad():
        cases = range(len(dataset))
        for index in track(cases, desc=progress_desc, unit="case", enabled=progress):
            item = dataset[index]
            image = item["image"].unsqueeze(0).to(device)
            label = item["label"].unsqueeze(0).to(device)
            probs = None
            for net in models:
                logits = sliding_window_inference(
                    image, tuple(roi_size), sw_batch_size, net, overlap=0.25
                )
                p = torch.softmax(torch.as_tensor(logits), dim=1)
                probs = p if probs is None else probs + p
            assert probs is not None
            pred = probs.argmax(dim=1, keepdim=True)
            pred_onehot = torch.cat([pred == 0, pred == 1], dim=1).float()
            gt = (label > 0.5).long()
            gt_onehot = torch.cat([gt == 0, gt == 1], dim=1).float()
            metric.reset()  # type: ignore[no-untyped-call]
            value = torch.as_tensor(metric(y_pred=pred_onehot, y=gt_onehot))
            scores.append(float(value.detach().cpu().reshape(-1)[0]))
    return scores
