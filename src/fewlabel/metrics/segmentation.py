"""Segmentation metrics per case and their summary over a test set.

MONAI's ``DiceMetric`` works on batched one-hot tensors; the per-slice Dice, VolDice,
continuous Dice of probability maps, merged ("any lesion") classes and nnU-Net-style
per-case summaries below are not in MONAI, so they are written here on NumPy arrays.

Rules (they decide what a number means, so they are fixed here):

- **Dice of one binary mask pair**: ``2|P∩G| / (|P|+|G|)``; NaN when both are empty (nothing to
  find, nothing found: undefined, as in nnU-Net); 0.0 when exactly one is empty.
- **"dice" of a case**: for a 3D study, the mean of the per-slice Dice over the slices (along
  ``axis``) where prediction or ground truth holds the class (slices empty in both are skipped;
  NaN when the class is absent from the whole study and its prediction); for a 2D image, the
  image's Dice.
- **"voldice"**: the Dice of the whole 3D study as one mask, so large slices weigh more than in
  the slice mean. For a 2D image it equals the image's Dice.
- **"precision"** and **"sensitivity"**: voxel counts over the whole study/image,
  ``|P∩G| / |P|`` (the share of the predicted class that is right) and ``|P∩G| / |G|`` (the
  share of the true class that is found). NaN when the denominator is empty: precision of a
  class predicted nowhere, sensitivity of a class absent from the ground truth. They tell why
  a Dice is low: leaks into healthy tissue lower precision, missed lesions lower sensitivity.
- **"cdice"**: continuous Dice (Shamir et al. 2019) of the class probability map against the
  ground truth over the whole study/image. When the class is absent from the ground truth the
  probabilities alone cannot score it (any positive probability gives 0), so the hard rule of
  Dice is used on the arg-max prediction: NaN if the class is predicted nowhere, 0.0 otherwise.
- **merged classes** (``merge={"infection": [1, 2]}``): the union of the listed labels is scored
  like one more class, with index ``num_classes + i`` for the i-th merged name. They are left out
  of the foreground mean, which would otherwise count their voxels twice.
- **Summaries** aggregate each metric and class over the cases with ``nanmean`` (cases where the
  class is undefined are left out, as nnU-Net does); ``std`` is the sample standard deviation
  (ddof=1) and ``ci95`` the two-sided 95% Student-t interval of the mean, clipped to [0, 1]
  (the range of every metric here). ``foreground_mean`` is the mean of the foreground class
  means (the nnU-Net ``foreground_mean``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "CI_METHOD",
    "CaseResult",
    "case_foreground_score",
    "class_names_with_merge",
    "continuous_dice_score",
    "describe",
    "dice_score",
    "evaluate_case",
    "overlay_cases",
    "per_class_dice",
    "rank_cases",
    "slice_dice",
    "summarize",
    "vol_dice",
]

CI_METHOD = "two-sided 95% Student-t interval of the mean over cases, clipped to [0, 1]"


@dataclass
class CaseResult:
    """Metrics of one case.

    Attributes:
        case_id: the case name (file name without extension).
        metrics: metric name (``dice``, ``voldice``, ``cdice``) → class index → value (NaN = undefined).
        prediction_file: where the prediction came from, when known.
        reference_file: where the ground truth came from, when known.
        uncertainty: :func:`fewlabel.inference.uncertainty.mask_uncertainty` of the
            prediction, when it was made from probabilities.
    """

    case_id: str
    metrics: dict[str, dict[int, float]]
    prediction_file: str | None = None
    reference_file: str | None = None
    uncertainty: float | None = None


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two binary masks.

    Args:
        pred: predicted mask (non-zero = inside).
        gt: ground-truth mask of the same shape.

    Returns:
        ``2|P∩G| / (|P|+|G|)``; NaN when both masks are empty, 0.0 when only one is.

    Raises:
        ValueError: if the shapes differ.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_same_shape(pred, gt)
    return _dice_from_counts(*_overlap_counts(pred.astype(bool), gt.astype(bool)))


def per_class_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of every class of two label maps (background included).

    Args:
        pred_labels: predicted labels, integers in ``[0, num_classes)``.
        gt_labels: ground-truth labels of the same shape.
        num_classes: number of classes, background included.

    Returns:
        Class index → Dice (NaN where the class is absent from both).

    Raises:
        ValueError: on different shapes or labels outside ``[0, num_classes)``.
    """
    pred_labels, gt_labels = _check_labels(pred_labels, gt_labels, num_classes)
    return {k: dice_score(pred_labels == k, gt_labels == k) for k in range(num_classes)}


