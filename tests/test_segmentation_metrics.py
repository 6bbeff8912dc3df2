"""Segmentation metrics on hand-built masks whose values are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewlabel.metrics.segmentation import (
    CaseResult,
    class_names_with_merge,
    continuous_dice_score,
    describe,
    dice_score,
    evaluate_case,
    overlay_cases,
    per_class_dice,
    rank_cases,
    slice_dice,
    summarize,
    vol_dice,
)

# 2D case with classes 0 (background), 1 and 2
GT_2D = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0]])
PRED_2D = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 0], [0, 0, 2, 0]])


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """Slice 0: 8 voxels predicted exactly; slice 1: one voxel each, disjoint; slice 2 empty."""
    gt = np.zeros((4, 4, 3), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[:2, :, 0] = 1
    pred[:2, :, 0] = 1
    gt[3, 3, 1] = 1
    pred[0, 0, 1] = 1
    return pred, gt


def test_dice_empty_rules():
    empty = np.zeros((3, 3), dtype=bool)
    full = np.ones((3, 3), dtype=bool)
    assert math.isnan(dice_score(empty, empty))
    assert dice_score(full, empty) == 0.0
    assert dice_score(empty, full) == 0.0
    assert dice_score(full, full) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_score(empty, np.zeros((3, 4)))


def test_per_class_dice_hand_built_2d():
    dice = per_class_dice(PRED_2D, GT_2D, 3)
    # class 1: |G| 4, |P| 3, overlap 3; class 2: |G| 2, |P| 2, overlap 1; background: 10, 11, 9
    assert dice == pytest.approx({0: 18 / 21, 1: 6 / 7, 2: 0.5})
    with pytest.raises(ValueError, match="labels must lie"):
        per_class_dice(PRED_2D, GT_2D, 2)


def test_voldice_differs_from_mean_slice_dice():
    pred, gt = _volume()
    per_slice = slice_dice(pred, gt, 2, axis=2)
    assert per_slice.shape == (3, 2)
    np.testing.assert_allclose(per_slice[:, 1], [1.0, 0.0, np.nan])
    # whole study: overlap 8, |P| = |G| = 9 -> 16 / 18
    assert vol_dice(pred, gt, 2)[1] == pytest.approx(16 / 18)
    metrics = evaluate_case(pred, gt, 2)
    # mean over the two slices that hold the class (the empty slice is skipped): (1 + 0) / 2
    assert metrics["dice"][1] == pytest.approx(0.5)
    assert metrics["voldice"][1] == pytest.approx(16 / 18)
    assert set(metrics["dice"]) == {1}  # background left out by default


def test_slice_axis_is_respected():
    pred, gt = _volume()
    by_x = slice_dice(pred, gt, 2, axis=0)
    assert by_x.shape == (4, 2)
    # slices x=0: G 4 voxels (z=0), P 5 (4 + the stray voxel) -> 8/9; x=3: G has one voxel, P none
    assert by_x[0, 1] == pytest.approx(8 / 9)
    assert by_x[3, 1] == 0.0
    assert math.isnan(by_x[2, 1])


def test_class_absent_from_study_is_nan():
    gt = np.zeros((4, 4, 2), dtype=np.uint8)
    pred = np.zeros_like(gt)
    metrics = evaluate_case(pred, gt, 2)
    assert math.isnan(metrics["dice"][1]) and math.isnan(metrics["voldice"][1])
    pred[0, 0, 0] = 1
    metrics = evaluate_case(pred, gt, 2)
    assert metrics["dice"][1] == 0.0 and metrics["voldice"][1] == 0.0


def test_precision_and_sensitivity_hand_built():
    metrics = evaluate_case(PRED_2D, GT_2D, 3, spatial_dims=2, merge={"infection": [1, 2]})
    # class 1: 3 predicted, all right, of 4 true; class 2: 1 of 2 right, 1 of 2 found;
    # union: 4 of 5 predicted right, 4 of 6 true found
    assert metrics["precision"] == pytest.approx({1: 1.0, 2: 0.5, 3: 0.8})
    assert metrics["sensitivity"] == pytest.approx({1: 0.75, 2: 0.5, 3: 4 / 6})
    # a 3D study counts voxels over the whole volume: 8 of 9 right and 8 of 9 found
    pred, gt = _volume()
    metrics = evaluate_case(pred, gt, 2)
    assert metrics["precision"][1] == pytest.approx(8 / 9)
    assert metrics["sensitivity"][1] == pytest.approx(8 / 9)


def test_precision_and_sensitivity_empty_rules():
    gt = np.zeros((4, 4, 2), dtype=np.uint8)
    pred = np.zeros_like(gt)
    metrics = evaluate_case(pred, gt, 2)
    assert math.isnan(metrics["precision"][1]) and math.isnan(metrics["sensitivity"][1])
    pred[0, 0, 0] = 1  # a lesion predicted in a healthy study: wrong, but nothing to find
    metrics = evaluate_case(pred, gt, 2)
    assert metrics["precision"][1] == 0.0 and math.isnan(metrics["sensitivity"][1])
    metrics = evaluate_case(gt, pred, 2)  # the lesion missed: nothing predicted, nothing found
    assert math.isnan(metrics["precision"][1]) and metrics["sensitivity"][1] == 0.0


def test_2d_case_and_merged_class():
    metrics = evaluate_case(PRED_2D, GT_2D, 3, spatial_dims=2, merge={"infection": [1, 2]})
    # union: |G| 6, |P| 5, overlap 4 -> 8/11; merged class takes index num_classes
    assert metrics["dice"] == pytest.approx({1: 6 / 7, 2: 0.5, 3: 8 / 11})
    assert metrics["voldice"] == metrics["dice"]
    assert class_names_with_merge(["bg", "ggo", "cons"], {"infection": [1, 2]}) == [
        "bg",
        "ggo",
        "cons",
        "infection",
    ]
    with pytest.raises(ValueError, match="foreground labels"):
        class_names_with_merge(["bg", "ggo"], {"infection": [1, 2]})
    with pytest.raises(ValueError, match="repeats"):
        class_names_with_merge(["bg", "ggo"], {"ggo": [1]})
    with pytest.raises(ValueError, match="expected 3D"):
        evaluate_case(PRED_2D, GT_2D, 3, spatial_dims=3)


def test_continuous_dice_score():
    gt = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    prob = np.zeros((3, 2, 4))
    prob[1] = 0.6 * gt  # confident-ish on the true region only
    prob[0] = 1.0 - prob[1]
    cdice = continuous_dice_score(prob, gt, 3)
    assert cdice[1] == pytest.approx(1.0)  # overlap is perfect; soft Dice would say 0.75
    assert math.isnan(cdice[2])  # absent from truth and never the arg-max
    prob[2, 1, 3], prob[0, 1, 3] = 0.9, 0.1
    assert continuous_dice_score(prob, gt, 3)[2] == 0.0  # predicted, but absent from truth
    metrics = evaluate_case(gt, gt, 3, prob=prob, spatial_dims=2, merge={"any": [1, 2]})
    assert metrics["cdice"][1] == pytest.approx(1.0)
    # merged probability = 0.6 on the truth + 0.9 outside: Σab = 1.2, c = 0.6, Σa = 2, Σb = 2.1
    assert metrics["cdice"][3] == pytest.approx(2.4 / (1.2 + 2.1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        continuous_dice_score(prob * 2, gt, 3)


def test_summary_statistics_on_known_numbers():
    values = [0.6, 0.7, 0.8, math.nan]
    cases = [CaseResult(f"c{i}", {"dice": {1: v, 2: 0.5, 3: 0.9}}) for i, v in enumerate(values)]
    summary = summarize(cases, ["background", "a", "b", "merged"], foreground=[1, 2])
    s = summary["metrics"]["dice"][1]
    assert s["mean"] == pytest.approx(0.7)
    assert s["median"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.1)
    assert s["n"] == 3
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, df=2) from a t table
    assert s["ci95"] == pytest.approx([0.7 - half, 0.7 + half], abs=1e-6)
    # foreground mean is the mean of the class means of 1 and 2 only (merged 3 left out)
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.7 + 0.5) / 2)
    assert summary["foreground_per_case"]["dice"]["n"] == 4
    assert summary["n_cases"] == 4
    assert summary["classes"][3] == "merged"


def test_describe_edge_cases():
    assert describe([math.nan])["n"] == 0 and math.isnan(describe([])["mean"])
    one = describe([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["std"])
    assert describe([0.0, 1.0])["ci95"] == [0.0, 1.0]  # clipped to the metric range


def test_the_median_picture_is_the_median_of_the_foreground_classes_not_of_merged_ones():
    # Class 3 is the union of classes 1 and 2. Case A confuses its two classes, so its union is
    # nearly right: counted in, it would rank A second and make C the median.
    scores = {"B": 0.5, "C": 0.4, "E": 0.3, "A": 0.2, "D": 0.1}
    cases = [
        CaseResult(name, {"dice": {1: s, 2: s, 3: 0.95 if name == "A" else s}}) for name, s in scores.items()
    ]
    assert [c.case_id for c in overlay_cases(cases, [1, 2])] == ["B", "E", "D"]
    assert [c.case_id for c in overlay_cases(cases, [1, 2], count=2)] == ["B", "D"]
    assert [c.case_id for c in overlay_cases(cases, [1, 2], count=1)] == ["B"]
    assert [c.case_id for c in overlay_cases(cases[:1], [1, 2])] == ["B"]
    assert overlay_cases(cases, [1, 2], count=0) == []


def test_rank_cases_best_first_undefined_last():
    cases = [
        CaseResult("mid", {"dice": {1: 0.5}}),
        CaseResult("none", {"dice": {1: math.nan}}),
        CaseResult("best", {"dice": {1: 0.9}}),
        CaseResult("worst", {"dice": {1: 0.1}}),
    ]
    assert [c.case_id for c in rank_cases(cases)] == ["best", "mid", "worst", "none"]


def test_the_worst_picture_is_the_worst_scored_case_not_one_with_nothing_to_score():
    cases = [
        CaseResult("good", {"dice": {1: 0.9}}),
        CaseResult("mid", {"dice": {1: 0.5}}),
        CaseResult("bad", {"dice": {1: 0.1}}),
        CaseResult("empty", {"dice": {1: math.nan}}),  # no lesion, none predicted
    ]
    assert [c.case_id for c in overlay_cases(cases, [1])] == ["good", "mid", "bad"]
    assert [c.case_id for c in overlay_cases(cases[3:], [1])] == ["empty"]  # nothing scored: still a picture
