"""Paired comparison of segmentation evaluations, case by case.

Two models scored on the same test cases share most of their spread: a hard case is hard for
both. Their separate confidence intervals (``ci95`` in ``summary.json``) include that shared
spread, so they overlap even when one model is ahead on nearly every case. The difference per
case removes it, and its interval says whether the gap is beyond the noise of the test set.
Neither MONAI nor scikit-learn pairs the per-case metrics of two evaluations, hence this module.

Rules:

- Each side is one evaluation or several (for example one per seed). With several, each case's
  value is first averaged over that side's evaluations (NaN-aware: an evaluation where the class
  is undefined for the case is left out of the case's mean).
- A case counts for a class when the class is defined on both sides (``n``); the difference is
  candidate minus baseline, its interval the two-sided 95% Student-t interval of the mean
  difference over those cases (not clipped: differences lie in [-1, 1]).
- Every evaluation must hold the same cases and the same classes: a comparison of different
  test cases is refused rather than quietly restricted to the cases they share.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fewlabel.errors import DataError, FewLabelError
from fewlabel.reports.segmentation import METRIC_NAMES

__all__ = [
    "CI_METHOD",
    "PER_CASE_FILE",
    "PerCaseMetrics",
    "compare_evaluations",
    "comparison_json_text",
    "comparison_lines",
    "find_per_case_file",
    "read_per_case_metrics",
]

PER_CASE_FILE = "metrics_per_case.csv"
CI_METHOD = "two-sided 95% Student-t interval of the mean paired difference over cases"

# metrics_per_case.csv stores six decimals, so smaller differences are ties.
_TIE = 5e-7


@dataclass
class PerCaseMetrics:
    """The per-case metrics of one evaluation.

    Attributes:
        source: the ``metrics_per_case.csv`` they were read from.
        classes: class names of the value columns, in file order.
        values: metric key (``dice``, ``voldice``, ...) → case → one value per class (NaN = undefined).
    """

    source: Path
    classes: list[str]
    values: dict[str, dict[str, list[float]]]


def find_per_case_file(path: str | Path) -> Path:
    """Locate the per-case metrics of an evaluation.

    Args:
        path: a ``metrics_per_case.csv``, an evaluation folder holding one (``fewlabel evaluate
            --output``), or a run folder (its ``eval/`` folder is used).

    Returns:
        The CSV file.

    Raises:
        DataError: if the path does not exist or holds no per-case segmentation metrics.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(
            path, "not found (give an evaluation folder, a run folder or its metrics_per_case.csv)"
        )
    for folder in (path, path / "eval"):
        if (folder / PER_CASE_FILE).is_file():
            return folder / PER_CASE_FILE
    if (path / "metrics.json").is_file() or (path / "eval" / "metrics.json").is_file():
        raise DataError(
            path,
            f"holds a classification evaluation; compare reads segmentation evaluations ({PER_CASE_FILE})",
        )
    raise DataError(
        path,
        f"no {PER_CASE_FILE} here or in its eval/ folder; give the --output folder of fewlabel "
        "evaluate or a segmentation run folder",
    )


