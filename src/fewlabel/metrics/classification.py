"""Classification metrics for graded labels (e.g. diabetic-retinopathy grades).

Pure functions on NumPy arrays; every result is JSON-serialisable (plain floats, ints,
lists, ``None``). A metric that is undefined for the data at hand (a class absent from the
ground truth, a single class overall) is reported as ``None`` with a note saying why,
never as NaN and never silently as 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    roc_auc_score,
)

# Metrics where a lower value is better; every other selectable metric is maximised.
_MINIMISED = {"loss"}

__all__ = ["best_metric_key", "classification_metrics", "is_better"]


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Score predicted class probabilities against true labels.

    The predicted class is the arg-max of ``probs``. AUC is one-vs-rest per class
    (``sklearn.metrics.roc_auc_score`` on each class's probability column); the macro AUC is
    their mean over the classes where it is defined, which equals sklearn's
    ``multi_class="ovr", average="macro"`` when every class occurs. With two classes the AUC is
    that of the positive (second) class. A class missing from ``y_true`` has no sensitivity
    and no AUC (``None``); the ``notes`` list says which and why.

    Args:
        y_true: true class indices, shape ``(N,)``, values in ``[0, len(classes))``.
        probs: predicted probabilities, shape ``(N, len(classes))``.
        classes: class names in label order.

    Returns:
        A dict with ``n``, ``classes``, ``accuracy``, ``balanced_accuracy``, ``kappa``
        (quadratic weighted Cohen's kappa), ``auc`` (macro one-vs-rest), ``per_class``
        (name → ``support``, ``sensitivity``, ``specificity``, ``precision``, ``auc``),
        ``confusion_matrix`` (rows: true class, columns: predicted class) and ``notes``.

    Raises:
        ValueError: if the shapes disagree, the set is empty, or a label is out of range.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if k < 2:
        raise ValueError(f"need at least two classes, got {list(classes)}")
    if probs.ndim != 2 or probs.shape != (y_true.shape[0], k):
        raise ValueError(f"probs must have shape (N={y_true.shape[0]}, {k}), got {probs.shape}")
    if y_true.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), found {y_true.min()}..{y_true.max()}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")

    labels = list(range(k))
    y_pred = probs.argmax(axis=1)
    notes: list[str] = []
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    absent = [classes[i] for i in labels if support[i] == 0]
    if absent:
        notes.append(
            f"class(es) {absent} absent from the ground truth: their sensitivity and AUC are undefined (null); "
            "balanced accuracy and macro AUC average over the classes present"
        )

    with warnings.catch_warnings():
        # sklearn warns when predictions contain classes absent from y_true; the note above says so.
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y_true, y_pred)
        kappa = cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
    kappa_value = _finite_or_none(kappa)
    if kappa_value is None:
        notes.append(
            "quadratic weighted kappa is undefined: truth and prediction each hold a single, identical class"
        )

    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    total = int(cm.sum())
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        fn = int(support[i] - tp)
        fp = int(cm[:, i].sum() - tp)
        tn = total - tp - fn - fp
        positives = y_true == i
        auc: float | None = None
        if 0 < positives.sum() < y_true.size:
            auc = float(roc_auc_score(positives.astype(np.int64), probs[:, i]))
            aucs.append(auc)
        per_class[name] = {
            "support": int(support[i]),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "auc": auc,
        }

    if k == 2:
        macro_auc = per_class[classes[1]]["auc"]
    else:
        macro_auc = float(np.mean(aucs)) if aucs else None
    if macro_auc is None:
        notes.append("AUC is undefined: the ground truth holds a single class")

    return {
        "n": int(y_true.size),
        "classes": list(classes),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "kappa": kappa_value,
        "auc": macro_auc,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "notes": notes,
    }


def best_metric_key(best_metric: str, num_classes: int) -> str:
    """Resolve ``train.best_metric`` to a key of :func:`classification_metrics` (or ``loss``).

    Args:
        best_metric: ``auto``, ``kappa``, ``auc``, ``accuracy``, ``balanced_accuracy`` or ``loss``.
        num_classes: number of classes; ``auto`` means kappa for more than two, AUC for two.

    Returns:
        The metric key.
    """
    if best_metric == "auto":
        return "kappa" if num_classes > 2 else "auc"
    return best_metric


def is_better(key: str, value: float | None, best: float | None) -> bool:
    """Whether ``value`` of metric ``key`` improves on ``best`` (``None`` never improves).

    Args:
        key: metric name; ``loss`` is minimised, everything else maximised.
        value: the new value.
        best: the best value so far, or ``None`` before any.

    Returns:
        True when ``value`` is strictly better.
    """
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if key in _MINIMISED else value > best
