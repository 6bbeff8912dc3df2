"""Paired comparison of evaluations, case by case (``fewlabel compare``).

Two models scored on the same test cases share most of their spread: a hard case is hard for
both. Their separate confidence intervals (``ci95`` in ``summary.json``) include that shared
spread, so they overlap even when one model is ahead on nearly every case. The difference per
case removes it, and its interval says whether the gap is beyond the noise of the test set.
Neither MONAI nor scikit-learn pairs the per-case metrics of two evaluations, hence this module.

Segmentation evaluations are read from ``metrics_per_case.csv`` (a value per case, metric and
class). Classification evaluations are read from ``predictions.csv`` with its ``true`` column:
each image scores 1 when predicted right and 0 otherwise, as metric ``accuracy`` in the column
``all`` and in the column of its true class, so the ``all`` row compares accuracy and each
class's row the share of that class's images graded right (its sensitivity).

Rules:

- Each side is one evaluation or several (for example one per seed). With several, each case's
  value is first averaged over that side's evaluations (NaN-aware: an evaluation where the class
  is undefined for the case is left out of the case's mean).
- A case counts for a class when the class is defined on both sides (``n``); the difference is
  candidate minus baseline, its interval the two-sided 95% Student-t interval of the mean
  difference over those cases (not clipped: differences lie in [-1, 1]). ``p_sign`` is the
  two-sided sign test of the cases scored better against those scored worse (ties left out);
  for one classification evaluation per side it is McNemar's exact test.
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
from matplotlib.figure import Figure
from scipy import stats

from fewlabel.errors import DataError, FewLabelError
from fewlabel.reports.plots import plain_text, save_figure
from fewlabel.reports.segmentation import METRIC_NAMES
from fewlabel.utils.csv_cells import unescape_cell
from fewlabel.utils.text import display_width, pad

__all__ = [
    "ALL_IMAGES",
    "CI_METHOD",
    "PER_CASE_FILE",
    "PREDICTIONS_FILE",
    "PerCaseMetrics",
    "compare_evaluations",
    "comparison_json_text",
    "comparison_lines",
    "find_evaluation_file",
    "plot_comparison",
    "read_evaluation",
]

PER_CASE_FILE = "metrics_per_case.csv"
PREDICTIONS_FILE = "predictions.csv"
#: The column of a classification comparison that holds every image.
ALL_IMAGES = "all"
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
        task: ``segmentation`` or ``classification``.
        truth: for classification, each image's true class (images must agree across evaluations).
    """

    source: Path
    classes: list[str]
    values: dict[str, dict[str, list[float]]]
    task: str = "segmentation"
    truth: dict[str, str] | None = None


