"""The score lines the command line prints after training and evaluation."""

from __future__ import annotations

import math

import numpy as np

from fewlabel.cli import main
from fewlabel.metrics.segmentation import CaseResult, summarize
from fewlabel.reports.console import score_lines


def test_classification_scores_in_one_line():
    metrics = {"n": 40, "accuracy": 0.525, "balanced_accuracy": 0.4, "auc": 0.75, "kappa": None}
    assert score_lines(metrics) == [
        "test scores (40 images): accuracy 0.525, balanced accuracy 0.400, AUC 0.750, kappa n/a"
    ]
    assert score_lines(None) == []


def test_segmentation_scores_per_class():
    cases = [
        CaseResult("a", {"dice": {1: 0.5, 2: math.nan}, "voldice": {1: 0.7, 2: math.nan}}),
        CaseResult("b", {"dice": {1: 1.0, 2: 0.25}, "voldice": {1: 0.9, 2: 0.25}}),
    ]
    lines = score_lines(summarize(cases, ["background", "ggo", "consolidation"]))
    assert lines[0] == "test scores (2 cases, mean over cases):"
    assert lines[1].split() == ["class", "Dice", "VolDice", "n"]
    assert lines[2].split() == ["ggo", "0.750", "0.800", "2"]
    # the undefined Dice of case a is left out of the mean and of n
    assert lines[3].split() == ["consolidation", "0.250", "0.250", "1"]


def test_wide_class_names_keep_the_columns_aligned():
    from fewlabel.utils.text import display_width

    cases = [CaseResult("a", {"dice": {1: 0.5, 2: 0.25}, "voldice": {1: 0.7, 2: 0.25}})]
    lines = score_lines(summarize(cases, ["background", "磨玻璃影", "consolidation"]))
    # a terminal gives each of the four characters two columns: the numbers line up below the header
    header, wide, latin = lines[1], lines[2], lines[3]
    column = display_width(header[: header.index("Dice") + len("Dice")])
    assert display_width(wide[: wide.index("0.500") + 5]) == column
    assert display_width(latin[: latin.index("0.250") + 5]) == column
    assert display_width("磨玻璃影") == 8 and display_width("e\u0301") == 1


def test_evaluate_prints_the_scores(tmp_path, capsys):
    from PIL import Image

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 2:6] = 1
    Image.fromarray(mask).save(gt / "s1.png")
    shifted = np.roll(mask, 2, axis=1)  # 8 of 16 predicted voxels right, 8 of 16 true found
    Image.fromarray(shifted).save(pred / "s1.png")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "scores (1 case, mean over cases):"
    assert out[2].split() == ["class_1", "0.500", "0.500", "0.500", "0.500", "1"]
    assert out[-1] == f"report: {tmp_path / 'out' / 'report.html'}"


def test_a_mean_over_fewer_cases_shows_its_count():
    from fewlabel.utils.text import display_width

    nan = math.nan
    # nothing predicted in case b (precision undefined), nothing true in cases c and d
    # (sensitivity undefined): Dice and VolDice are defined, as 0, in all four
    cases = [
        CaseResult(
            name,
            {"dice": {1: d}, "voldice": {1: d}, "precision": {1: p}, "sensitivity": {1: s}},
        )
        for name, d, p, s in [
            ("a", 0.5, 0.4, 0.6),
            ("b", 0.0, nan, 0.0),
            ("c", 0.0, 0.0, nan),
            ("d", 0.0, 0.0, nan),
        ]
    ]
    lines = score_lines(summarize(cases, ["background", "ggo"]))
    assert lines[2].split() == ["ggo", "0.125", "0.125", "0.133", "(3)", "0.300", "(2)", "4"]
    # each value column still ends under its header, and n under n
    header, row = lines[1], lines[2]
    for label, cell in [("Dice", "0.125"), ("Precision", "0.133 (3)"), ("Sensitivity", "0.300 (2)")]:
        end = display_width(header[: header.index(label) + len(label)])
        assert display_width(row[: row.index(cell) + len(cell)]) == end
    assert len(row) == len(header)


def test_a_count_wider_than_the_column_widens_it():
    cases = [
        CaseResult(f"c{i}", {"dice": {1: 1.0}, "precision": {1: 1.0 if i < 1000 else math.nan}})
        for i in range(1001)
    ]
    header, row = score_lines(summarize(cases, ["background", "lesion"]))[1:3]
    assert row.split() == ["lesion", "1.000", "1.000", "(1000)", "1001"]
    assert row.index("(1000)") + len("(1000)") == header.index("Precision") + len("Precision")
    assert len(row) == len(header)
