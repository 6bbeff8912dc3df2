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
# Value columns are at least this wide (as wide as "Sensitivity"), so most tables look alike.
_MIN_COLUMN = 11


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
        counts the cases where the first metric shown, Dice, is defined, and a mean over
        another number of cases has that number beside it, as in ``0.127 (4)``).
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
    rows: list[tuple[str, list[str], int]] = []
    for k in indices:
        stats = [metrics[m].get(k, {}) for m in shown]
        n = int(stats[0].get("n", 0))
        rows.append((names[k], [_cell(s, n) for s in stats], n))
    # A count in parentheses widens its column; the header and every row widen with it.
    widths = [
        max(_MIN_COLUMN, len(METRIC_NAMES[m]), *(len(cells[i]) for _, cells, _ in rows))
        for i, m in enumerate(shown)
    ]
    n_width = max([3, *(len(str(n)) for _, _, n in rows)])
    header = f"  {pad('class', width)}"
    header += (
        "".join(f"  {METRIC_NAMES[m]:>{w}}" for m, w in zip(shown, widths, strict=True))
        + f"  {'n':>{n_width}}"
    )
    lines = [f"{title} ({_count(scores.get('n_cases'), 'case')}, mean over cases):", header]
    for name, cells, n in rows:
        row = "".join(f"  {cell:>{w}}" for cell, w in zip(cells, widths, strict=True))
        lines.append(f"  {pad(name, width)}{row}  {n:>{n_width}}")
    return lines


def _cell(stats: Mapping[str, Any], row_n: int) -> str:
    """One mean, with its own case count beside it when that differs from the row's ``n``.

    Precision is undefined in a case with nothing predicted and sensitivity in one with nothing
    true, where Dice may still be defined: without the count, a mean over 4 cases would read as
    one over the row's 8.

    Args:
        stats: one metric's statistics for the class (``mean`` and ``n``).
        row_n: the row's ``n`` (the cases where Dice is defined).

    Returns:
        ``"0.127"``, ``"0.127 (4)"``, or ``"n/a"`` where no case defines the metric.
    """
    text = _fmt(stats.get("mean"))
    n = int(stats.get("n", 0))
    # n/a already says "no case": a "(0)" beside it adds nothing.
    return f"{text} ({n})" if n != row_n and n > 0 else text


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{'?' if n is None else n} {noun}s"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.3f}"
