"""The classification report: metrics, confusion matrix, ROC curves, error gallery, HTML.

:func:`write_classification_report` writes, into one folder:

- ``metrics.json``: :func:`fewlabel.metrics.classification.classification_metrics` plus context;
- ``predictions.csv``: one row per image with the true and predicted class and probabilities;
- ``confusion_matrix.csv`` and ``confusion_matrix.png``;
- ``roc_curves.png``: one-vs-rest ROC curve per class;
- ``gallery.png``: the most confidently wrong images (when images are available);
- ``report.html``: everything above in one self-contained page, written last.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewlabel.metrics.classification import classification_metrics
from fewlabel.reports import html as H
from fewlabel.reports.plots import plot_confusion_matrix, plot_image_gallery, plot_roc_curves
from fewlabel.utils.csv_cells import csv_text, escape_cell
from fewlabel.utils.files import atomic_write_text

__all__ = [
    "most_confident_errors",
    "predictions_csv_text",
    "write_classification_report",
    "write_predictions_csv",
]


def predictions_csv_text(
    names: Sequence[str], probs: np.ndarray, classes: Sequence[str], y_true: Sequence[int] | None = None
) -> str:
    """Format predictions as CSV: ``image[,true],predicted,prob_<class>...``.

    Args:
        names: image identifiers (paths or ids), one per row.
        probs: probabilities, shape ``(N, K)``.
        classes: class names.
        y_true: optional true class indices (adds a ``true`` column).

    Returns:
        The CSV text.
    """
    probs = np.asarray(probs, dtype=np.float64)
    rows = []
    header = (
        ["image"] + (["true"] if y_true is not None else []) + ["predicted"] + [f"prob_{c}" for c in classes]
    )
    rows.append([escape_cell(h) for h in header])
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    for i, name in enumerate(names):
        row = [str(name)]
        if y_true is not None:
            row.append(classes[int(y_true[i])])
        row.append(classes[int(pred[i])])
        row = [escape_cell(cell) for cell in row]
        row.extend(f"{p:.6f}" for p in probs[i])
        rows.append(row)
    return csv_text(rows)


def write_predictions_csv(
    path: str | Path,
    names: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    y_true: Sequence[int] | None = None,
) -> Path:
    """Atomically write :func:`predictions_csv_text` to ``path``.

    Args:
        path: destination ``.csv``.
        names: image identifiers.
        probs: probabilities, shape ``(N, K)``.
        classes: class names.
        y_true: optional true class indices.

    Returns:
        The destination path.
    """
    return atomic_write_text(path, predictions_csv_text(names, probs, classes, y_true))


def most_confident_errors(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, k: int) -> list[int]:
    """Indices of the wrongly classified samples with the highest predicted probability.

    Args:
        y_true: true class indices.
        probs: probabilities, shape ``(N, K)``.
        k: how many to return at most.

    Returns:
        Sample indices, most confident first.
    """
    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs)
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y_true)
    confidence = probs[wrong, pred[wrong]]
    order = np.argsort(-confidence, kind="stable")
    return [int(i) for i in wrong[order][:k]]


def write_classification_report(
    output: str | Path,
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    names: Sequence[str],
    *,
    image_loader: Callable[[int], np.ndarray] | None = None,
    gallery_size: int = 12,
    title: str = "Classification report",
    context: Mapping[str, Any] | None = None,
    loss: float | None = None,
) -> dict[str, Any]:
    """Score predictions and write every report file into ``output``.

    Args:
        output: folder to write into (created if needed).
        y_true: true class indices, shape ``(N,)``.
        probs: predicted probabilities, shape ``(N, K)``.
        classes: class names in label order.
        names: image identifiers (shown in the gallery and the predictions CSV).
        image_loader: returns sample ``i`` as an ``H×W×C`` uint8 image for the gallery;
            ``None`` skips the gallery.
        gallery_size: how many most-confidently-wrong images to show (0: none).
        title: page title.
        context: plain facts shown at the top and stored in ``metrics.json`` under ``context``
            (checkpoint, dataset, split, TTA...).
        loss: optional mean loss, stored with the metrics.

    Returns:
        ``{"report": path of report.html, "metrics": metrics dict, "files": {name: path}}``.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    metrics = classification_metrics(y_true, probs, classes)
    if loss is not None:
        metrics["loss"] = float(loss)
    context = dict(context or {})
    files: dict[str, Path] = {}

    files["metrics"] = atomic_write_text(
        out / "metrics.json",
        json.dumps({**metrics, "context": context}, indent=2, allow_nan=False, default=str),
    )
    files["predictions"] = write_predictions_csv(out / "predictions.csv", names, probs, classes, y_true)
    cm_rows = [["true \\ predicted", *map(escape_cell, classes)]] + [
        [escape_cell(c), *row] for c, row in zip(classes, metrics["confusion_matrix"], strict=True)
    ]
    files["confusion_matrix_csv"] = atomic_write_text(out / "confusion_matrix.csv", csv_text(cm_rows))
    files["confusion_matrix_png"] = plot_confusion_matrix(
        metrics["confusion_matrix"], classes, out / "confusion_matrix.png"
    )
    files["roc_png"] = plot_roc_curves(y_true, probs, classes, out / "roc_curves.png")

    errors = most_confident_errors(y_true, probs, gallery_size) if gallery_size > 0 else []
    if image_loader is not None and errors:
        pred = probs.argmax(axis=1)
        images = [image_loader(i) for i in errors]
        captions = [
            f"{_short(names[i])}\ntrue: {classes[y_true[i]]}  pred: {classes[pred[i]]}\nconfidence {probs[i, pred[i]]:.2f}"
            for i in errors
        ]
        files["gallery_png"] = plot_image_gallery(
            images, captions, out / "gallery.png", title="Most confidently wrong"
        )

    files["report"] = H.write_page(
        out / "report.html", title, _sections(metrics, context, files, errors, names, y_true, probs, classes)
    )
    return {"report": files["report"], "metrics": metrics, "files": files}


