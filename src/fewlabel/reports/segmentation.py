"""The segmentation report: per-case metrics, nnU-Net-style summary, box plots, overlays, HTML.

:func:`write_segmentation_report` writes, into one folder:

- ``metrics_per_case.csv``: one row per case and metric, one column per class (``nan`` = undefined);
- ``summary.json``: the nnU-Net ``summary.json`` shape (``metric_per_case``, ``mean`` per class
  index, ``foreground_mean``) plus ``median``, ``std``, ``n``, ``ci95`` per class, the class
  names and how the interval was computed. Undefined values are ``null``;
- ``boxplot_<metric>.png``: the distribution over cases of each metric, one box per class;
- ``overlay_best.png``, ``overlay_median.png``, ``overlay_worst.png``: ground-truth (solid) and
  predicted (dashed) contours on the image, ranked by mean foreground Dice (when overlays are given);
- ``report.html``: everything above in one self-contained page, written last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fewlabel.metrics.segmentation import CaseResult, case_foreground_score, overlay_cases, summarize
from fewlabel.reports import html as H
from fewlabel.reports.plots import plain_text, save_figure
from fewlabel.utils.csv_cells import csv_text, escape_cell
from fewlabel.utils.files import atomic_write_text

__all__ = [
    "METRIC_NAMES",
    "metrics_per_case_csv_text",
    "overlay_slice",
    "plot_metric_boxplot",
    "plot_overlay",
    "summary_json",
    "write_segmentation_report",
]

#: How each metric key is named in ``summary.json`` and the report (nnU-Net spells Dice so).
METRIC_NAMES = {
    "dice": "Dice",
    "voldice": "VolDice",
    "precision": "Precision",
    "sensitivity": "Sensitivity",
    "cdice": "cDice",
}

# Distinct, colour-blind-friendly contour colours (Okabe-Ito), one per label value.
_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]


def write_segmentation_report(
    output: Path,
    cases: list[CaseResult],
    classes: list[str],
    overlays: list[dict] | None = None,
    title: str = "Segmentation report",
    foreground: Sequence[int] | None = None,
    context: Mapping[str, Any] | None = None,
) -> Path:
    """Write the segmentation report folder.

    Args:
        output: destination folder (created if missing; files of the same names are replaced).
        cases: per-case results (:func:`fewlabel.metrics.segmentation.evaluate_case`).
        classes: class names, index = class index in the metrics (merged classes included).
        overlays: optional ``{"case_id", "image", "gt", "pred"}`` entries (2D images or 3D
            volumes; ``image`` may be ``None``); the best, median and worst of them by mean
            foreground Dice are drawn.
        title: report title.
        foreground: class indices averaged into the foreground mean (default: every index
            >= 1; leave merged classes out).
        context: plain facts shown at the top of the page and stored in ``summary.json``.

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: if an overlay's masks or image do not match in shape.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summary = summarize(cases, classes, foreground)
    context = dict(context or {})

    atomic_write_text(output / "metrics_per_case.csv", metrics_per_case_csv_text(cases, classes))
    atomic_write_text(
        output / "summary.json",
        json.dumps(summary_json(cases, summary, context), indent=2, allow_nan=False),
    )

    boxplots = []
    for metric in summary["metrics"]:
        path = output / f"boxplot_{metric}.png"
        plot_metric_boxplot(cases, metric, classes, path)
        boxplots.append((path, f"{METRIC_NAMES.get(metric, metric)} per case"))

    uncertainty = plot_uncertainty_vs_dice(cases, classes, output / "uncertainty_vs_dice.png")

    drawn = []
    for role, entry in _pick_overlays(cases, overlays or [], summary["foreground"]):
        case = next(c for c in cases if c.case_id == entry["case_id"])
        score = case_foreground_score(case, "dice", summary["foreground"])
        caption = f"{role}: {entry['case_id']} (mean foreground Dice {H.fmt(score)})"
        path = output / f"overlay_{role}.png"
        plot_overlay(entry.get("image"), entry["gt"], entry["pred"], classes, path, caption)
        drawn.append((path, caption))

    sections = [("Summary", _summary_html(summary, context))]
    if boxplots:
        sections.append(("Distributions over cases", "\n".join(H.image(p, c) for p, c in boxplots)))
    if uncertainty is not None:
        from fewlabel.inference.uncertainty import DOUBT_THRESHOLD

        note = (
            "<p class='muted'>Uncertainty: of the voxels predicted as lesion or doubtful (most probable class "
            f"below {DOUBT_THRESHOLD:g}), the share that are doubtful. Where the cases fall from top left to "
            "bottom right, sorting new predictions by uncertainty puts the worse masks first.</p>"
        )
        sections.append(("Uncertainty", note + H.image(uncertainty, "Uncertainty against Dice")))
    if drawn:
        legend = (
            "<p class='muted'>Ground truth: solid contours; prediction: dashed. A 3D study shows the slice "
            "(along its third array axis, axial for RAS volumes) holding the most ground truth.</p>"
        )
        sections.append(("Examples", legend + "\n".join(H.image(p, c) for p, c in drawn)))
    sections.append(("Per case", _per_case_html(cases, classes)))
    metrics = ", ".join(METRIC_NAMES.get(m, m) for m in summary["metrics"])
    return H.write_page(output / "report.html", title, sections, subtitle=f"{len(cases)} cases; {metrics}")


