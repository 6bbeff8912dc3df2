"""``fewlabel demo``: every pipeline end to end on synthetic data, in about a minute on a CPU.

The classification part writes a synthetic fundus set (five grades), trains GoogLeNet from
scratch on it with the settings of ``configs/demo_classification.yaml`` (kept here too, so
the demo works from an installed package without the repository), evaluates the best
checkpoint and predicts a few images. Demo results show that the machinery works; the
data are synthetic and the numbers mean nothing clinically.

Layout of the demo folder::

    <output>/classification/data/             synthetic images, one folder per grade
    <output>/classification/run/              run folder (checkpoints, history, eval/report.html)
    <output>/classification/predictions.csv   ``fewlabel predict`` output for a few images
    <output>/segmentation/...                 the segmentation demo (when available)
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

from fewlabel.errors import FewLabelError

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_CLASSIFICATION",
    "DEMO_FUNDUS",
    "DEMO_MARKER",
    "mark_demo_folder",
    "run_classification_demo",
    "run_demo",
]

# Written into each demo subfolder, so that --overwrite only ever deletes folders a demo made.
DEMO_MARKER = ".fewlabel-demo"
# Demo folders from before the marker hold a run folder.
_DEMO_MARKERS = (DEMO_MARKER, "run/status.json")

# Arguments of fewlabel.data.synthetic_fundus.make_synthetic_fundus for the demo data.
DEMO_FUNDUS: dict[str, Any] = {"n_per_class": 24, "num_classes": 5, "size": 64, "seed": 0}

# The experiment of configs/demo_classification.yaml (run.output_dir and data.path are
# filled in with the demo folder).
DEMO_CLASSIFICATION: dict[str, Any] = {
    "task": "classification",
    "run": {
        "output_dir": "fewlabel-demo/classification",
        "name": "run",
        "seed": 0,
        "device": "cpu",
        "deterministic": False,
        "num_threads": 1,
    },
    "data": {
        "format": "folder",
        "path": "fewlabel-demo/classification/data",
        "val_fraction": 0.15,
        "test_fraction": 0.15,
        "class_balance": "none",
        "num_workers": 0,
        "cache": True,
    },
    "model": {"weights": "none", "freeze": "none", "dropout": 0.2, "aux_logits": False, "image_size": 64},
    "augment": {"rotate90": True, "flip": False},
    "train": {
        "mode": "finetune",
        "max_epochs": 6,
        "batch_size": 8,
        "optimizer": "adam",
        "lr_head": 0.001,
        "lr_backbone": 0.001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "val_every": 1,
        "best_metric": "auto",
        "early_stopping_patience": 0,
    },
    "eval": {"tta_rotations": False, "gallery_size": 8},
}

_SEGMENTATION_MODULE = "fewlabel.pipelines.segmentation_demo"


def run_demo(output: Path, segmentation: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Run the demos into ``output``.

    Args:
        output: the demo folder (created).
        segmentation: also run the segmentation demo.
        overwrite: replace the demo's own subfolders when they exist already (nothing
            else in ``output`` is touched).

    Returns:
        Report paths by demo name (``"classification"``, ``"segmentation"``).

    Raises:
        FewLabelError: if the demo folder holds a previous demo and ``overwrite`` is false.
        RunDirError: with ``overwrite``, if a folder the demo would replace was not made by a
            demo (a ``classification`` or ``segmentation`` folder of your own).
    """
    from fewlabel.utils.files import check_replaceable

    output = Path(output)
    parts = ["classification"] + (["segmentation"] if segmentation else [])
    existing = [output / p for p in parts if (output / p).exists() or (output / p).is_symlink()]
    if existing and not overwrite:
        raise FewLabelError(f"{existing[0]}: exists already; choose another --output or pass --overwrite")
    for folder in existing:
        # Before anything is deleted, so that a refused folder leaves the other one intact too.
        check_replaceable(folder, markers=_DEMO_MARKERS)
    output.mkdir(parents=True, exist_ok=True)
    reports = {"classification": run_classification_demo(output / "classification")}
    if segmentation:
        # The segmentation demo lives in its own module; it is optional in this build.
        if importlib.util.find_spec(_SEGMENTATION_MODULE) is None:
            log.info("segmentation demo not available in this installation; skipped")
        else:
            from fewlabel.pipelines.segmentation_demo import run_segmentation_demo

            reports["segmentation"] = Path(run_segmentation_demo(output / "segmentation"))
    return reports


def mark_demo_folder(folder: Path) -> None:
    """Mark ``folder`` as made by the demo, which allows ``fewlabel demo --overwrite`` to replace it.

    Args:
        folder: an existing demo subfolder.
    """
    (Path(folder) / DEMO_MARKER).write_text("made by fewlabel demo; --overwrite may replace this folder\n")


def run_classification_demo(output: Path) -> Path:
    """Synthetic fundus data, training, evaluation and prediction in ``output``.

    Args:
        output: the classification demo folder; an existing one is replaced.

    Returns:
        The path of the evaluation report (``run/eval/report.html``).
    """
    from fewlabel.config import dump_config, parse_config
    from fewlabel.data.synthetic_fundus import make_synthetic_fundus
    from fewlabel.pipelines.classification import predict, train
    from fewlabel.runs import create_run_dir, track_run

    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    mark_demo_folder(output)
    data = make_synthetic_fundus(output / "data", **DEMO_FUNDUS)
    raw = {
        **DEMO_CLASSIFICATION,
        "run": {**DEMO_CLASSIFICATION["run"], "output_dir": str(output)},
        "data": {**DEMO_CLASSIFICATION["data"], "path": str(data)},
    }
    cfg = parse_config(raw, source="classification demo")
    run = create_run_dir(output, cfg.run.name)
    dump_config(cfg, run.config_file)
    log.info("classification demo: training GoogLeNet on synthetic fundus images in %s", run.path)
    with track_run(run):
        result = train(cfg, run)
    examples = [sorted((data / f"grade_{g}").glob("*.png"))[0] for g in range(DEMO_FUNDUS["num_classes"])]
    predictions = predict(Path(result["checkpoint"]), examples, output / "predictions.csv")
    log.info("classification demo: predictions for %d images in %s", len(examples), predictions)
    return Path(result["report"])
