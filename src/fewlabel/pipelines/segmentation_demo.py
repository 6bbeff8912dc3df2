"""The segmentation demo: semi-supervised (TCSM) training on synthetic CT, end to end in seconds.

It writes a small synthetic chest-CT dataset in the MSD layout, trains a tiny 2.5D BasicUNet
with TCSM (two labelled training volumes, the rest unlabelled) for a few short epochs on the
CPU, evaluates the best model on held-out volumes (report with per-case metrics, box plots
and overlays), and predicts one study to NIfTI on its source grid. ``configs/demo_segmentation.yaml``
holds the same settings for ``fewlabel train``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DEMO_CONFIG", "DEMO_DATA", "run_segmentation_demo"]

#: The demo's experiment; ``data.path`` and ``run.output_dir`` are set to the demo folder.
DEMO_CONFIG: dict[str, Any] = {
    "task": "segmentation",
    # One thread: a network this small gains nothing from more, and a busy machine makes
    # multi-threaded small kernels many times slower.
    "run": {
        "output_dir": "fewlabel-demo/segmentation",
        "name": "run",
        "seed": 0,
        "device": "cpu",
        "num_threads": 1,
    },
    "data": {
        "format": "msd",
        "path": "fewlabel-demo/segmentation/data",
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "labeled_count": 2,
        "num_workers": 0,
        "cache": True,
    },
    "preprocess": {"modality": "ct", "window": [-1000, 400], "orientation": "RAS", "crop_foreground": False},
    "input": {"mode": "2.5d", "slab": 3, "axis": 2, "foreground_ratio": 0.5},
    "model": {"name": "basicunet", "features": [8, 8, 16, 32, 64, 8], "dropout": 0.0},
    "loss": {"include_background": False, "ce_weight": 1.0},
    "augment": {"rotate90": True, "flip": True, "intensity": False},
    "train": {
        "max_epochs": 6,
        "iterations_per_epoch": 15,
        "batch_size": 8,
        "optimizer": "adam",
        "lr": 0.005,
        "weight_decay": 1e-5,
        "scheduler": "cosine",
        "val_every": 3,
    },
    "tcsm": {
        "enabled": True,
        "unlabeled_batch_size": 8,
        "ema_decay": 0.95,
        "ema_warmup_iterations": 0,
        "consistency_weight": 1.0,
        "rampup_iterations": 45,
        "validate_teacher": True,
    },
    "eval": {"overlays": 3},
}

#: Synthetic dataset of the demo: 10 labelled volumes (2 kept for training, 2 validation,
#: 2 test, 4 demoted to unlabelled) and 4 unlabelled ones.
DEMO_DATA: dict[str, Any] = {"n_labeled": 10, "n_unlabeled": 4, "shape": (48, 48, 12), "seed": 0}

_SUBFOLDERS = ("data", "run", "predictions")


def run_segmentation_demo(output: Path) -> Path:
    """Run the segmentation demo into ``output``.

    Args:
        output: the demo's folder; its ``data/``, ``run/`` and ``predictions/`` are (re)created.

    Returns:
        The path of the evaluation report (``run/eval/report.html``).
    """
    from fewlabel.config import dump_config, parse_config
    from fewlabel.data.synthetic_ct import make_synthetic_ct
    from fewlabel.pipelines.demo import mark_demo_folder
    from fewlabel.pipelines.segmentation import predict, train
    from fewlabel.runs import create_run_dir, track_run

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    mark_demo_folder(output)
    for name in _SUBFOLDERS:
        # Only the demo's own folders are replaced; anything else in `output` stays.
        if (output / name).exists():
            shutil.rmtree(output / name)
    data = make_synthetic_ct(output / "data", **DEMO_DATA)
    raw = {**DEMO_CONFIG, "run": {**DEMO_CONFIG["run"], "output_dir": str(output)}}
    raw["data"] = {**DEMO_CONFIG["data"], "path": str(data)}
    cfg = parse_config(raw, source="segmentation demo")
    run = create_run_dir(output, "run")
    dump_config(cfg, run.config_file)
    log.info("segmentation demo: training TCSM on synthetic CT in %s", run.path)
    with track_run(run):
        result = train(cfg, run)
    if result["report"] is None:  # pragma: no cover - the demo split always has held-out volumes
        raise RuntimeError("the segmentation demo produced no evaluation report")
    study = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    predictions = predict(Path(result["best_checkpoint"]), [study], output / "predictions")
    log.info("segmentation demo: predicted %s into %s", study.name, predictions)
    return Path(result["report"])