def metrics_per_case_csv_text(cases: Sequence[CaseResult], classes: Sequence[str]) -> str:
    """Format per-case metrics as CSV: ``case_id,metric,<class name>...``.

    Args:
        cases: per-case results.
        classes: class names, index = class index.

    Returns:
        The CSV text; one row per case and metric, ``nan`` where a value is undefined.
    """
    indices = _class_indices(cases)
    rows = [["case_id", "metric", *(escape_cell(_class_name(classes, k)) for k in indices)]]
    for case in cases:
        for metric, values in case.metrics.items():
            row = [escape_cell(case.case_id), metric]
            row.extend(_csv_number(values.get(k, math.nan)) for k in indices)
            rows.append(row)
    return csv_text(rows)


def summary_json(
    cases: Sequence[CaseResult], summary: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> dict:
    """Lay a summary out as nnU-Net's ``summary.json`` (plus our statistics).

    Args:
        cases: per-case results.
        summary: :func:`fewlabel.metrics.segmentation.summarize` of those cases.
        context: extra facts stored under ``context``.

    Returns:
        A JSON-ready dict; NaN becomes ``None`` and class indices become strings.
    """
    per_case = []
    for case in cases:
        entry: dict[str, Any] = {"case": case.case_id}
        if case.prediction_file:
            entry["prediction_file"] = case.prediction_file
        if case.reference_file:
            entry["reference_file"] = case.reference_file
        entry["metrics"] = _by_class({m: v for m, v in case.metrics.items()})
        if case.uncertainty is not None:
            entry["uncertainty"] = case.uncertainty
        per_case.append(entry)
    stat = {
        key: _by_class({m: {k: s[key] for k, s in per.items()} for m, per in summary["metrics"].items()})
        for key in ("mean", "median", "std", "n", "ci95")
    }
    out = {
        "metric_per_case": per_case,
        "mean": stat["mean"],
        "foreground_mean": {METRIC_NAMES.get(m, m): v for m, v in summary["foreground_mean"].items()},
        "median": stat["median"],
        "std": stat["std"],
        "n": stat["n"],
        "ci95": stat["ci95"],
        "foreground_per_case": {METRIC_NAMES.get(m, m): v for m, v in summary["foreground_per_case"].items()},
        "classes": {str(k): v for k, v in summary["classes"].items()},
        "foreground_labels": list(summary["foreground"]),
        "n_cases": summary["n_cases"],
        "ci_method": summary["ci_method"],
        "context": dict(context or {}),
    }
    return _json_ready(out)


@plain_text
def plot_metric_boxplot(
    cases: Sequence[CaseResult], metric: str, classes: Sequence[str], path: str | Path
) -> Path:
    """Box plot of one metric over cases, one box per class, with the cases as points.

    Args:
        cases: per-case results.
        metric: metric key (``dice``, ``voldice``, ``cdice``).
        classes: class names, index = class index.
        path: destination ``.png``.

    Returns:
        The destination path.
    """
    indices = sorted({k for c in cases for k in c.metrics.get(metric, {})})
    data, labels = [], []
    for k in indices:
        values = np.array([c.metrics.get(metric, {}).get(k, math.nan) for c in cases], dtype=float)
        values = values[~np.isnan(values)]
        data.append(values)
        labels.append(f"{_class_name(classes, k)}\n(n={values.size})")
    fig = Figure(figsize=(max(4.0, 1.4 * len(indices) + 1.5), 4.0))
    ax = fig.add_subplot()
    present = [i for i, v in enumerate(data) if v.size]
    if present:
        ax.boxplot(
            [data[i] for i in present], positions=[i + 1 for i in present], widths=0.5, showfliers=False
        )
        # The points matter with few cases: a box of five values hides how they spread.
        rng = np.random.default_rng(0)
        for i in present:
            jitter = rng.uniform(-0.12, 0.12, size=data[i].size)
            ax.scatter(
                np.full(data[i].size, i + 1.0) + jitter, data[i], s=10, alpha=0.6, color="#0072B2", zorder=3
            )
    else:
        ax.text(0.5, 0.5, "no defined values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(1, len(indices) + 1), labels=labels)
    ax.set_xlim(0.4, len(indices) + 0.6)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(f"{METRIC_NAMES.get(metric, metric)} per case")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


@plain_text
def plot_uncertainty_vs_dice(
    cases: Sequence[CaseResult], classes: Sequence[str], path: str | Path
) -> Path | None:
    """Each case's mask uncertainty against its Dice, one colour per foreground class.

    Args:
        cases: per-case results; those without ``uncertainty`` are left out.
        classes: class names, index = class index (merged classes included).
        path: destination ``.png``.

    Returns:
        The destination path, or ``None`` (nothing drawn) when no case has an uncertainty.
    """
    from fewlabel.inference.uncertainty import uncertainty_dice_correlation

    scored = [c for c in cases if c.uncertainty is not None]
    if not scored:
        return None
    indices = [k for k in sorted({k for c in scored for k in c.metrics.get("dice", {})}) if k > 0]
    names = {k: _class_name(classes, k) for k in indices}
    rho = uncertainty_dice_correlation(scored, names)
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    for k in indices:
        pairs = [(c.uncertainty, c.metrics["dice"].get(k, math.nan)) for c in scored]
        pairs = [(u, d) for u, d in pairs if not math.isnan(d)]
        if not pairs:
            continue
        u, d = zip(*pairs, strict=True)
        label = names[k] + (f" (Spearman ρ {rho[names[k]]:+.2f})" if names[k] in rho else "")
        ax.scatter(u, d, s=14, alpha=0.7, color=_COLOURS[(k - 1) % len(_COLOURS)], label=label)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("uncertainty (share of doubtful voxels)")
    ax.set_ylabel("Dice")
    ax.set_title("Uncertainty against Dice, per case")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize="small", loc="best")
    return save_figure(fig, path)


def overlay_slice(gt: np.ndarray, pred: np.ndarray, axis: int = 2) -> int:
    """Index of the slice of a 3D study holding the most ground truth.

    Falls back to the prediction when the ground truth is empty, and to the middle slice
    when both are.

    Args:
        gt: ground-truth labels ``(X, Y, Z)``.
        pred: predicted labels, same shape.
        axis: slicing axis.

    Returns:
        The slice index.
    """
    other = tuple(a for a in range(gt.ndim) if a != axis)
    for mask in (gt, pred):
        counts = (np.asarray(mask) > 0).sum(axis=other)
        if counts.any():
            return int(counts.argmax())
    return gt.shape[axis] // 2


@plain_text
def plot_overlay(
    image: np.ndarray | None,
    gt: np.ndarray,
    pred: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str | None = None,
    axis: int = 2,
) -> Path:
    """Draw ground-truth (solid) and predicted (dashed) contours of each label on an image.

    Args:
        image: the image, ``(H, W)``, ``(H, W, 3)`` or a 3D volume like ``gt``; ``None`` draws on black.
        gt: ground-truth labels, 2D or 3D.
        pred: predicted labels, same shape.
        classes: class names, index = label value (colours follow the label value).
        path: destination ``.png``.
        title: optional title.
        axis: slicing axis of a 3D study (the slice with most ground truth is shown).

    Returns:
        The destination path.

    Raises:
        ValueError: if the masks or the image do not match in shape.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"overlay masks differ in shape: {gt.shape} vs {pred.shape}")
    img = None if image is None else np.asarray(image)
    if (
        img is not None
        and img.shape != gt.shape
        and not (gt.ndim == 2 and img.shape[:2] == gt.shape and img.ndim == 3)
    ):
        raise ValueError(f"overlay image shape {img.shape} does not match mask shape {gt.shape}")
    subtitle = ""
    if gt.ndim == 3:
        n_slices = gt.shape[axis]
        z = overlay_slice(gt, pred, axis)
        take = [slice(None)] * 3
        take[axis] = z
        # NIfTI arrays are (x, y): transpose so x runs across and y up the figure.
        gt, pred = gt[tuple(take)].T, pred[tuple(take)].T
        img = None if img is None else img[tuple(take)].T
        origin = "lower"
        subtitle = f" (slice {z} of {n_slices})"
    else:
        origin = "upper"

    fig = Figure(figsize=(5.0, 5.4))
    ax = fig.add_subplot()
    ax.imshow(_display_image(img, gt.shape), cmap="gray", origin=origin, interpolation="nearest")
    handles = []
    for label in sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0}):
        colour = _COLOURS[(int(label) - 1) % len(_COLOURS)]
        for mask, style in ((gt, "solid"), (pred, "dashed")):
            binary = (mask == label).astype(float)
            # contour() needs at least 2x2 samples. It is given no origin: its default puts
            # sample (i, j) at (j, i), where imshow puts pixel (i, j) for either origin, so the
            # line runs along the pixel edges (origin="upper" would mirror it vertically).
            if binary.any() and min(binary.shape) >= 2:
                ax.contour(binary, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.4)
        handles.append(Line2D([], [], color=colour, label=_class_name(classes, int(label))))
    handles += [
        Line2D([], [], color="white", linestyle="solid", label="truth"),
        Line2D([], [], color="white", linestyle="dashed", label="prediction"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize="x-small", facecolor="#444444", labelcolor="white")
    ax.set_title((title or "") + subtitle, fontsize=9)
    ax.axis("off")
    return save_figure(fig, path)


def _pick_overlays(
    cases: Sequence[CaseResult], overlays: Sequence[dict], foreground: Sequence[int]
) -> list[tuple[str, dict]]:
    by_id = {o["case_id"]: o for o in overlays}
    picked = overlay_cases([c for c in cases if c.case_id in by_id], foreground)
    roles = {0: [], 1: ["best"], 2: ["best", "worst"], 3: ["best", "median", "worst"]}[len(picked)]
    return [(role, by_id[case.case_id]) for role, case in zip(roles, picked, strict=True)]


def _display_image(img: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if img is None:
        return np.zeros(shape, dtype=float)
    img = img.astype(float)
    # Percentile scaling keeps a few extreme voxels (metal, air in HU) from washing the image out.
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _summary_html(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    parts = []
    facts = {"cases": summary["n_cases"], **context}
    parts.append(H.key_value_table(facts))
    classes = summary["classes"]
    for metric, per_class in summary["metrics"].items():
        name = METRIC_NAMES.get(metric, metric)
        rows = []
        for k, s in per_class.items():
            rows.append(
                [_class_name(classes, k), s["mean"], s["median"], s["std"], _fmt_ci(s["ci95"]), s["n"]]
            )
        fg = summary["foreground_per_case"][metric]
        rows.append(["foreground mean (of class means)", summary["foreground_mean"][metric], "", "", "", ""])
        rows.append(
            ["foreground mean per case", fg["mean"], fg["median"], fg["std"], _fmt_ci(fg["ci95"]), fg["n"]]
        )
        parts.append(f"<h3>{name}</h3>")
        parts.append(H.table(rows, header=["class", "mean", "median", "std", "95% CI", "n"]))
    parts.append(
        H.notes_list(
            [
                "Dice is undefined (n/a) for a case where a class is absent from both the prediction and the "
                "ground truth; such cases are left out of that class's statistics (n counts the others).",
                "3D studies: Dice is the mean over the slices that hold the class in the prediction or the "
                "ground truth; VolDice scores the whole study as one mask. 2D images: both are the image's Dice.",
                "Precision (share of the predicted class that is right) and sensitivity (share of the true "
                "class that is found) count voxels over the whole case; precision is undefined where the class "
                "is predicted nowhere, sensitivity where it is absent from the ground truth.",
                f"95% CI: {summary['ci_method']}.",
            ]
        )
    )
    return "\n".join(parts)


def _per_case_html(cases: Sequence[CaseResult], classes: Sequence[str]) -> str:
    indices = _class_indices(cases)
    metrics = list(dict.fromkeys(m for c in cases for m in c.metrics))
    header = ["case"] + [
        f"{METRIC_NAMES.get(m, m)} {_class_name(classes, k)}" for m in metrics for k in indices
    ]
    rows = [
        [c.case_id] + [c.metrics.get(m, {}).get(k, math.nan) for m in metrics for k in indices] for c in cases
    ]
    return H.table(rows, header=header)


def _fmt_ci(ci: Sequence[float]) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{lo:.3f}, {hi:.3f}]"


def _class_indices(cases: Sequence[CaseResult]) -> list[int]:
    return sorted({k for c in cases for values in c.metrics.values() for k in values})


def _class_name(classes: Sequence[str] | Mapping[int, str], k: int) -> str:
    if isinstance(classes, Mapping):
        return str(classes.get(k, f"class_{k}"))
    return classes[k] if 0 <= k < len(classes) else f"class_{k}"


def _csv_number(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.6f}"


def _by_class(per_metric: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric: {k: v}}`` → ``{"k": {"Dice": v, ...}}`` (the nnU-Net nesting)."""
    out: dict[str, dict[str, Any]] = {}
    for metric, values in per_metric.items():
        for k, v in values.items():
            out.setdefault(str(k), {})[METRIC_NAMES.get(metric, metric)] = v
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _json_ready(value.item())
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