def read_per_case_metrics(path: str | Path) -> PerCaseMetrics:
    """Read an evaluation's ``metrics_per_case.csv``.

    Args:
        path: see :func:`find_per_case_file`.

    Returns:
        The per-case metrics.

    Raises:
        DataError: if the file is not a per-case metrics table (wrong header, a row of the
            wrong length, a value that is not a number, a case listed twice for one metric) or
            holds no cases.
    """
    source = find_per_case_file(path)
    try:
        with open(source, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(source, f"cannot be read ({err})") from err
    if not rows or rows[0][:2] != ["case_id", "metric"] or len(rows[0]) < 3:
        raise DataError(
            source, "is not a per-case metrics table (its header must be case_id,metric,<class>...)"
        )
    classes = rows[0][2:]
    values: dict[str, dict[str, list[float]]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(rows[0]):
            raise DataError(source, f"line {line} has {len(row)} fields, the header {len(rows[0])}")
        case, metric = row[0], row[1].lower()
        try:
            numbers = [float(v) for v in row[2:]]
        except ValueError:
            raise DataError(source, f"line {line} holds a value that is not a number: {row[2:]}") from None
        if any(math.isinf(v) for v in numbers):
            raise DataError(source, f"line {line} holds an infinite value: {row[2:]}")
        per_case = values.setdefault(metric, {})
        if case in per_case:
            raise DataError(source, f"line {line} lists case {case!r} a second time for {metric}")
        per_case[case] = numbers
    if not values:
        raise DataError(source, "holds no cases")
    return PerCaseMetrics(source=source, classes=classes, values=values)


def compare_evaluations(
    baseline: Sequence[str | Path], candidate: Sequence[str | Path], metrics: Sequence[str] = ("dice",)
) -> dict:
    """Compare two sides of evaluations per case: candidate minus baseline.

    Args:
        baseline: the baseline's evaluations (see :func:`find_per_case_file`), one per seed or one.
        candidate: the candidate's evaluations.
        metrics: metric keys or report names (``dice``/``Dice``, ``voldice``, ``precision``,
            ``sensitivity``, ``cdice``).

    Returns:
        ``{"baseline": [files], "candidate": [files], "n_cases": N, "ci_method": str,
        "rows": [{"metric", "class", "n", "baseline", "candidate", "difference", "ci95": [lo, hi],
        "better", "worse", "ties"}]}``; means over the paired cases, NaN where fewer than two
        cases pair (interval) or none (everything).

    Raises:
        FewLabelError: if a side is empty or one evaluation is given twice.
        DataError: if the evaluations differ in cases or classes, or lack a metric.
    """
    if not baseline or not candidate:
        raise FewLabelError("compare needs at least one baseline and one candidate evaluation")
    sides = {
        "baseline": [read_per_case_metrics(p) for p in baseline],
        "candidate": [read_per_case_metrics(p) for p in candidate],
    }
    runs = sides["baseline"] + sides["candidate"]
    seen: dict[Path, str] = {}
    for role, side in sides.items():
        for run in side:
            key = run.source.resolve()
            if key in seen:
                raise FewLabelError(
                    f"{run.source} is given twice (as {seen[key]} and {role}); each evaluation counts once"
                )
            seen[key] = role
    wanted = list(dict.fromkeys(_metric_key(m, runs[0]) for m in metrics))
    _check_same_layout(runs, wanted)

    cases = sorted(runs[0].values[wanted[0]])
    rows = []
    for metric in wanted:
        base = _side_means(sides["baseline"], metric, cases)
        cand = _side_means(sides["candidate"], metric, cases)
        for k, name in enumerate(runs[0].classes):
            rows.append({"metric": metric, "class": name, **_paired(base[:, k], cand[:, k])})
    return {
        "baseline": [str(r.source) for r in sides["baseline"]],
        "candidate": [str(r.source) for r in sides["candidate"]],
        "n_cases": len(cases),
        "ci_method": CI_METHOD,
        "rows": rows,
    }


def comparison_lines(result: dict) -> list[str]:
    """Lay a comparison out as a few lines of plain text for the terminal.

    Args:
        result: :func:`compare_evaluations`' output.

    Returns:
        The lines, without newlines: a heading, a table row per metric and class, the interval's method.
    """
    nb, nc = len(result["baseline"]), len(result["candidate"])
    sides = ""
    if nb > 1 or nc > 1:
        sides = f"; each side's {nb} and {nc} evaluations averaged per case first"
    n = result["n_cases"]
    lines = [f"candidate - baseline, paired by case ({n} case{'' if n == 1 else 's'}{sides}):"]
    width = max(len("class"), *(len(r["class"]) for r in result["rows"]))
    lines.append(
        f"  {'class':<{width}}  {'metric':<11}  {'baseline':>8}  {'candidate':>9}  {'difference':>10}"
        f"  {'95% interval':>17}    n  better/worse/tied"
    )
    for r in result["rows"]:
        lo, hi = r["ci95"]
        interval = "n/a" if math.isnan(lo) else f"{lo:+.3f} .. {hi:+.3f}"
        lines.append(
            f"  {r['class']:<{width}}  {METRIC_NAMES.get(r['metric'], r['metric']):<11}"
            f"  {_fmt(r['baseline']):>8}  {_fmt(r['candidate']):>9}  {_fmt(r['difference'], '+.3f'):>10}"
            f"  {interval:>17}  {r['n']:>3}  {r['better']}/{r['worse']}/{r['ties']}"
        )
    lines.append(f"interval: {result['ci_method']}")
    return lines


def comparison_json_text(result: dict) -> str:
    """Serialise a comparison as JSON, undefined values as ``null``.

    Args:
        result: :func:`compare_evaluations`' output.

    Returns:
        The JSON text.
    """

    def ready(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: ready(v) for k, v in value.items()}
        if isinstance(value, list):
            return [ready(v) for v in value]
        return value

    return json.dumps(ready(result), indent=2, allow_nan=False) + "\n"


def _metric_key(name: str, run: PerCaseMetrics) -> str:
    key = name.lower()
    if key not in run.values:
        shown = ", ".join(METRIC_NAMES.get(m, m) for m in run.values)
        raise DataError(run.source, f"holds no {name} (its metrics: {shown})")
    return key


def _check_same_layout(runs: Sequence[PerCaseMetrics], metrics: Sequence[str]) -> None:
    first = runs[0]
    for run in runs:
        if run.classes != first.classes:
            raise DataError(
                run.source,
                f"scores classes {run.classes}, {first.source} scores {first.classes}; compare "
                "evaluations of the same classes",
            )
        for metric in metrics:
            if metric not in run.values:
                _metric_key(metric, run)
            mine, theirs = set(run.values[metric]), set(first.values[metrics[0]])
            if mine != theirs:
                raise DataError(
                    run.source,
                    f"was scored on other cases than {first.source}: {_cases(mine - theirs)} only here, "
                    f"{_cases(theirs - mine)} only there; compare evaluations of the same test cases",
                )


def _cases(names: set[str]) -> str:
    if not names:
        return "none"
    shown = sorted(names)[:3]
    rest = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(names)} ({', '.join(shown)}{rest})"


def _side_means(side: Sequence[PerCaseMetrics], metric: str, cases: Sequence[str]) -> np.ndarray:
    """Cases × classes, each value the NaN-aware mean over the side's evaluations."""
    stacked = np.array([[run.values[metric][c] for c in cases] for run in side], dtype=float)
    defined = ~np.isnan(stacked)
    counts = defined.sum(axis=0)
    sums = np.where(defined, stacked, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def _paired(base: np.ndarray, cand: np.ndarray) -> dict:
    both = ~np.isnan(base) & ~np.isnan(cand)
    b, c = base[both], cand[both]
    d = c - b
    n = int(d.size)
    out = {
        "n": n,
        "baseline": float(b.mean()) if n else math.nan,
        "candidate": float(c.mean()) if n else math.nan,
        "difference": float(d.mean()) if n else math.nan,
        "ci95": [math.nan, math.nan],
        "better": int((d > _TIE).sum()),
        "worse": int((d < -_TIE).sum()),
        "ties": int((np.abs(d) <= _TIE).sum()),
    }
    if n >= 2:
        half = float(stats.t.ppf(0.975, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
        out["ci95"] = [out["difference"] - half, out["difference"] + half]
    return out


def _fmt(value: float, spec: str = ".3f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)
