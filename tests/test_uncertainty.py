"""Tests for the per-study uncertainty of a predicted mask."""

from __future__ import annotations

import numpy as np

from fewlabel.inference.uncertainty import mask_uncertainty


def _probs(foreground: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - foreground, foreground])


def test_uncertainty_is_the_doubtful_share_of_the_candidate_voxels():
    fg = np.zeros((10, 10))
    assert mask_uncertainty(_probs(fg)) == 0.0  # confidently lesion-free
    fg[2:6, 2:6] = 0.99  # 16 sure lesion voxels
    assert mask_uncertainty(_probs(fg)) == 0.0
    fg[2:6, 6] = 0.6  # 4 doubtful lesion voxels (top class 0.6 < 0.75)
    fg[8, 0:4] = 0.4  # 4 doubtful background voxels (top class 0.6)
    assert mask_uncertainty(_probs(fg)) == 8 / 24
    # The confident background around them does not count: padding the study changes nothing.
    assert mask_uncertainty(_probs(np.pad(fg, 20))) == 8 / 24
    assert mask_uncertainty(_probs(np.full((4, 4), 0.5))) == 1.0


def test_uncertainty_of_several_classes_uses_the_most_probable_one():
    probs = np.zeros((3, 2, 2))
    probs[:, 0, 0] = [0.1, 0.45, 0.45]  # split between two lesion classes: doubtful
    probs[:, 0, 1] = [0.1, 0.8, 0.1]  # sure class 1
    probs[:, 1, :] = [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]  # sure background
    assert mask_uncertainty(probs) == 0.5
    assert mask_uncertainty(probs, confident=0.9) == 1.0


def test_correlation_with_dice_ranks_cases_per_class_and_skips_what_it_cannot_rank():
    from fewlabel.inference.uncertainty import uncertainty_dice_correlation
    from fewlabel.metrics.segmentation import CaseResult

    cases = [
        CaseResult(f"c{i}", {"dice": {1: 1.0 - u, 2: 0.5, 3: float("nan") if i else 0.3}}, uncertainty=u)
        for i, u in enumerate([0.1, 0.4, 0.2, 0.8])
    ]
    cases.append(CaseResult("unscored", {"dice": {1: 0.0}}))  # no uncertainty: left out
    rho = uncertainty_dice_correlation(cases, {1: "ggo", 2: "consolidation", 3: "infection"})
    # Dice falls exactly as uncertainty rises; a constant Dice or one defined once cannot be ranked.
    assert rho == {"ggo": -1.0}
