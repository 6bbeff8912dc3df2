"""scripts/covid_label_efficiency.py: tabulating finished arms, and the shared study.json.

docs/results.md quotes this script's tables; two processes of one study run side by side
and share its ``study.json``. Checked on run folders the test writes (no training, no data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _factories import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("covid_label_efficiency")


def _finished_arm(
    script, out: Path, name: str, seed: int, infection: float, minutes: float | None = None
) -> None:
    run = out / f"{name}-seed{seed}"
    (run / "eval").mkdir(parents=True)
    mean = {
        "1": {"Dice": 0.5},
        "2": {"Dice": 0.25},
        "3": {"Dice": infection, "Precision": 0.75, "Sensitivity": 0.5},
    }
    (run / "eval" / "summary.json").write_text(json.dumps({"mean": mean}))
    # two test slices whose infection Dice averages to `infection`
    (run / "eval" / "metrics_per_case.csv").write_text(
        "case_id,metric,ggo,consolidation,infection\n"
        f"s1,dice,0.5,0.25,{infection - 0.125}\ns2,dice,0.5,0.25,{infection + 0.125}\n"
    )
    if minutes is not None:
        (run / script._WALL_TIME).write_text(json.dumps({"minutes": minutes}))


def test_collect_needs_no_dataset_and_reads_the_recorded_times(script, tmp_path, capsys):
    _finished_arm(script, tmp_path, "sup10", 0, 0.625, minutes=12.5)
    _finished_arm(script, tmp_path, "tcsm10", 0, 0.6875)
    argv = ["--data", str(tmp_path / "absent"), "--collect", "--arms", "sup10", "tcsm10", "--seeds", "0"]
    assert script.main([*argv, "--output-dir", str(tmp_path)]) == 0
    rows = {r["arm"]: r for r in json.loads((tmp_path / "study.json").read_text())["results"]}
    assert rows["sup10"]["infection"] == 0.625 and rows["sup10"]["minutes"] == 12.5
    assert rows["tcsm10"]["minutes"] is None and rows["tcsm10"]["ggo"] == 0.5
    out = capsys.readouterr().out
    assert "| tcsm10 | 10 | 0 | 0.688 |" in out
    # the two 10-label arms, paired per test slice: +0.0625 on both slices
    paired = out.split("tcsm10 - sup10, seeds 0:\n")[1].splitlines()
    assert paired[3].split()[:5] == ["infection", "Dice", "0.625", "0.688", "+0.062"]
    assert paired[3].split()[-2:] == ["2/0/0", "0.5"]


def test_side_by_side_runs_keep_each_others_rows(script, tmp_path):
    study = tmp_path / "study.json"
    first = {"arm": "sup10", "seed": 0, "minutes": 20.0, "infection": 0.6}
    second = {"arm": "sup50", "seed": 0, "minutes": 19.0, "infection": 0.7}
    script._record(study, {"arms": ["sup10"]}, first)
    script._record(study, {"arms": ["sup50"]}, second)
    # Tabulating again without times keeps the recorded ones.
    assert script._record(study, {"collect": True}, {**first, "minutes": None})["minutes"] == 20.0
    saved = json.loads(study.read_text())
    assert [(r["arm"], r["minutes"]) for r in saved["results"]] == [("sup10", 20.0), ("sup50", 19.0)]
    assert len(saved["settings"]) == 3
