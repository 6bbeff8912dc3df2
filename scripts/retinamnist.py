"""Train and test GoogLeNet on RetinaMNIST, and print the numbers for docs/results.md.

Runs ``fewlabel train`` with ``configs/retinamnist_googlenet.yaml`` on the official MedMNIST
v2 split (train 1080 / val 120 / test 400), then reads the test metrics of the checkpoint
with the best validation AUC. Published MedMNIST v2 results (test AUC / ACC) are printed
beside ours.

Usage::

    .venv/bin/python scripts/retinamnist.py --data ../shared/data/retinamnist/retinamnist.npz
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fewlabel.cli import main as fewlabel_main

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {
    "ResNet-18 (28)": (0.717, 0.524),
    "ResNet-18 (224)": (0.710, 0.493),
    "ResNet-50 (28)": (0.726, 0.528),
    "auto-sklearn": (0.690, 0.515),
    "AutoKeras": (0.719, 0.503),
    "Google AutoML Vision": (0.750, 0.531),
}


def main(argv: list[str] | None = None) -> int:
    """Run the experiment.

    Args:
        argv: command-line arguments.

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "retinamnist" / "retinamnist.npz"))
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="retinamnist")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"RetinaMNIST not found at {args.data}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    status = fewlabel_main(
        [
            "train", str(REPO / "configs" / "retinamnist_googlenet.yaml"),
            "--set", f"data.path={args.data}", "--set", f"run.output_dir={args.output_dir}",
            "--set", f"run.name={args.name}", *[x for s in args.set for x in ("--set", s)],
            *(["--overwrite"] if args.overwrite else []),
        ]
    )
    minutes = (time.perf_counter() - start) / 60
    if status != 0:
        return status
    run = Path(args.output_dir) / args.name
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    m = metrics.get("metrics", metrics)
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; wall time {minutes:.1f} min")
    print("| model | test AUC | test ACC |")
    print("|---|---|---|")
    import yaml

    size = yaml.safe_load((run / "config.yaml").read_text())["model"]["image_size"]
    print(f"| fewlabel GoogLeNet ({size} px, from scratch) | {m['auc']:.3f} | {m['accuracy']:.3f} |")
    for name, (auc, acc) in PUBLISHED.items():
        print(f"| {name} | {auc:.3f} | {acc:.3f} |")
    summary = {"auc": m["auc"], "accuracy": m["accuracy"], "kappa": m.get("kappa"), "minutes": round(minutes, 2)}
    (run / "retinamnist_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
