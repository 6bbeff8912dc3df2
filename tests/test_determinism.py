"""The same config and seed on the CPU give the same run, bit for bit.

A tiny classification run (GoogLeNet from scratch on synthetic fundus images) and a tiny
semi-supervised segmentation run (TCSM on synthetic CT) are each trained twice into the
same run folder (``--overwrite``, so that the paths quoted in reports are the same too).
The evaluation files must be byte-identical and every tensor of the final checkpoints equal.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.usefixtures("restore_determinism_flag")


def _train_twice(config: Path, run: Path, patterns: list[str]) -> tuple[dict, dict]:
    """Train twice into ``run``; check the checkpoints match; return both runs' files matching ``patterns``."""
    results = []
    for attempt in range(2):
        argv = ["train", str(config)] + (["--overwrite"] if attempt else [])
        assert main(argv) == 0
        outputs = {}
        for pattern in patterns:
            found = sorted(run.glob(pattern))
            assert found, f"no {pattern} in {run}"
            outputs.update({p.relative_to(run).as_posix(): p.read_bytes() for p in found})
        if "history.csv" in outputs:
            outputs["history.csv"] = history_without_timing(outputs["history.csv"])
        weights = {
            name: checkpoint_tensors(
                {k: v for k, v in load_checkpoint(run / "checkpoints" / name).items() if k != "meta"}
            )
            for name in ("best.pt", "last.pt")
        }
        results.append((outputs, weights))
    (first_files, first_weights), (second_files, second_weights) = results
    assert first_weights["best.pt"], "the checkpoint holds weights"
    for name in ("best.pt", "last.pt"):
        assert first_weights[name].keys() == second_weights[name].keys()
        differing = [
            key
            for key, value in first_weights[name].items()
            if value.dtype != second_weights[name][key].dtype
            or not torch.equal(value, second_weights[name][key])
        ]
        assert differing == [], f"{name}: tensors differ between identical runs: {differing[:5]}"
    return first_files, second_files


@pytest.mark.slow
def test_classification_run_is_reproducible(tmp_path: Path) -> None:
    data = make_synthetic_fundus(tmp_path / "fundus", n_per_class=4, num_classes=3, size=32)
    cfg = tiny_classification_config(
        data, tmp_path / "runs", run={"seed": 3, "deterministic": True}, train={"max_epochs": 2}
    )
    config = write_config(tmp_path / "exp.yaml", cfg)
    first, second = _train_twice(
        config, tmp_path / "runs" / "run", ["eval/metrics.json", "eval/predictions.csv", "history.csv"]
    )
    assert first == second
    assert b'"accuracy"' in first["eval/metrics.json"]


@pytest.mark.slow
def test_segmentation_tcsm_run_is_reproducible(tmp_path: Path) -> None:
    data = make_synthetic_ct(tmp_path / "ct", n_labeled=4, n_unlabeled=2, shape=(32, 32, 6), seed=0)
    cfg = tiny_segmentation_config(
        data,
        tmp_path / "runs",
        run={"seed": 5, "deterministic": True},
        data={"val_fraction": 0.25, "test_fraction": 0.25},
        train={"max_epochs": 2, "iterations_per_epoch": 2},
        tcsm={"enabled": True, "unlabeled_batch_size": 2, "rampup_iterations": 2},
    )
    config = write_config(tmp_path / "exp.yaml", cfg)
    run = tmp_path / "runs" / "run"
    patterns = ["eval/summary.json", "eval/metrics_per_case.csv", "eval/predictions/*.nii.gz", "history.csv"]
    first, second = _train_twice(config, run, patterns)
    assert first == second
