"""CSV cells that a spreadsheet would run as formulas are stored as text and read back intact."""

from __future__ import annotations

import csv
import math

import pytest

from fewlabel.metrics.segmentation import CaseResult
from fewlabel.reports.classification import predictions_csv_text
from fewlabel.reports.comparison import read_evaluation
from fewlabel.reports.segmentation import metrics_per_case_csv_text
from fewlabel.utils.csv_cells import csv_text, escape_cell, unescape_cell


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1", "'+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tcmd", "'\tcmd"),
        ("\rcmd", "'\rcmd"),
        ("'=quoted", "''=quoted"),
        ("''-twice", "'''-twice"),
        ("patient-01", "patient-01"),
        ("'plain", "'plain"),
        ("'", "'"),
        ("", ""),
    ],
)
def test_formula_cells_get_one_quote_and_lose_exactly_that_one(text, stored):
    assert escape_cell(text) == stored
    assert unescape_cell(stored) == text


def test_a_case_named_like_a_formula_is_text_in_the_per_case_table_and_compares_by_its_name(tmp_path):
    cases = [CaseResult(case_id=name, metrics={"dice": {1: 0.5}}) for name in ("=cmd|' /C calc'!A0", "-1")]
    text = metrics_per_case_csv_text(cases, ["background", "lesion"])
    rows = list(csv.reader(text.splitlines()))
    assert [row[0] for row in rows[1:]] == ["'=cmd|' /C calc'!A0", "'-1"]

    (tmp_path / "metrics_per_case.csv").write_text(text, encoding="utf-8")
    read = read_evaluation(tmp_path / "metrics_per_case.csv")
    assert sorted(read.values["dice"]) == ["-1", "=cmd|' /C calc'!A0"]


def test_grading_predictions_escape_image_names_not_probabilities(tmp_path):
    text = predictions_csv_text(["=evil.png", "ok.png"], [[0.25, 0.75], [0.9, 0.1]], ["no", "yes"], [1, 0])
    rows = list(csv.reader(text.splitlines()))
    assert rows[1][:3] == ["'=evil.png", "yes", "yes"]
    assert rows[2][3:] == ["0.900000", "0.100000"]

    (tmp_path / "predictions.csv").write_text(text, encoding="utf-8")
    read = read_evaluation(tmp_path / "predictions.csv")
    assert read.values["accuracy"]["=evil.png"][0] == 1.0
    assert math.isnan(read.values["accuracy"]["ok.png"][2])


def test_a_carriage_return_in_a_name_keeps_its_row_whole(tmp_path):
    names = ["scan\r2", "plain"]
    cases = [CaseResult(case_id=name, metrics={"dice": {1: 0.5}}) for name in names]
    text = metrics_per_case_csv_text(cases, ["background", "lesion"])
    (tmp_path / "metrics_per_case.csv").write_text(text, encoding="utf-8", newline="")
    with (tmp_path / "metrics_per_case.csv").open(newline="", encoding="utf-8") as f:
        assert [row[0] for row in csv.reader(f)][1:] == names  # two rows, not three
    assert sorted(read_evaluation(tmp_path / "metrics_per_case.csv").values["dice"]) == sorted(names)
    # Without such a name the file stays as before: only cells that need it are quoted.
    assert csv_text([["a", "b,c"], ["1", "2"]]) == 'a,"b,c"\n1,2\n'