def slice_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int, axis: int = 2) -> np.ndarray:
    """Dice of every class on every slice of a 3D study.

    Args:
        pred_labels: predicted labels ``(X, Y, Z)``.
        gt_labels: ground-truth labels of the same shape.
        num_classes: number of classes, background included.
        axis: the slicing axis.

    Returns:
        Array ``(num_slices, num_classes)``; NaN where a slice holds the class in neither map.

    Raises:
        ValueError: on different shapes, non-3D input or labels outside ``[0, num_classes)``.
    """
    pred_labels, gt_labels = _check_labels(pred_labels, gt_labels, num_classes)
    if pred_labels.ndim != 3:
        raise ValueError(f"slice_dice needs 3D label maps, got shape {pred_labels.shape}")
    return np.stack(
        [_slice_dice_binary(pred_labels == k, gt_labels == k, axis) for k in range(num_classes)], axis=1
    )


def vol_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of every class over the whole study (VolDice).

    Args:
        pred_labels: predicted labels.
        gt_labels: ground-truth labels of the same shape.
        num_classes: number of classes, background included.

    Returns:
        Class index → Dice of the study as one mask (NaN where the class is absent from both).

    Raises:
        ValueError: on different shapes or labels outside ``[0, num_classes)``.
    """
    return per_class_dice(pred_labels, gt_labels, num_classes)


def continuous_dice_score(prob: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Continuous Dice of every class of a probability map.

    Args:
        prob: class probabilities ``(num_classes, *gt_labels.shape)`` in [0, 1].
        gt_labels: ground-truth labels.
        num_classes: number of classes, background included.

    Returns:
        Class index → cDC. Where the class is absent from the ground truth: NaN if the arg-max
        of ``prob`` never picks it, else 0.0 (see the module rules).

    Raises:
        ValueError: on mismatched shapes, probabilities outside [0, 1] or bad labels.
    """
    prob = np.asarray(prob, dtype=np.float64)
    gt_labels = np.asarray(gt_labels)
    if prob.shape != (num_classes, *gt_labels.shape):
        raise ValueError(
            f"probabilities must have shape (num_classes, *labels) = {(num_classes, *gt_labels.shape)}, got {prob.shape}"
        )
    if prob.size and (prob.min() < -1e-6 or prob.max() > 1 + 1e-6):
        raise ValueError(f"probabilities must lie in [0, 1], got [{prob.min():.4g}, {prob.max():.4g}]")
    _check_label_range(gt_labels, num_classes)
    hard = prob.argmax(axis=0)
    return {k: _cdice_binary(prob[k], gt_labels == k, hard == k) for k in range(num_classes)}


def class_names_with_merge(classes: Sequence[str], merge: Mapping[str, Sequence[int]] | None) -> list[str]:
    """Class names followed by the merged-class names, in index order.

    Args:
        classes: names of the label values (index = value, 0 = background).
        merge: merged class name → the label values it unites.

    Returns:
        The names of every index :func:`evaluate_case` reports.

    Raises:
        ValueError: if a merged name repeats a class name or lists labels that do not exist.
    """
    names = list(classes)
    for name, members in (merge or {}).items():
        if name in names:
            raise ValueError(f"merged class {name!r} repeats an existing class name")
        bad = [m for m in members if not 0 < int(m) < len(classes)]
        if bad or not members:
            raise ValueError(
                f"merged class {name!r} must list foreground labels in [1, {len(classes) - 1}], got {list(members)}"
            )
        names.append(name)
    return names


