"""The few lines of scores the command line prints after training or evaluation.

The full report is ``report.html``; these lines let a user see at a glance, in the terminal or
a job log, whether a run is worth opening.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fewlabel.reports.segmentation import METRIC_NAMES
from fewlabel.utils.text import display_width, pad

__all__ = ["score_lines"]

_CLASSIFICATION = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("auc", "AUC"),
    ("kappa", "kappa"),
)
# cDice stays in the report only: masks scored from disk have none, and the table keeps one layout.
_SEGMENTATION = ("dice", "voldice", "precision", "sensitivity")


def score_lines(scores: Mapping[str, Any] | None, title: str = "test scores") -> list[str]:
    """Summarise a pipeline's scores in a few lines of plain text.

    Args:
        scores: a classification metrics dict (``fewlabel.metrics.classification``), or a
            segmentation summary (``fewlabel.metrics.segmentation.summarize``); ``None`` gives
            no lines (a run without a test split).
        title: the first words of the first line (``evaluate`` may score another split or data).

    Returns:
        The lines, without newlines: one for classification, a small table per class for
        segmentation (mean over cases; ``n/a`` where a class is undefined in every case; ``n``
        counts the cases where the first metric shown, Dice, is defined).
    """
    if not scores:
        return []
    if "accuracy" in scores:
        parts = [f"{label} {_fmt(scores.get(key))}" for key, label in _CLASSIFICATION]
        return [f"{title} ({_count(scores.get('n'), 'image')}): " + ", ".join(parts)]
    metrics = scores.get("metrics", {})
    shown = [m for m in _SEGMENTATION if m in metrics]
    if not shown:
        return []
    classes = scores.get("classes", {})
    indices = sorted({int(k) for m in shown for k in metrics[m]})
    names = {k: str(classes.get(k, classes.get(str(k), f"class_{k}"))) for k in indices}
    width = max(display_width("class"), *(display_width(n) for n in names.values()))
    header = f"  {pad('class', width)}" + "".join(f"  {METRIC_NAMES[m]:>11}" for m in shown) + "    n"
    lines = [f"{title} ({_count(scores.get('n_cases'), 'case')}, mean over cases):", header]
    for k in indices:
        stats = [metrics[m].get(k, {}) for m in shown]
        n = int(stats[0].get("n", 0))
        row = "".join(f"  {_fmt(s.get('mean')):>11}" for s in stats)
        lines.append(f"  {pad(names[k], width)}{row}  {n:>3}")
    return lines


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{'?' if n is None else n} {noun}s"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.3f}"