def find_evaluation_file(path: str | Path) -> Path:
    """Locate the per-case results of an evaluation.

    Args:
        path: a ``metrics_per_case.csv`` (segmentation) or ``predictions.csv`` (classification),
            an evaluation folder holding one (``fewlabel evaluate --output``), or a run folder
            (its ``eval/`` folder is used).

    Returns:
        The CSV file.

    Raises:
        DataError: if the path does not exist or holds no per-case results.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(path, "not found (give an evaluation folder, a run folder or its per-case CSV file)")
    for folder in (path, path / "eval"):
        for name in (PER_CASE_FILE, PREDICTIONS_FILE):
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        path,
        f"no {PER_CASE_FILE} or {PREDICTIONS_FILE} here or in its eval/ folder; give the --output "
        "folder of fewlabel evaluate or a run folder",
    )


def read_evaluation(path: str | Path) -> PerCaseMetrics:
    """Read an evaluation's ``metrics_per_case.csv`` or classification ``predictions.csv``.

    Args:
        path: see :func:`find_evaluation_file`.

    Returns:
        The per-case metrics (for classification, ``accuracy``: 1 or 0 per image, see above).

    Raises:
        DataError: if the file is not such a table (wrong header, a row of the wrong length, a
            value that is not a number or not a class, a case listed twice) or holds no cases;
            for predictions without a ``true`` column (``fewlabel predict`` output).
    """
    source = find_evaluation_file(path)
    try:
        with open(source, newline="", encoding="utf-8") as fh:
            # Numbers never start with a quote, so every cell can be unescaped.
            rows = [[unescape_cell(cell) for cell in row] for row in csv.reader(fh)]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(source, f"cannot be read ({err})") from err
    if rows and rows[0][:1] == ["image"]:
        return _read_predictions(source, rows)
    if not rows or rows[0][:2] != ["case_id", "metric"] or len(rows[0]) < 3:
        raise DataError(
            source,
            "is neither a per-case metrics table (header case_id,metric,<class>...) nor a "
            "classification predictions table (header image,true,predicted,prob_<class>...)",
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
    baseline: Sequence[str | Path], candidate: Sequence[str | Path], metrics: Sequence[str] | None = None
) -> dict:
    """Compare two sides of evaluations per case: candidate minus baseline.

    Args:
        baseline: the baseline's evaluations (see :func:`find_evaluation_file`), one per seed or one.
        candidate: the candidate's evaluations.
        metrics: metric keys or report names (``dice``/``Dice``, ``voldice``, ``precision``,
            ``sensitivity``, ``cdice``; ``accuracy`` for classification); by default Dice, or
            accuracy for classification.

    Returns:
        ``{"baseline": [files], "candidate": [files], "n_cases": N, "task": str, "ci_method":
        str, "rows": [{"metric", "class", "n", "baseline", "candidate", "difference", "ci95":
        [lo, hi], "better", "worse", "ties", "p_sign", "only_baseline", "only_candidate",
        "per_case": [{"case", "baseline", "candidate"}]}]}``; means over the paired cases, NaN
        where fewer than two cases pair (interval) or none (everything). ``only_baseline`` /
        ``only_candidate`` count the cases left out because only that side defines the value.

    Raises:
        FewLabelError: if a side is empty or one evaluation is given twice.
        DataError: if the evaluations differ in cases or classes, or lack a metric.
    """
    if not baseline or not candidate:
        raise FewLabelError("compare needs at least one baseline and one candidate evaluation")
    sides = {
        "baseline": [read_evaluation(p) for p in baseline],
        "candidate": [read_evaluation(p) for p in candidate],
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
    if not metrics:
        metrics = ["accuracy" if runs[0].task == "classification" else "dice"]
    wanted = list(dict.fromkeys(_metric_key(m, runs[0]) for m in metrics))
    _check_same_layout(runs, wanted)

    cases = sorted(runs[0].values[wanted[0]])
    rows = []
    for metric in wanted:
        base = _side_means(sides["baseline"], metric, cases)
        cand = _side_means(sides["candidate"], metric, cases)
        for k, name in enumerate(runs[0].classes):
            rows.append({"metric": metric, "class": name, **_paired(base[:, k], cand[:, k], cases)})
    return {
        "baseline": [str(r.source) for r in sides["baseline"]],
        "candidate": [str(r.source) for r in sides["candidate"]],
        "n_cases": len(cases),
        "task": runs[0].task,
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
    width = max(display_width("class"), *(display_width(r["class"]) for r in result["rows"]))
    lines.append(
        f"  {pad('class', width)}  {'metric':<11}  {'baseline':>8}  {'candidate':>9}  {'difference':>10}"
        f"  {'95% interval':>17}    n  better/worse/tied  sign test p"
    )
    for r in result["rows"]:
        lo, hi = r["ci95"]
        interval = "n/a" if math.isnan(lo) else f"{lo:+.3f} .. {hi:+.3f}"
        counts = f"{r['better']}/{r['worse']}/{r['ties']}"
        lines.append(
            f"  {pad(r['class'], width)}  {METRIC_NAMES.get(r['metric'], r['metric']):<11}"
            f"  {_fmt(r['baseline']):>8}  {_fmt(r['candidate']):>9}  {_fmt(r['difference'], '+.3f'):>10}"
            f"  {interval:>17}  {r['n']:>3}  {counts:>17}  {_fmt(r['p_sign'], '.3g'):>11}"
        )
    one_sided = [r for r in result["rows"] if r.get("only_baseline") or r.get("only_candidate")]
    if one_sided:
        lines.append("left out, defined on one side only (for Dice: no lesion, and that side predicted one):")
        for r in one_sided:
            lines.append(
                f"  {pad(r['class'], width)}  {METRIC_NAMES.get(r['metric'], r['metric']):<11}"
                f"  {r['only_baseline']} baseline only, {r['only_candidate']} candidate only"
            )
    lines.append(f"interval: {result['ci_method']}; p: two-sided sign test, ties left out")
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


def _read_predictions(source: Path, rows: list[list[str]]) -> PerCaseMetrics:
    """Score each image of a classification ``predictions.csv`` as right (1) or wrong (0)."""
    header = rows[0]
    if header[1:2] != ["true"]:
        raise DataError(
            source,
            "has no true column (predictions of fewlabel predict); compare needs evaluations with "
            "ground truth (fewlabel evaluate or a run's eval/ folder)",
        )
    classes = [h.removeprefix("prob_") for h in header[3:]]
    if header[2:3] != ["predicted"] or not classes or any(not h.startswith("prob_") for h in header[3:]):
        raise DataError(source, "is not a predictions table (header image,true,predicted,prob_<class>...)")
    correct: dict[str, list[float]] = {}
    truth: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(source, f"line {line} has {len(row)} fields, the header {len(header)}")
        image, true, predicted = row[:3]
        for value in (true, predicted):
            if value not in classes:
                raise DataError(source, f"line {line} names class {value!r}, not one of {classes}")
        if image in correct:
            raise DataError(source, f"line {line} lists image {image!r} a second time")
        hit = float(true == predicted)
        correct[image] = [hit] + [hit if c == true else math.nan for c in classes]
        truth[image] = true
    if not correct:
        raise DataError(source, "holds no images")
    return PerCaseMetrics(
        source=source,
        classes=[ALL_IMAGES, *classes],
        values={"accuracy": correct},
        task="classification",
        truth=truth,
    )


@plain_text
def plot_comparison(result: dict, path: str | Path) -> Path:
    """Draw each row's paired values: baseline on x, candidate on y, one point per case.

    Points above the diagonal are cases the candidate scores better; the title of each panel
    gives the mean difference and its interval.

    Args:
        result: :func:`compare_evaluations`' output of segmentation evaluations.
        path: destination ``.png``.

    Returns:
        The destination path.

    Raises:
        FewLabelError: for a classification comparison, whose 0/1 values a scatter cannot show.
    """
    if result.get("task") == "classification":
        raise FewLabelError(
            "a comparison plot shows per-case scores of segmentation evaluations; grading runs "
            "score 0 or 1 per image, read their table instead"
        )
    rows = result["rows"]
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3.3 * cols, 3.3 * nrows))
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        xs = [p["baseline"] for p in row["per_case"]]
        ys = [p["candidate"] for p in row["per_case"]]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.scatter(xs, ys, s=14, alpha=0.7)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        lo, hi = row["ci95"]
        gap = "n/a" if math.isnan(row["difference"]) else f"{row['difference']:+.3f}"
        interval = "" if math.isnan(lo) else f" ({lo:+.3f} .. {hi:+.3f})"
        name = METRIC_NAMES.get(row["metric"], row["metric"])
        ax.set_title(f"{row['class']} {name}: {gap}{interval}", fontsize=9)
        ax.set_xlabel("baseline")
        ax.set_ylabel("candidate")
    return save_figure(fig, path)


def _metric_key(name: str, run: PerCaseMetrics) -> str:
    key = name.lower()
    if key not in run.values:
        shown = ", ".join(METRIC_NAMES.get(m, m) for m in run.values)
        raise DataError(run.source, f"holds no {name} (its metrics: {shown})")
    return key


def _check_same_layout(runs: Sequence[PerCaseMetrics], metrics: Sequence[str]) -> None:
    first = runs[0]
    for run in runs:
        if run.task != first.task:
            raise DataError(
                run.source,
                f"is a {run.task} evaluation, {first.source} a {first.task} one; compare like with like",
            )
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
        if run.truth is not None and first.truth is not None:
            differ = {c for c in run.truth if run.truth[c] != first.truth[c]}
            if differ:
                raise DataError(
                    run.source,
                    f"gives other true classes than {first.source} for {_cases(differ)}; compare "
                    "evaluations against the same ground truth",
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


def _paired(base: np.ndarray, cand: np.ndarray, cases: Sequence[str]) -> dict:
    both = ~np.isnan(base) & ~np.isnan(cand)
    b, c = base[both], cand[both]
    # Left out of the pairing, but not of the story: for Dice such a case has no lesion, and
    # the side that scores it (0) predicted one there.
    one_sided = {
        "only_baseline": int((~np.isnan(base) & np.isnan(cand)).sum()),
        "only_candidate": int((np.isnan(base) & ~np.isnan(cand)).sum()),
    }
    paired_cases = [case for case, keep in zip(cases, both, strict=True) if keep]
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
        "p_sign": math.nan,
        **one_sided,
        "per_case": [
            {"case": case, "baseline": float(x), "candidate": float(y)}
            for case, x, y in zip(paired_cases, b, c, strict=True)
        ],
    }
    changed = out["better"] + out["worse"]
    if changed:
        out["p_sign"] = float(stats.binomtest(out["better"], changed, 0.5).pvalue)
    elif n:
        out["p_sign"] = 1.0
    if n >= 2:
        half = float(stats.t.ppf(0.975, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
        out["ci95"] = [out["difference"] - half, out["difference"] + half]
    return out


def _fmt(value: float, spec: str = ".3f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)
