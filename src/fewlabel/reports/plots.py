"""Report figures (PNG) shared by the classification and segmentation reports.

Figures are built on :class:`matplotlib.figure.Figure` objects, which render with the Agg
backend and never touch pyplot's global state: plotting works on headless machines and
from worker threads, and no window ever opens. Every PNG is written atomically.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from fewlabel.utils.files import atomic_write

__all__ = [
    "plain_text",
    "plot_confusion_matrix",
    "plot_image_gallery",
    "plot_learning_curves",
    "plot_roc_curves",
    "save_figure",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def plain_text(plot: _F) -> _F:
    """Draw every text of ``plot``'s figure literally.

    Titles, captions and tick labels carry file and class names; matplotlib would read text
    between two ``$`` signs as mathtext, drop the signs or fail to save the figure.
    """

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG atomically.

    Args:
        fig: the figure.
        path: destination ``.png``.
        dpi: resolution.

    Returns:
        The destination path.
    """
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))


@plain_text
def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Draw a confusion matrix: colour is the row-normalised rate, text the raw count.

    Row normalisation makes the diagonal read as per-class sensitivity, which stays
    readable when classes are very unbalanced (as retinopathy grades are).

    Args:
        cm: square matrix, rows = true class, columns = predicted class.
        classes: class names.
        path: destination ``.png``.
        title: figure title.

    Returns:
        The destination path.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(3.5, 0.7 * k + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black"
            )
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path)


@plain_text
def plot_roc_curves(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str = "ROC curves (one vs rest)",
) -> Path:
    """Draw one-vs-rest ROC curves, one per class with both positives and negatives.

    Args:
        y_true: true class indices, shape ``(N,)``.
        probs: predicted probabilities, shape ``(N, K)``.
        classes: class names.
        path: destination ``.png``.
        title: figure title.

    Returns:
        The destination path.
    """
    from sklearn.metrics import auc, roc_curve

    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs)
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    # With two classes the curves of both columns mirror each other: draw the positive class only.
    indices = [1] if len(classes) == 2 else range(len(classes))
    drawn = 0
    for i in indices:
        positives = y_true == i
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives.astype(int), probs[:, i])
        ax.plot(fpr, tpr, label=f"{classes[i]} (AUC {auc(fpr, tpr):.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    if drawn == 0:
        ax.text(0.5, 0.5, "undefined: a single class in the ground truth", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


@plain_text
def plot_learning_curves(
    history: Sequence[Mapping[str, float | None]], path: str | Path, x: str = "epoch"
) -> Path:
    """Plot a training history: losses, validation metrics and learning rates side by side.

    Columns are grouped by name: ``*loss*`` on the first panel, ``lr*`` on a log-scaled
    last panel, every other numeric column on the middle panel. Missing or ``None`` values
    (epochs without validation) are skipped.

    Args:
        history: one mapping per row, each holding ``x`` and any numeric columns.
        path: destination ``.png``.
        x: the column on the horizontal axis.

    Returns:
        The destination path.
    """
    columns: list[str] = []
    for row in history:
        for key in row:
            if key != x and key not in columns:
                columns.append(key)
    groups = {
        "loss": [c for c in columns if "loss" in c],
        "metrics": [c for c in columns if "loss" not in c and not c.startswith("lr")],
        "learning rate": [c for c in columns if c.startswith("lr")],
    }
    groups = {name: cols for name, cols in groups.items() if cols}
    fig = Figure(figsize=(4.5 * max(1, len(groups)), 3.8))
    for n, (name, cols) in enumerate(groups.items(), start=1):
        ax = fig.add_subplot(1, len(groups), n)
        for col in cols:
            pts = [
                (row[x], row[col]) for row in history if _is_number(row.get(col)) and _is_number(row.get(x))
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=col)
        if name == "learning rate" and any(
            _is_number(row.get(c)) and row[c] > 0 for row in history for c in cols
        ):
            ax.set_yscale("log")
            # The log scale's default labels are mathtext (10^-3), which plain_text would
            # print as raw $\mathdefault{...}$ source.
            ax.yaxis.set_major_formatter(ticker.LogFormatter())
            ax.yaxis.set_minor_formatter(ticker.LogFormatter(minor_thresholds=(1, 0.4)))
        # Epochs and iterations are whole numbers; a short run would get ticks at 1.2, 1.4...
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel(x)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return save_figure(fig, path)


@plain_text
def plot_image_gallery(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | Path,
    ncols: int = 4,
    title: str | None = None,
) -> Path:
    """Lay images out on a grid with a caption under each.

    Args:
        images: ``H×W``, ``H×W×1`` or ``H×W×3`` arrays (uint8, or floats in ``[0, 1]``).
        captions: one caption per image (may span lines).
        path: destination ``.png``.
        ncols: images per row.
        title: optional figure title.

    Returns:
        The destination path.
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(2.8 * ncols, 3.6 * nrows))
    if title:
        fig.suptitle(title)
    if n == 0:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center")
        ax.axis("off")
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        arr = np.asarray(img)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    return save_figure(fig, path)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