def _sections(
    metrics: dict[str, Any],
    context: Mapping[str, Any],
    files: Mapping[str, Path],
    errors: list[int],
    names: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
) -> list[tuple[str, str]]:
    summary = {
        "images": metrics["n"],
        "accuracy": metrics["accuracy"],
        "balanced accuracy": metrics["balanced_accuracy"],
        "quadratic weighted kappa": metrics["kappa"],
        "AUC (macro one-vs-rest)" if len(classes) > 2 else f"AUC ({classes[1]} vs {classes[0]})": metrics[
            "auc"
        ],
    }
    if "loss" in metrics:
        summary["mean loss"] = metrics["loss"]
    sections: list[tuple[str, str]] = []
    if context:
        sections.append(
            (
                "Setting",
                H.key_value_table(
                    {k: v if isinstance(v, (int, float)) else str(v) for k, v in context.items()}
                ),
            )
        )
    sections.append(("Summary", H.key_value_table(summary) + H.notes_list(metrics["notes"])))
    per_class_rows = [
        [name, m["support"], m["sensitivity"], m["specificity"], m["precision"], m["auc"]]
        for name, m in metrics["per_class"].items()
    ]
    sections.append(
        (
            "Per class",
            H.table(per_class_rows, ["class", "support", "sensitivity", "specificity", "precision", "AUC"]),
        )
    )
    cm_rows = [[c, *row] for c, row in zip(classes, metrics["confusion_matrix"], strict=True)]
    sections.append(
        (
            "Confusion matrix",
            H.table(cm_rows, ["true \\ predicted", *classes])
            + H.image(
                files["confusion_matrix_png"], "colour: share of the true class; text: count", width=480
            )
            + H.image(files["roc_png"], "one-vs-rest ROC curves", width=480),
        )
    )
    if errors:
        pred = probs.argmax(axis=1)
        rows = [
            [_short(names[i]), classes[y_true[i]], classes[pred[i]], float(probs[i, pred[i]])] for i in errors
        ]
        body = H.table(rows, ["image", "true", "predicted", "confidence"])
        if "gallery_png" in files:
            body += H.image(files["gallery_png"], "most confidently wrong images")
        sections.append(("Most confident errors", body))
    else:
        sections.append(("Most confident errors", "<p>No misclassified images.</p>"))
    return sections


def _short(name: str, keep: int = 40) -> str:
    name = str(name)
    return name if len(name) <= keep else "…" + name[-(keep - 1) :]
