"""scripts/covid_label_efficiency.py: tabulating finished arms, and the shared study.json.

docs/results.md quotes this script's tables; two processes of one study run side by side
and share its ``study.json``. Checked on run folders the test writes (no training, no data).
"""

from __future__ import annotations

import json
import threading
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
    assert script._record(study, None, {**first, "minutes": None})["minutes"] == 20.0
    saved = json.loads(study.read_text())
    assert [(r["arm"], r["minutes"]) for r in saved["results"]] == [("sup10", 20.0), ("sup50", 19.0)]
    assert len(saved["settings"]) == 2  # a tabulation (settings None) records none


def test_collect_tabulates_the_finished_runs_it_finds_and_records_no_settings(script, tmp_path, capsys):
    _finished_arm(script, tmp_path, "sup10", 0, 0.625)
    _finished_arm(script, tmp_path, "tcsm10", 0, 0.6875)
    _finished_arm(script, tmp_path, "sup50", 1, 0.75)
    (tmp_path / "tcsm50-seed0").mkdir()  # still training: no eval/ yet
    argv = ["--data", str(tmp_path / "absent"), "--collect", "--output-dir", str(tmp_path)]
    assert script.main(argv) == 0
    saved = json.loads((tmp_path / "study.json").read_text())
    assert [(r["arm"], r["seed"]) for r in saved["results"]] == [("sup10", 0), ("tcsm10", 0), ("sup50", 1)]
    assert saved["settings"] == []  # tabulating is no run of the study
    captured = capsys.readouterr()
    assert "tcsm10 - sup10, seeds 0:" in captured.out
    assert "sup50 - " not in captured.out and "- sup50" not in captured.out  # no seed in common
    assert "tcsm50-seed0" in captured.err


def test_collect_names_every_missing_run_and_writes_nothing(script, tmp_path, capsys):
    _finished_arm(script, tmp_path, "sup10", 0, 0.625)
    _finished_arm(script, tmp_path, "tcsm10", 0, 0.6875)
    argv = ["--data", str(tmp_path / "absent"), "--collect", "--output-dir", str(tmp_path)]
    assert script.main([*argv, "--arms", "sup10", "tcsm10", "--seeds", "0", "1"]) == 2
    assert "sup10-seed1, tcsm10-seed1" in capsys.readouterr().err
    assert not (tmp_path / "study.json").exists()


