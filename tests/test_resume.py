"""The kill test: a run killed with SIGKILL and resumed ends exactly like an uninterrupted one.

A tiny classification run (GoogLeNet from scratch on synthetic fundus images) and a tiny
semi-supervised segmentation run (TCSM on synthetic CT) are first trained without
interruption. Each is then trained again, in the same run folder, as a separate
``python -m fewlabel train`` process that saves a resumable checkpoint every iteration and is
killed with SIGKILL once its checkpoints show that it is part-way through its second epoch.
No handler runs and nothing is flushed: this is what a power cut, the out-of-memory killer or
a cluster's time limit does. ``fewlabel train --resume RUN_DIR`` then finishes the run.

The resumed run must end with the same weights as the uninterrupted one (every tensor of
``checkpoints/last.pt`` and ``checkpoints/best.pt``, bit for bit, TCSM teacher and optimizer
state included), the same evaluation files and the same training history (bar wall-clock
times). Where exactly the kill lands depends on the machine's speed; the property must hold
wherever it lands, as long as it lands before the run completed, which is checked.

Runs are on the CPU with ``run.deterministic: true`` and one thread, the conditions under
which fewlabel promises bitwise reproducibility.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _factories import (
    checkpoint_tensors,
    history_without_timing,
    tiny_classification_config,
    tiny_segmentation_config,
    write_config,
)
from fewlabel.cli import main
from fewlabel.data.synthetic_ct import make_synthetic_ct
from fewlabel.data.synthetic_fundus import make_synthetic_fundus
from fewlabel.engines.checkpoint import load_checkpoint

# Numbered resumable checkpoints (train.checkpoint.keep_last > 1) carry their iteration in the name.
_NUMBERED = re.compile(r"^last-(\d+)\.pt$")
_KILL_TIMEOUT_S = 120.0


pytestmark = pytest.mark.usefixtures("restore_determinism_flag")


def _results(run: Path, patterns: list[str]) -> tuple[dict[str, object], dict[str, dict[str, torch.Tensor]]]:
    """The run's result files (by relative path) and every tensor of best.pt and last.pt."""
    files: dict[str, object] = {}
    for pattern in patterns:
        found = sorted(run.glob(pattern))
        assert found, f"no {pattern} in {run}"
        files.update({p.relative_to(run).as_posix(): p.read_bytes() for p in found})
    files["history.csv"] = history_without_timing(files["history.csv"])  # type: ignore[arg-type]
    weights = {
        name: checkpoint_tensors(
            {k: v for k, v in load_checkpoint(run / "checkpoints" / name).items() if k != "meta"}
        )
        for name in ("best.pt", "last.pt")
    }
    return files, weights


def _state(run: Path) -> str | None:
    status = run / "status.json"
    return json.loads(status.read_text())["state"] if status.is_file() else None


def _saved_iterations(checkpoints: Path) -> list[int]:
    if not checkpoints.is_dir():
        return []
    return sorted(int(m.group(1)) for p in checkpoints.iterdir() if (m := _NUMBERED.match(p.name)))


def _train_and_kill(config: Path, run: Path, kill_at: int, log: Path) -> None:
    """Train in a subprocess and SIGKILL it once a checkpoint of iteration ``kill_at`` exists."""
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the trainer
        proc = subprocess.Popen(
            [sys.executable, "-m", "fewlabel", "train", str(config)], stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            deadline = time.monotonic() + _KILL_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                saved = _saved_iterations(run / "checkpoints")
                if saved and saved[-1] >= kill_at:
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the training process ended by itself (exit {proc.returncode}) before it could be killed:\n"
        f"{log.read_text(errors='replace')[-3000:]}"
    )


