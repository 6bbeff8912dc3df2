"""scripts/retinamnist.py: how it shares the cores, and how it scores seeds and their ensemble.

The numbers in docs/results.md come from this script's ``--collect`` path, so its
aggregation is checked here on run folders the test writes (no training, no real data).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from _factories import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("retinamnist")


def test_threads_are_shared_between_jobs_unless_set(script):
    assert script.share_threads([], jobs=2, cpus=2) == ["run.num_threads=1"]
    assert script.share_threads(["a=1"], jobs=2, cpus=16) == ["a=1", "run.num_threads=8"]
    assert script.share_threads([], jobs=3, cpus=2) == ["run.num_threads=1"]
    assert script.share_threads([], jobs=1, cpus=16) == []
    assert script.share_threads(["run.num_threads=4"], jobs=2, cpus=2) == ["run.num_threads=4"]


def _fake_run(root: Path, seed: int, y_true: np.ndarray, probs: np.ndarray, ids: list[str]) -> None:
    run = root / f"retinamnist-seed{seed}"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  image_size: 64\n")
    with (run / "eval" / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "true", "predicted", *[f"prob_{k}" for k in range(probs.shape[1])]])
        for image, y, p in zip(ids, y_true, probs, strict=True):
            writer.writerow([image, int(y), int(p.argmax()), *p.tolist()])


def test_collect_scores_each_seed_and_the_mean_of_their_probabilities(script, tmp_path):
    data = tmp_path / "absent.npz"  # --collect trains nothing and needs no dataset
    y = np.array([0, 1, 2, 2])
    ids = [f"test_{i}" for i in range(4)]
    # Seed 0 is right on images 0 and 2, seed 1 on images 1 and 2; their mean is right on 0, 1, 2.
    a = np.array([[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.1, 0.0, 0.9], [0.9, 0.1, 0.0]])
    b = np.array([[0.45, 0.55, 0.0], [0.0, 0.9, 0.1], [0.0, 0.2, 0.8], [0.1, 0.9, 0.0]])
    _fake_run(tmp_path, 0, y, a, ids)
    _fake_run(tmp_path, 1, y, b, ids)

    argv = ["--data", str(data), "--output-dir", str(tmp_path), "--seeds", "0", "1", "--collect"]
    assert script.main(argv) == 0

    summary_file = tmp_path / "retinamnist_summary.json"
    summary = json.loads(summary_file.read_text())
    assert summary["seeds"] == [0, 1] and summary["minutes"] is None
    accuracy = [r["accuracy"] for r in summary["results"]]
    assert accuracy == pytest.approx([0.5, 0.5, 0.75])
    assert summary["results"][2]["model"].endswith("2-seed ensemble")

    # The wall time a training invocation recorded survives a later --collect of its seeds.
    summary_file.write_text(json.dumps({**summary, "minutes": 25.0}))
    assert script.main(argv) == 0
    assert json.loads(summary_file.read_text())["minutes"] == 25.0


def test_collect_refuses_runs_scored_on_differently_ordered_images(script, tmp_path):
    data = tmp_path / "absent.npz"
    y = np.array([0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    _fake_run(tmp_path, 0, y, probs, ["test_0", "test_1"])
    _fake_run(tmp_path, 1, y[::-1], probs[::-1], ["test_1", "test_0"])

    argv = ["--data", str(data), "--output-dir", str(tmp_path), "--seeds", "0", "1", "--collect"]
    with pytest.raises(SystemExit, match="not in the same order"):
        script.main(argv)


@pytest.mark.parametrize(
    ("seeds", "jobs", "cpus", "expected"),
    [
        (["0"], 2, 2, []),  # one network: nothing to share the cores with
        (["0", "1"], 3, 4, ["run.num_threads=2"]),  # two networks, however many jobs
        (["0", "1", "2"], 2, 4, ["run.num_threads=2"]),
    ],
)
def test_cores_are_shared_between_the_networks_actually_trained_together(
    script, tmp_path, monkeypatch, seeds, jobs, cpus, expected
):
    data = tmp_path / "retinamnist.npz"
    data.touch()  # only checked to exist: the training is replaced below
    monkeypatch.setattr(script.os, "cpu_count", lambda: cpus)
    overrides = []

    def fake_train(seed: int, args) -> Path:
        overrides.append(list(args.set))
        probs = np.array([[0.9, 0.1], [0.2, 0.8]])
        _fake_run(tmp_path, seed, np.array([0, 1]), probs, ["test_0", "test_1"])
        return tmp_path / f"retinamnist-seed{seed}"

    monkeypatch.setattr(script, "train_seed", fake_train)
    argv = ["--data", str(data), "--output-dir", str(tmp_path), "--seeds", *seeds, "--jobs", str(jobs)]
    assert script.main(argv) == 0
    assert overrides == [expected] * len(seeds)


def test_collect_names_missing_runs_and_keeps_the_training_summary_of_other_seeds(script, tmp_path, capsys):
    data = tmp_path / "absent.npz"
    argv = ["--data", str(data), "--output-dir", str(tmp_path), "--collect"]
    assert script.main([*argv, "--seeds", "0"]) == 2
    assert "no finished run retinamnist-seed0" in capsys.readouterr().err
    y, probs = np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]])
    for seed in (0, 1):
        _fake_run(tmp_path, seed, y, probs, ["test_0", "test_1"])
    trained = {"seeds": [0, 1], "minutes": 25.0, "results": []}
    (tmp_path / "retinamnist_summary.json").write_text(json.dumps(trained))
    assert script.main([*argv, "--seeds", "0"]) == 0
    assert json.loads((tmp_path / "retinamnist_summary.json").read_text()) == trained
    assert json.loads((tmp_path / "retinamnist_summary_seeds0.json").read_text())["seeds"] == [0]


def test_finished_runs_and_their_logs_are_kept_without_overwrite(script, tmp_path, monkeypatch, capsys):
    data = tmp_path / "retinamnist.npz"
    data.touch()
    _fake_run(tmp_path, 0, np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["test_0", "test_1"])
    (tmp_path / "retinamnist-seed0.log").write_text("the training log\n")
    monkeypatch.setattr(script.subprocess, "run", lambda *a, **k: pytest.fail("would train"))
    assert script.main(["--data", str(data), "--output-dir", str(tmp_path), "--seeds", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "retinamnist-seed0.log").read_text() == "the training log\n"