def test_records_written_at_the_same_time_all_survive(script, tmp_path):
    study = tmp_path / "study.json"
    rows = [{"arm": arm, "seed": seed, "minutes": 1.0} for arm in script.ARMS for seed in range(4)]
    # One thread per row, released together: without a lock, writers that read the file
    # before another's rename drop that row.
    barrier = threading.Barrier(len(rows))

    def record(row: dict) -> None:
        barrier.wait()
        script._record(study, {"arms": [row["arm"]]}, row)

    threads = [threading.Thread(target=record, args=(row,)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    saved = json.loads(study.read_text())
    assert len(saved["results"]) == len(rows)
    assert len(saved["settings"]) == len(script.ARMS)


def _no_training(name: str, seed: int, args) -> dict:
    raise AssertionError(f"{name}-seed{seed} would have been trained")


@pytest.mark.parametrize("iterations", ["30", "0", "-50"])
def test_iterations_must_be_whole_epochs(script, tmp_path, monkeypatch, capsys, iterations):
    monkeypatch.setattr(script, "run_arm", _no_training)
    argv = ["--data", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--iterations", iterations]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert "multiple of --iterations-per-epoch" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "flag"),
    [
        ("run.seed=3", "--seeds"),
        ("run.name=x", "--arms"),
        ("run.output_dir=/tmp/x", "--output-dir"),
        ("data.labeled_count=20", "--arms"),
        ("tcsm.enabled=true", "--arms"),
        ("train.max_epochs=5", "--iterations"),
        ("preprocess.slice_size=[64, 64]", "--slice-size"),
        ("data.path=/elsewhere", "--data"),
        ("data.labeled_fraction=0.2", "--arms"),
        ("data.folds=5", "trains on every labelled slice"),
        ("data.test_fraction=0.1", "--data"),
        ("run={seed: 3}", "run.seed"),
    ],
)
def test_set_refuses_what_the_script_controls(script, tmp_path, monkeypatch, capsys, override, flag):
    monkeypatch.setattr(script, "run_arm", _no_training)
    argv = ["--data", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--set", override]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and flag in err


def test_the_plot_shows_every_arm_of_the_study_not_only_this_calls(script, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(script, "plot", lambda rows, path: drawn.append(sorted(r["arm"] for r in rows)))
    for name in ("sup10", "tcsm10", "sup50", "tcsm50"):
        _finished_arm(script, tmp_path, name, 0, 0.625)
    argv = ["--data", str(tmp_path / "absent"), "--collect", "--output-dir", str(tmp_path), "--seeds", "0"]
    # As two processes side by side would: each records its own two arms, in turn.
    assert script.main([*argv, "--arms", "sup10", "tcsm10"]) == 0
    assert script.main([*argv, "--arms", "sup50", "tcsm50"]) == 0
    assert drawn[-1] == ["sup10", "sup50", "tcsm10", "tcsm50"]


def test_finished_runs_are_retrained_only_with_overwrite(script, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _finished_arm(script, out, "sup10", 0, 0.625)
    monkeypatch.setattr(script, "run_arm", _no_training)
    argv = ["--data", str(tmp_path), "--output-dir", str(out), "--arms", "sup10", "tcsm10"]
    # Refused before anything trains, so tcsm10-seed0 is not trained either.
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert "sup10-seed0" in err and "--overwrite" in err and "tcsm10" not in err
    assert (out / "sup10-seed0" / "eval" / "summary.json").is_file()

    trained = []

    def record(name, seed, args):
        trained.append((name, args.overwrite))
        if not (out / f"{name}-seed{seed}").exists():
            _finished_arm(script, out, name, seed, 0.6)
        return {
            "arm": name,
            "seed": seed,
            "labels": 10,
            "tcsm": False,
            "minutes": 1.0,
            "infection": 0.6,
            "ggo": 0.5,
            "consolidation": 0.2,
        }

    monkeypatch.setattr(script, "run_arm", record)
    assert script.main([*argv, "--overwrite"]) == 0
    assert trained == [("sup10", True), ("tcsm10", True)]


def test_run_arm_passes_overwrite_to_fewlabel_only_when_asked(script, tmp_path, monkeypatch):
    import fewlabel.cli

    calls = []

    def fake_train(argv):
        calls.append(argv)
        _finished_arm(script, tmp_path, "sup10", len(calls), 0.625)
        return 0

    monkeypatch.setattr(fewlabel.cli, "main", fake_train)
    for seed, overwrite in ((1, False), (2, True)):
        args = script.argparse.Namespace(
            data=str(tmp_path),
            iterations=50,
            iterations_per_epoch=50,
            slice_size=32,
            threads=1,
            output_dir=str(tmp_path),
            set=[],
            overwrite=overwrite,
        )
        script.run_arm("sup10", seed, args)
    assert ["--overwrite" in argv for argv in calls] == [False, True]


def _config(script, out: Path, name: str, seed: int, **changes: object) -> None:
    import yaml

    config = {
        "run": {"seed": seed, "name": f"{name}-seed{seed}", "num_threads": 1},
        "data": {"labeled_count": 10 if name.endswith("10") else None},
        "preprocess": {"slice_size": [192, 192]},
        "train": {"max_epochs": 24},
        "tcsm": {"enabled": name.startswith("tcsm"), "consistency_weight": 100.0},
    }
    for key, value in changes.items():
        section, field = key.split("__")
        config[section][field] = value
    (out / f"{name}-seed{seed}" / "config.yaml").write_text(yaml.safe_dump(config))


def test_runs_trained_with_other_settings_are_flagged_and_not_paired(script, tmp_path, capsys):
    for name, seed in (("sup10", 0), ("tcsm10", 0), ("sup10", 1), ("tcsm10", 1)):
        _finished_arm(script, tmp_path, name, seed, 0.625)
    # Same settings but the arm's own (seed, labels, method): comparable.
    for name, seed in (("sup10", 0), ("tcsm10", 0), ("sup10", 1)):
        _config(script, tmp_path, name, seed)
    _config(script, tmp_path, "tcsm10", 1, preprocess__slice_size=[48, 48])
    argv = ["--data", str(tmp_path / "absent"), "--collect", "--output-dir", str(tmp_path)]
    assert script.main([*argv, "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "Warning" not in out and "tcsm10 - sup10, seeds 0:" in out
    assert script.main([*argv, "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "preprocess.slice_size: sup10-seed1 [192, 192], tcsm10-seed1 [48, 48]" in out
    assert "tcsm10 - sup10, seeds 1: not paired, the runs differ in preprocess.slice_size" in out


def test_tcsm_settings_may_differ_between_arms_but_not_between_seeds_of_one(script, tmp_path):
    for name, seed in (("tcsm10", 0), ("tcsm50", 0), ("tcsm10", 1)):
        _finished_arm(script, tmp_path, name, seed, 0.625)
    _config(script, tmp_path, "tcsm10", 0)
    _config(script, tmp_path, "tcsm50", 0, tcsm__consistency_weight=10.0)
    assert script.setting_differences(tmp_path, [("tcsm10", 0), ("tcsm50", 0)]) == {}
    _config(script, tmp_path, "tcsm10", 1, tcsm__consistency_weight=10.0)
    differences = script.setting_differences(tmp_path, [("tcsm10", 0), ("tcsm50", 0), ("tcsm10", 1)])
    assert differences == {"tcsm.consistency_weight": {"tcsm10-seed0": "100.0", "tcsm10-seed1": "10.0"}}


def test_the_plot_leaves_out_runs_no_longer_there(script, tmp_path, monkeypatch):
    import shutil

    drawn = []
    monkeypatch.setattr(script, "plot", lambda rows, path: drawn.append(sorted(r["arm"] for r in rows)))
    for name in ("sup10", "tcsm10"):
        _finished_arm(script, tmp_path, name, 0, 0.625)
    argv = ["--data", str(tmp_path / "absent"), "--collect", "--output-dir", str(tmp_path)]
    assert script.main(argv) == 0
    shutil.rmtree(tmp_path / "tcsm10-seed0")
    assert script.main(argv) == 0
    assert drawn == [["sup10", "tcsm10"], ["sup10"]]


def test_the_monai_reference_keeps_an_earlier_result_without_overwrite(tmp_path, capsys):
    reference = load_script("covid_monai_reference")
    (tmp_path / "reference.json").write_text('{"seed": 0}')
    argv = ["--data", str(tmp_path / "absent"), "--output-dir", str(tmp_path), "--seed", "1"]
    assert reference.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "reference.json").read_text() == '{"seed": 0}'