def _resume(run: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fewlabel", "train", "--resume", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]


def _position(run: Path) -> object:
    """Where the killed run's resumable checkpoint stands (for failure messages)."""
    last = run / "checkpoints" / "last.pt"
    return load_checkpoint(last).get("engine") if last.is_file() else "no last.pt"


def _check_kill_and_resume(config: Path, run: Path, patterns: list[str], kill_at: int) -> None:
    """Uninterrupted run, then a killed and resumed run in the same folder; compare the results."""
    assert main(["train", str(config)]) == 0
    assert _state(run) == "completed"
    expected_files, expected_weights = _results(run, patterns)
    # The same folder, so that paths quoted in the reports match; emptied, so that polling
    # sees only the new run's checkpoints.
    shutil.rmtree(run)

    _train_and_kill(config, run, kill_at, run.parent / "killed.log")
    # SIGKILL leaves no chance to write anything: the run still says it is running.
    assert _state(run) == "running", "the kill landed after the run had completed"
    landed = _position(run)
    _resume(run)
    assert _state(run) == "completed"

    files, weights = _results(run, patterns)
    assert weights["best.pt"], "the checkpoint holds weights"
    for name in ("best.pt", "last.pt"):
        assert weights[name].keys() == expected_weights[name].keys(), name
        differing = [
            key
            for key, value in expected_weights[name].items()
            if value.dtype != weights[name][key].dtype or not torch.equal(value, weights[name][key])
        ]
        assert differing == [], f"{name}: tensors differ after a kill at {landed} and resume: {differing[:5]}"
    for name, content in expected_files.items():
        assert files.get(name) == content, f"{name} differs after a kill at {landed} and resume"
    assert files.keys() == expected_files.keys()


@pytest.mark.slow
def test_classification_survives_sigkill_mid_epoch(tmp_path: Path) -> None:
    data = make_synthetic_fundus(tmp_path / "fundus", n_per_class=4, num_classes=3, size=32)
    cfg = tiny_classification_config(
        data,
        tmp_path / "runs",
        run={"seed": 3, "deterministic": True},
        model={"aux_logits": False},
        # Mixup too: its draws come from the RNG state the checkpoints carry.
        train={
            "max_epochs": 3,
            "batch_size": 2,
            "mixup_alpha": 0.4,
            "checkpoint": {"every_n_iterations": 1, "keep_last": 2},
        },
    )
    config = write_config(tmp_path / "exp.yaml", cfg)
    run = tmp_path / "runs" / "run"
    # 6 training images in batches of 2: 3 iterations per epoch; kill in the middle of epoch 2.
    _check_kill_and_resume(
        config, run, ["eval/metrics.json", "eval/predictions.csv", "history.csv"], kill_at=5
    )


@pytest.mark.slow
def test_segmentation_tcsm_survives_sigkill_mid_epoch(tmp_path: Path) -> None:
    data = make_synthetic_ct(tmp_path / "ct", n_labeled=4, n_unlabeled=2, shape=(32, 32, 6), seed=0)
    cfg = tiny_segmentation_config(
        data,
        tmp_path / "runs",
        run={"seed": 5, "deterministic": True},
        data={"val_fraction": 0.25, "test_fraction": 0.25},
        # Dropout draws from torch's global random stream, which resuming must restore exactly.
        model={"dropout": 0.1},
        train={
            "max_epochs": 3,
            "iterations_per_epoch": 4,
            "checkpoint": {"every_n_iterations": 1, "keep_last": 2},
        },
        tcsm={"enabled": True, "unlabeled_batch_size": 2, "rampup_iterations": 4},
    )
    config = write_config(tmp_path / "exp.yaml", cfg)
    run = tmp_path / "runs" / "run"
    patterns = ["eval/summary.json", "eval/metrics_per_case.csv", "eval/predictions/*.nii.gz", "history.csv"]
    # 4 iterations per epoch; kill in the middle of epoch 2.
    _check_kill_and_resume(config, run, patterns, kill_at=6)


def test_segmentation_epoch_end_checkpoint_holds_the_epoch(tmp_path: Path) -> None:
    # Saving every 2 iterations of 2-iteration epochs puts each periodic save on an epoch end,
    # where last.pt must already hold that epoch's history row and best model.
    data = make_synthetic_ct(tmp_path / "ct", n_labeled=4, n_unlabeled=2, shape=(32, 32, 4), seed=0)
    cfg = tiny_segmentation_config(
        data,
        tmp_path / "runs",
        run={"seed": 5},
        data={"val_fraction": 0.25, "test_fraction": 0.0},
        train={"max_epochs": 2, "iterations_per_epoch": 2, "checkpoint": {"every_n_iterations": 2}},
        tcsm={"enabled": True, "unlabeled_batch_size": 2, "rampup_iterations": 4},
    )
    assert main(["train", str(write_config(tmp_path / "exp.yaml", cfg))]) == 0
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    last = load_checkpoint(checkpoints / "last.pt")
    best_meta = load_checkpoint(checkpoints / "best.pt")["meta"]
    assert last["engine"]["iteration"] == 4
    assert [row["epoch"] for row in last["history"]] == [1, 2]
    assert last["best"] == {
        "value": best_meta["best_value"],
        "model_name": best_meta["model_name"],
        "epoch": best_meta["epoch"],
    }
