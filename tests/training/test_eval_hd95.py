"""Hausdorff 95 beside Dice: known values on synthetic cubes, the stated values for empty masks,
and one inference per case giving both (secure_fl.training.evaluation)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from secure_fl.errors import ConfigError
from secure_fl.training.evaluation import case_scores, hausdorff95, whole_tumour_dice


def _probs(mask: torch.Tensor) -> torch.Tensor:
    """Softmax-like (1, 2, *spatial) probabilities whose argmax is ``mask``."""
    fg = mask.float()[None, None]
    return torch.cat([1 - fg, fg], dim=1)


def _label(mask: torch.Tensor) -> torch.Tensor:
    return mask.float()[None, None]


def _cube(start: tuple[int, int, int], side: int, shape: int = 24) -> torch.Tensor:
    m = torch.zeros(shape, shape, shape, dtype=torch.bool)
    x, y, z = start
    m[x : x + side, y : y + side, z : z + side] = True
    return m


def test_hd95_of_two_cubes_has_the_known_value() -> None:
    # Two 4-voxel cubes, 10 voxels apart along x: the surface voxels of each lie 7, 8, 9 or 10
    # voxels from the other cube's near face (16, 12, 12, 16 voxels): the 95th percentile is 10.
    pred, gt = _cube((4, 8, 8), 4), _cube((14, 8, 8), 4)
    assert hausdorff95(_probs(pred), _label(gt)) == pytest.approx(10.0)
    # In mm: 0.5 mm voxels along x halve it; y and z spacings do not matter here.
    assert hausdorff95(_probs(pred), _label(gt), (0.5, 2.0, 3.0)) == pytest.approx(5.0)
    # Identical masks: 0; a single voxel 4 voxels away along z with 1.5 mm slices: 6 mm.
    assert hausdorff95(_probs(gt), _label(gt)) == 0.0
    a, b = _cube((5, 5, 5), 1), _cube((5, 5, 9), 1)
    assert hausdorff95(_probs(a), _label(b), (1.0, 1.0, 1.5)) == pytest.approx(6.0)


def test_hd95_empty_masks_give_the_stated_values_not_a_crash() -> None:
    empty, cube = torch.zeros(24, 24, 24, dtype=torch.bool), _cube((4, 4, 4), 5)
    diagonal = math.sqrt(3 * 24**2)
    assert hausdorff95(_probs(empty), _label(empty)) == 0.0  # both empty: agreement
    assert hausdorff95(_probs(empty), _label(cube)) == pytest.approx(diagonal)  # missed tumour
    assert hausdorff95(_probs(cube), _label(empty)) == pytest.approx(diagonal)  # hallucinated
    spaced = math.sqrt((24 * 2.0) ** 2 + 24**2 + (24 * 0.5) ** 2)
    assert hausdorff95(_probs(cube), _label(empty), (2.0, 1.0, 0.5)) == pytest.approx(spaced)
    for bad in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ConfigError, match="spacing must give 3 positive numbers"):
            hausdorff95(_probs(cube), _label(cube), bad)


class _Oracle(torch.nn.Module):
    """A parameter-free 'network' whose foreground logit is the image: it predicts the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-10 * x[:, :1], 10 * x[:, :1]], dim=1)


def test_case_scores_give_dice_and_hd95_per_case_in_mm() -> None:
    gt = _cube((6, 6, 6), 6, shape=16)
    shifted = _cube((8, 6, 6), 6, shape=16)  # 2 voxels along x
    dataset: list[dict[str, Any]] = [
        {"image": _label(gt)[0], "label": _label(gt)[0], "case_id": "same", "site": "s"},
        {
            "image": _label(shifted)[0],
            "label": _label(gt)[0],
            "case_id": "shifted",
            "site": "s",
            "spacing": torch.tensor([3.0, 1.0, 1.0]),
        },
        {"image": torch.zeros(1, 16, 16, 16), "label": _label(gt)[0], "case_id": "missed"},
    ]
    kwargs: dict[str, Any] = {"model_factory": _Oracle, "roi_size": (8, 8, 8), "device": "cpu"}
    rows = case_scores(dataset, [{}], **kwargs)
    assert [r["case_id"] for r in rows] == ["same", "shifted", "missed"]
    assert rows[0]["dice"] == pytest.approx(1.0) and rows[0]["hd95"] == 0.0
    assert rows[1]["dice"] == pytest.approx(whole_tumour_dice(_probs(shifted), _label(gt)))
    assert rows[1]["hd95"] == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert not rows[1]["hd95_empty"]
    assert rows[2]["dice"] == 0.0 and rows[2]["hd95_empty"]
    assert rows[2]["hd95"] == pytest.approx(math.sqrt(3 * 16**2))
    voxels = case_scores(dataset, [{}], hd95_units="voxel", **kwargs)
    assert voxels[1]["hd95"] == pytest.approx(2.0)
    assert case_scores(dataset, [], **kwargs) == []
    with pytest.raises(ConfigError, match="hd95_units must be 'mm' or 'voxel'"):
        case_scores(dataset, [{}], hd95_units="cm", **kwargs)