def evaluate_case(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    prob: np.ndarray | None = None,
    spatial_dims: int = 3,
    axis: int = 2,
    merge: Mapping[str, Sequence[int]] | None = None,
    include_background: bool = False,
) -> dict[str, dict[int, float]]:
    """All metrics of one case (rules in the module docstring).

    Args:
        pred_labels: predicted labels, ``(X, Y, Z)`` or ``(H, W)``.
        gt_labels: ground-truth labels of the same shape.
        num_classes: number of classes, background included.
        prob: optional class probabilities ``(num_classes, *shape)``; adds ``cdice``.
        spatial_dims: 3 for a study (slice Dice + VolDice) or 2 for an image.
        axis: slicing axis of a 3D study.
        merge: merged classes, name → label values (their union is scored as class
            ``num_classes + i``).
        include_background: also score class 0.

    Returns:
        ``{"dice": {k: v}, "voldice": {k: v}, "precision": {k: v}, "sensitivity": {k: v}
        [, "cdice": {k: v}]}``.

    Raises:
        ValueError: on mismatched shapes, a dimensionality other than ``spatial_dims``, or
            labels outside ``[0, num_classes)``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    pred_labels, gt_labels = _check_labels(pred_labels, gt_labels, num_classes)
    if gt_labels.ndim != spatial_dims:
        raise ValueError(f"expected {spatial_dims}D label maps, got shape {gt_labels.shape}")
    groups = _class_groups(num_classes, merge, include_background)

    result: dict[str, dict[int, float]] = {"dice": {}, "voldice": {}, "precision": {}, "sensitivity": {}}
    for index, members in groups.items():
        p, g = np.isin(pred_labels, members), np.isin(gt_labels, members)
        # One pass over the study gives the counts behind VolDice, precision and sensitivity.
        overlap, n_pred, n_gt = _overlap_counts(p, g)
        whole = _dice_from_counts(overlap, n_pred, n_gt)
        if spatial_dims == 3:
            per_slice = _slice_dice_binary(p, g, axis)
            result["dice"][index] = _nanmean(per_slice)
        else:
            result["dice"][index] = whole
        result["voldice"][index] = whole
        result["precision"][index] = overlap / n_pred if n_pred else math.nan
        result["sensitivity"][index] = overlap / n_gt if n_gt else math.nan

    if prob is not None:
        prob = np.asarray(prob, dtype=np.float64)
        if prob.shape != (num_classes, *gt_labels.shape):
            raise ValueError(
                f"probabilities must have shape {(num_classes, *gt_labels.shape)}, got {prob.shape}"
            )
        hard = prob.argmax(axis=0)
        result["cdice"] = {
            index: _cdice_binary(
                prob[list(members)].sum(axis=0), np.isin(gt_labels, members), np.isin(hard, members)
            )
            for index, members in groups.items()
        }
    return result


def case_foreground_score(
    case: CaseResult, metric: str = "dice", foreground: Sequence[int] | None = None
) -> float:
    """Mean of one metric over a case's foreground classes, used to rank cases.

    Args:
        case: the case.
        metric: the metric to average.
        foreground: class indices to average (default: every index >= 1 the case reports).

    Returns:
        The nanmean over those classes (NaN when all are undefined).
    """
    values = case.metrics.get(metric, {})
    keys = [k for k in values if k >= 1] if foreground is None else [k for k in foreground if k in values]
    return _nanmean(np.array([values[k] for k in keys], dtype=float))


def rank_cases(
    cases: Sequence[CaseResult], metric: str = "dice", foreground: Sequence[int] | None = None
) -> list[CaseResult]:
    """Cases from best to worst by their mean foreground score; undefined scores go last.

    Args:
        cases: the cases.
        metric: the metric ranked on.
        foreground: class indices averaged (see :func:`case_foreground_score`).

    Returns:
        The cases, best first (ties keep their input order).
    """
    scored = [(case_foreground_score(c, metric, foreground), i, c) for i, c in enumerate(cases)]
    defined = sorted((t for t in scored if not math.isnan(t[0])), key=lambda t: (-t[0], t[1]))
    undefined = [t for t in scored if math.isnan(t[0])]
    return [c for _, _, c in defined + undefined]


def overlay_cases(cases: Sequence[CaseResult], foreground: Sequence[int], count: int = 3) -> list[CaseResult]:
    """The best, median and worst cases by mean foreground Dice, for the report's pictures.

    They are ranked on the classes the report's captions average (``foreground``, merged
    classes left out), so the picture called "median" is the median case of its caption.
    Cases whose Dice is undefined (no foreground in truth or prediction) are left out unless
    no case has a Dice.

    Args:
        cases: the evaluated cases.
        foreground: class indices averaged.
        count: how many pictures: 1 (best), 2 (best and worst) or 3.

    Returns:
        Up to ``count`` distinct cases, best first.
    """
    ranked = rank_cases(cases, "dice", foreground)
    # A case with nothing to score (no lesion in truth or prediction) is neither best nor worst;
    # it is shown only when no case has a score.
    defined = [c for c in ranked if not math.isnan(case_foreground_score(c, "dice", foreground))]
    ranked = defined or ranked
    if count <= 0 or not ranked:
        return []
    picks = [ranked[0], ranked[(len(ranked) - 1) // 2], ranked[-1]] if count >= 3 else [ranked[0], ranked[-1]]
    return list({id(c): c for c in picks[: max(count, 1)]}.values())


def summarize(
    cases: Sequence[CaseResult], classes: Sequence[str], foreground: Sequence[int] | None = None
) -> dict:
    """Aggregate per-case metrics over a set of cases.

    Args:
        cases: per-case results.
        classes: class names, index = class index in the metrics (merged classes included).
        foreground: indices that make up ``foreground_mean`` (default: every index >= 1 of
            ``classes``; leave merged classes out).

    Returns:
        ``{"classes": {k: name}, "n_cases": N, "ci_method": str,
        "metrics": {metric: {k: {"mean", "median", "std", "n", "ci95": [lo, hi]}}},
        "foreground_mean": {metric: mean of the foreground class means},
        "foreground_per_case": {metric: the same statistics over each case's foreground mean}}``.
        Undefined values are NaN.
    """
    if foreground is None:
        foreground = list(range(1, len(classes)))
    metric_names: list[str] = []
    for case in cases:
        for name in case.metrics:
            if name not in metric_names:
                metric_names.append(name)

    per_metric: dict[str, dict[int, dict]] = {}
    fg_mean: dict[str, float] = {}
    fg_per_case: dict[str, dict] = {}
    for name in metric_names:
        indices = sorted({k for c in cases for k in c.metrics.get(name, {})})
        per_metric[name] = {
            k: describe([c.metrics.get(name, {}).get(k, math.nan) for c in cases]) for k in indices
        }
        class_means = [per_metric[name][k]["mean"] for k in foreground if k in per_metric[name]]
        fg_mean[name] = _nanmean(np.array(class_means, dtype=float))
        fg_per_case[name] = describe([case_foreground_score(c, name, foreground) for c in cases])
    return {
        "classes": {k: n for k, n in enumerate(classes)},
        "foreground": list(foreground),
        "n_cases": len(cases),
        "ci_method": CI_METHOD,
        "metrics": per_metric,
        "foreground_mean": fg_mean,
        "foreground_per_case": fg_per_case,
    }


def describe(values: Sequence[float]) -> dict:
    """Statistics of one metric over cases, NaNs left out.

    Args:
        values: per-case values (NaN = undefined for that case).

    Returns:
        ``{"mean", "median", "std", "n", "ci95": [lo, hi]}``; ``std`` and ``ci95`` need two
        defined values and are NaN otherwise.
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    if n == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "n": 0, "ci95": [math.nan, math.nan]}
    mean = float(arr.mean())
    if n < 2:
        std, ci = math.nan, [math.nan, math.nan]
    else:
        std = float(arr.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [max(0.0, mean - half), min(1.0, mean + half)]
    return {"mean": mean, "median": float(np.median(arr)), "std": std, "n": n, "ci95": ci}


def _class_groups(
    num_classes: int, merge: Mapping[str, Sequence[int]] | None, include_background: bool
) -> dict[int, list[int]]:
    class_names_with_merge([str(k) for k in range(num_classes)], merge)  # validates the merge
    groups = {k: [k] for k in range(0 if include_background else 1, num_classes)}
    for i, members in enumerate((merge or {}).values()):
        groups[num_classes + i] = sorted({int(m) for m in members})
    return groups


def _slice_dice_binary(p: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    # Counting per slice with one reduction over the in-plane axes avoids a Python loop over slices.
    other = tuple(a for a in range(p.ndim) if a != axis % p.ndim)
    inter = np.logical_and(p, g).sum(axis=other).astype(float)
    total = p.sum(axis=other).astype(float) + g.sum(axis=other).astype(float)
    out = np.full(total.shape, np.nan)
    np.divide(2.0 * inter, total, out=out, where=total > 0)
    return out


def _cdice_binary(b: np.ndarray, a: np.ndarray, predicted: np.ndarray) -> float:
    if not a.any():
        return math.nan if not predicted.any() else 0.0
    inter = float((a * b).sum())
    support = float((a * (b > 0)).sum())
    c = inter / support if support > 0 else 1.0
    return 2.0 * inter / (c * float(a.sum()) + float(b.sum()))


def _overlap_counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int]:
    """``|P∩G|``, ``|P|`` and ``|G|`` of two boolean masks."""
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g))


def _dice_from_counts(overlap: int, n_pred: int, n_gt: int) -> float:
    total = n_pred + n_gt
    return 2.0 * overlap / total if total else math.nan


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")


def _check_label_range(labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _check_labels(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_same_shape(pred, gt)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_label_range(pred, num_classes)
    _check_label_range(gt, num_classes)
    return pred, gt
