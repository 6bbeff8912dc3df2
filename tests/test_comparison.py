"""Paired comparison of segmentation evaluations (``fewlabel compare``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fewlabel.cli import main
from fewlabel.errors import DataError, FewLabelError
from fewlabel.metrics.segmentation import CaseResult
from fewlabel.reports.classification import predictions_csv_text
from fewlabel.reports.comparison import compare_evaluations, comparison_lines, read_evaluation
from fewlabel.reports.segmentation import metrics_per_case_csv_text

NAN = math.nan
CLASSES = ["background", "ggo", "consolidation"]


def _evaluation(folder: Path, dice: dict[str, tuple[float, float]]) -> Path:
    """An evaluation folder as ``fewlabel evaluate`` leaves it (only the per-case table)."""
    cases = [
        CaseResult(case, {"dice": {1: g, 2: c}, "voldice": {1: g, 2: c}}) for case, (g, c) in dice.items()
    ]
    folder.mkdir(parents=True)
    (folder / "metrics_per_case.csv").write_text(metrics_per_case_csv_text(cases, CLASSES))
    return folder


def _graded(folder: Path, true: list[str], predicted: list[str], with_truth: bool = True) -> Path:
    """A classification evaluation folder (its predictions.csv) grading images img0, img1, ..."""
    classes = ["r0", "r1", "r2"]
    probs = np.full((len(true), len(classes)), 0.1)
    probs[np.arange(len(true)), [classes.index(c) for c in predicted]] = 0.8
    names = [f"img{i}" for i in range(len(true))]
    y_true = [classes.index(c) for c in true] if with_truth else None
    folder.mkdir(parents=True)
    (folder / "predictions.csv").write_text(predictions_csv_text(names, probs, classes, y_true))
    return folder


def _row(result: dict, name: str, metric: str = "dice") -> dict:
    return next(r for r in result["rows"] if r["class"] == name and r["metric"] == metric)


def test_paired_difference_interval_and_counts(tmp_path):
    base = _evaluation(
        tmp_path / "base", {"a": (0.5, 0.2), "b": (0.6, NAN), "c": (0.7, 0.4), "d": (NAN, 0.1)}
    )
    cand = _evaluation(
        tmp_path / "cand", {"a": (0.6, 0.1), "b": (0.6, 0.3), "c": (0.9, 0.4), "d": (0.4, 0.1)}
    )
    result = compare_evaluations([base], [cand])
    assert result["n_cases"] == 4
    ggo = _row(result, "ggo")
    # case d has no baseline GGO Dice, so only a, b, c pair: differences 0.1, 0.0, 0.2
    assert ggo["n"] == 3
    assert ggo["baseline"] == pytest.approx(0.6)
    assert ggo["candidate"] == pytest.approx(0.7)
    assert ggo["difference"] == pytest.approx(0.1)
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert ggo["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert (ggo["better"], ggo["worse"], ggo["ties"]) == (2, 0, 1)
    cons = _row(result, "consolidation")  # b undefined in the baseline: a, c, d pair
    assert cons["n"] == 3
    assert cons["difference"] == pytest.approx(-0.1 / 3)
    assert (cons["better"], cons["worse"], cons["ties"]) == (0, 1, 2)
    # The cases left out are counted by the side that defines them.
    assert (ggo["only_baseline"], ggo["only_candidate"]) == (0, 1)
    assert (cons["only_baseline"], cons["only_candidate"]) == (0, 1)
    lines = comparison_lines(result)
    assert lines[-4].startswith("left out, defined on one side only")
    assert lines[-3].split() == ["ggo", "Dice", "0", "baseline", "only,", "1", "candidate", "only"]
    assert lines[-2].split() == ["consolidation", "Dice", "0", "baseline", "only,", "1", "candidate", "only"]


def test_several_evaluations_per_side_are_averaged_per_case_first(tmp_path):
    seeds = [
        _evaluation(tmp_path / "b0", {"a": (0.4, 0.0), "b": (0.6, NAN)}),
        _evaluation(tmp_path / "b1", {"a": (0.6, 0.2), "b": (0.8, 0.5)}),
    ]
    cand = _evaluation(tmp_path / "cand", {"a": (0.7, 0.1), "b": (0.9, 0.5)})
    result = compare_evaluations(seeds, [cand], metrics=["Dice", "voldice", "dice"])
    ggo = _row(result, "ggo")
    assert ggo["baseline"] == pytest.approx(0.6)  # (0.5 + 0.7) / 2 per case, then over cases
    assert ggo["difference"] == pytest.approx(0.2)
    assert ggo["ci95"] == pytest.approx([0.2, 0.2])  # the same gain on both cases
    # one seed left b's consolidation undefined: b's baseline is the other seed's 0.5
    assert _row(result, "consolidation")["baseline"] == pytest.approx(0.3)
    assert [r["metric"] for r in result["rows"]] == ["dice", "dice", "voldice", "voldice"]
    lines = comparison_lines(result)
    assert (
        lines[0]
        == "candidate - baseline, paired by case (2 cases; each side's 2 and 1 evaluations averaged per case first):"
    )
    assert lines[2].split()[:5] == ["ggo", "Dice", "0.600", "0.800", "+0.200"]
    assert lines[-1].startswith("interval: two-sided 95% Student-t")


def test_a_run_folder_is_read_through_its_eval_folder(tmp_path):
    run = tmp_path / "run"
    _evaluation(run / "eval", {"a": (0.5, 0.5)})
    assert read_evaluation(run).source == run / "eval" / "metrics_per_case.csv"


@pytest.mark.parametrize(
    ("cand_cases", "classes", "message"),
    [
        (
            {"a": (0.5, 0.5), "x": (0.1, 0.1)},
            CLASSES,
            r"other cases than .*1 \(x\) only here, 1 \(b\) only there",
        ),
        ({"a": (0.5, 0.5), "b": (0.1, 0.1)}, ["background", "ggo", "lesion"], "scores classes"),
    ],
)
def test_evaluations_of_other_cases_or_classes_are_refused(tmp_path, cand_cases, classes, message):
    base = _evaluation(tmp_path / "base", {"a": (0.5, 0.5), "b": (0.6, 0.6)})
    cand = tmp_path / "cand"
    cand.mkdir()
    cases = [CaseResult(c, {"dice": {1: g, 2: k}}) for c, (g, k) in cand_cases.items()]
    (cand / "metrics_per_case.csv").write_text(metrics_per_case_csv_text(cases, classes))
    with pytest.raises(DataError, match=message) as err:
        compare_evaluations([base], [cand])
    assert str(cand / "metrics_per_case.csv") in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("case,metric,ggo\n", r"is neither a per-case metrics table \(header case_id,metric"),
        ("case_id,metric,ggo\na,dice\n", "line 2 has 2 fields"),
        ("case_id,metric,ggo\na,dice,high\n", "line 2 holds a value that is not a number"),
        ("case_id,metric,ggo\na,dice,0.5\na,dice,0.6\n", "line 3 lists case 'a' a second time"),
        ("case_id,metric,ggo\n", "holds no cases"),
    ],
)
def test_a_damaged_table_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "metrics_per_case.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_evaluation(path)
    assert str(path) in str(err.value)


def test_wrong_inputs_are_named(tmp_path):
    base = _evaluation(tmp_path / "base", {"a": (0.5, 0.5)})
    with pytest.raises(DataError, match="not found"):
        compare_evaluations([base], [tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metrics_per_case.csv or predictions.csv here or in its eval/"):
        compare_evaluations([base], [tmp_path / "empty"])
    grader = _graded(tmp_path / "grader", ["r0", "r1"], ["r0", "r1"])
    with pytest.raises(DataError, match="is a classification evaluation, .* a segmentation one"):
        compare_evaluations([base], [grader])
    other = _evaluation(tmp_path / "other", {"a": (0.6, 0.5)})
    with pytest.raises(DataError, match=r"holds no cDice \(its metrics: Dice, VolDice\)"):
        compare_evaluations([base], [other], metrics=["cDice"])
    with pytest.raises(FewLabelError, match="given twice"):
        compare_evaluations([base], [base / "metrics_per_case.csv"])


def test_compare_command_prints_and_writes_json(tmp_path, capsys):
    base = _evaluation(tmp_path / "base", {"a": (0.5, NAN), "b": (0.6, NAN)})
    cand = _evaluation(tmp_path / "cand", {"a": (0.7, NAN), "b": (0.7, 0.2)})
    out = tmp_path / "cmp.json"
    argv = ["compare", "--baseline", str(base), "--candidate", str(cand), "--output", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "candidate - baseline, paired by case (2 cases):"
    assert lines[2].split() == [
        "ggo",
        "Dice",
        "0.550",
        "0.700",
        "+0.150",
        "-0.485",
        "..",
        "+0.785",
        "2",
        "2/0/0",
        "0.5",  # sign test: both slices better
    ]
    # no case pairs for consolidation: nothing to report, and the JSON says null, not NaN
    assert lines[3].split() == ["consolidation", "Dice", "n/a", "n/a", "n/a", "n/a", "0", "0/0/0", "n/a"]
    saved = json.loads(out.read_text())
    assert saved["rows"][1]["difference"] is None and saved["rows"][0]["n"] == 2
    assert saved["baseline"] == [str(base / "metrics_per_case.csv")]

    before = out.read_text()
    assert main(argv) == 2
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "cmp.txt")]) == 2
    assert "writes a .json file" in capsys.readouterr().err
    assert (
        main(
            [
                "compare",
                "--baseline",
                str(base),
                "--candidate",
                str(tmp_path / "nope"),
                "--output",
                str(out),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "nope: not found" in capsys.readouterr().err
    assert out.read_text() == before  # a refused comparison leaves the old file as it was


def test_classification_evaluations_compare_accuracy_per_image(tmp_path):
    true = ["r0", "r0", "r1", "r1", "r2", "r2"]
    base = _graded(tmp_path / "base", true, ["r0", "r1", "r1", "r0", "r0", "r2"])  # 3 of 6 right
    cand = _graded(tmp_path / "cand", true, ["r0", "r0", "r1", "r1", "r2", "r0"])  # 5 of 6 right
    result = compare_evaluations([base], [cand])
    assert result["task"] == "classification"
    every = _row(result, "all", "accuracy")
    assert (every["baseline"], every["candidate"]) == (pytest.approx(0.5), pytest.approx(5 / 6))
    # discordant images: img1, img3, img4 right only for the candidate, img5 only for the baseline
    assert (every["better"], every["worse"], every["ties"]) == (3, 1, 2)
    assert every["p_sign"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)  # McNemar's exact test
    # per class: the share of that class's images graded right
    assert [_row(result, c, "accuracy")["n"] for c in ("r0", "r1", "r2")] == [2, 2, 2]
    assert _row(result, "r2", "accuracy")["difference"] == pytest.approx(0.0)
    lines = comparison_lines(result)
    assert lines[2].split()[:5] == ["all", "accuracy", "0.500", "0.833", "+0.333"]


def test_classification_needs_ground_truth_and_the_same_ground_truth(tmp_path):
    base = _graded(tmp_path / "base", ["r0", "r1"], ["r0", "r1"])
    unscored = _graded(tmp_path / "predicted", ["r0", "r1"], ["r0", "r0"], with_truth=False)
    with pytest.raises(DataError, match="has no true column"):
        compare_evaluations([base], [unscored])
    relabelled = _graded(tmp_path / "relabelled", ["r0", "r2"], ["r0", "r0"])
    with pytest.raises(DataError, match=r"other true classes than .* for 1 \(img1\)"):
        compare_evaluations([base], [relabelled])


def test_plot_draws_the_paired_cases_and_refuses_grading_runs(tmp_path, capsys):
    base = _evaluation(tmp_path / "base", {"a": (0.5, 0.1), "b": (0.6, 0.2)})
    cand = _evaluation(tmp_path / "cand", {"a": (0.7, 0.3), "b": (0.8, NAN)})
    plot, out = tmp_path / "cmp.png", tmp_path / "cmp.json"
    argv = ["compare", "--baseline", str(base), "--candidate", str(cand)]
    assert main([*argv, "--plot", str(plot), "--output", str(out)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ggo, cons = json.loads(out.read_text())["rows"]
    assert ggo["per_case"] == [
        {"case": "a", "baseline": 0.5, "candidate": 0.7},
        {"case": "b", "baseline": 0.6, "candidate": 0.8},
    ]
    assert [p["case"] for p in cons["per_case"]] == ["a"]  # b's candidate consolidation is undefined
    capsys.readouterr()

    graders = [_graded(tmp_path / n, ["r0", "r1"], ["r0", "r1"]) for n in ("g0", "g1")]
    new_plot = tmp_path / "grading.png"
    argv = ["compare", "--baseline", str(graders[0]), "--candidate", str(graders[1]), "--plot", str(new_plot)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "score 0 or 1 per image" in captured.err and captured.out == ""
    assert not new_plot.exists()


def test_a_reader_that_closes_the_pipe_stops_the_command_quietly(tmp_path, monkeypatch, capsys):
    """``fewlabel compare ... | head -1``: no traceback, the shell's status for SIGPIPE."""
    base = _evaluation(tmp_path / "base", {"a": (0.5, 0.2), "b": (0.6, 0.3)})
    cand = _evaluation(tmp_path / "cand", {"a": (0.6, 0.1), "b": (0.7, 0.3)})
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed_pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stdout", closed_pipe)
    try:
        status = main(["compare", "--baseline", str(base), "--candidate", str(cand)])
    finally:
        monkeypatch.undo()
        closed_pipe.close()
    assert status == 141
    assert "Traceback" not in capsys.readouterr().err
