"""Train and test GoogLeNet on RetinaMNIST, and print the numbers for docs/results.md.

Runs ``fewlabel train`` with ``configs/retinamnist_googlenet.yaml`` on the official MedMNIST
v2 split (train 1080 / val 120 / test 400), once per seed, then reads the test predictions
of each run's best checkpoint (by validation AUC). With several seeds the script also scores
the seed ensemble: the mean of the runs' test-set class probabilities. Published MedMNIST
v2 results (test AUC / ACC) are printed beside ours.

Why an ensemble: with 120 validation images the checkpoint choice of a single run is noisy
(test AUC moves by about ±0.02 between seeds); averaging a few independently trained
networks removes most of that variance at a cost that is linear in the number of seeds.

Usage::

    .venv/bin/python scripts/retinamnist.py --data ../shared/data/retinamnist/retinamnist.npz

The defaults train the five networks of docs/results.md (seeds 0-4), two at a time with the
cores shared between them: about 25 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fewlabel.metrics.classification import classification_metrics
from fewlabel.utils.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {
    "ResNet-18 (28)": (0.717, 0.524),
    "ResNet-18 (224)": (0.710, 0.493),
    "ResNet-50 (28)": (0.726, 0.528),
    "auto-sklearn": (0.690, 0.515),
    "AutoKeras": (0.719, 0.503),
    "Google AutoML Vision": (0.750, 0.531),
}


def share_threads(overrides: list[str], jobs: int, cpus: int | None = None) -> list[str]:
    """Split the CPU cores between the networks trained at the same time.

    Without a limit each child process would start one torch thread per core, and ``jobs``
    processes would then fight over the same cores; an explicit ``run.num_threads`` wins.

    Args:
        overrides: the ``KEY=VALUE`` config overrides given on the command line.
        jobs: networks trained at the same time.
        cpus: cores to share (default: all of this machine's).

    Returns:
        The overrides, with ``run.num_threads`` added when several jobs share the cores.
    """
    if jobs <= 1 or any(item.startswith("run.num_threads=") for item in overrides):
        return list(overrides)
    cpus = cpus or os.cpu_count() or 1
    return [*overrides, f"run.num_threads={max(1, cpus // jobs)}"]


def train_seed(seed: int, args: argparse.Namespace) -> Path:
    """Train and evaluate one network in a child process.

    Args:
        seed: the run's seed (initialisation, augmentation, batch order).
        args: parsed command-line arguments.

    Returns:
        The run folder.

    Raises:
        SystemExit: if the run fails; its log is named.
    """
    run = Path(args.output_dir) / f"{args.name}-seed{seed}"
    argv = [
        sys.executable,
        "-m",
        "fewlabel",
        "train",
        str(REPO / "configs" / "retinamnist_googlenet.yaml"),
        "--set",
        f"data.path={args.data}",
        "--set",
        f"run.output_dir={args.output_dir}",
        "--set",
        f"run.name={run.name}",
        "--set",
        f"run.seed={seed}",
        *[x for s in args.set for x in ("--set", s)],
        *(["--overwrite"] if args.overwrite else []),
    ]
    log = Path(args.output_dir) / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        status = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    if status != 0:
        raise SystemExit(f"seed {seed} failed (exit {status}); see {log}")
    return run


def read_predictions(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a run's test predictions.

    Args:
        run: run folder holding ``eval/predictions.csv``.

    Returns:
        Image ids, true labels and class probabilities.
    """
    with (run / "eval" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    ids = [r["image"] for r in rows]
    y_true = np.array([int(r["true"]) for r in rows])
    probs = np.array([[float(r[c]) for c in prob_cols] for r in rows])
    return ids, y_true, probs


def main(argv: list[str] | None = None) -> int:
    """Run the experiment.

    Args:
        argv: command-line arguments.

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data" / "retinamnist" / "retinamnist.npz")
    )
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="retinamnist")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2, 3, 4],
        help="one network per seed; >1 adds the ensemble (default: the five of docs/results.md)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="networks trained at the same time (the cores are shared)"
    )
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--collect", action="store_true", help="train nothing: score the seeds' runs already in --output-dir"
    )
    args = parser.parse_args(argv)
    if not args.collect and not Path(args.data).is_file():
        print(f"RetinaMNIST not found at {args.data}", file=sys.stderr)
        return 2

    runs = [Path(args.output_dir) / f"{args.name}-seed{seed}" for seed in args.seeds]
    if args.collect:
        missing = [r.name for r in runs if not (r / "eval" / "predictions.csv").is_file()]
        if missing:
            print(f"--collect: no finished run {', '.join(missing)} in {args.output_dir}", file=sys.stderr)
            return 2
    elif not args.overwrite and any(r.exists() for r in runs):
        # Refused here, before any log is opened: the log of the finished run would be lost.
        existing = ", ".join(r.name for r in runs if r.exists())
        print(
            f"{args.output_dir} holds {existing} already: pass --overwrite to retrain, "
            "--collect to score them, or choose another --output-dir",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    if not args.collect:
        # Only as many networks as there are seeds train at once: share the cores between
        # those, not between --jobs (one seed with --jobs 2 would leave a core idle).
        args.set = share_threads(args.set, min(args.jobs, len(args.seeds)))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(lambda s: train_seed(s, args), args.seeds))
    minutes = (time.perf_counter() - start) / 60

    import yaml

    size = yaml.safe_load((runs[0] / "config.yaml").read_text())["model"]["image_size"]
    rows: list[tuple[str, dict]] = []
    all_probs = []
    ids0, y0 = None, None
    for seed, run in zip(args.seeds, runs, strict=True):
        ids, y_true, probs = read_predictions(run)
        if ids0 is not None and (ids != ids0 or not np.array_equal(y_true, y0)):
            raise SystemExit(f"{run}: test predictions are not in the same order as the first run's")
        ids0, y0 = ids, y_true
        all_probs.append(probs)
        classes = [str(i) for i in range(probs.shape[1])]
        rows.append(
            (
                f"fewlabel GoogLeNet ({size} px, from scratch), seed {seed}",
                classification_metrics(y_true, probs, classes),
            )
        )
    if len(runs) > 1:
        ensemble = classification_metrics(y0, np.mean(all_probs, axis=0), classes)
        rows.append((f"fewlabel GoogLeNet ({size} px, from scratch), {len(runs)}-seed ensemble", ensemble))

    print()
    if not args.collect:
        print(
            f"machine: {platform.processor() or platform.machine()}, {args.jobs} job(s); "
            f"wall time {minutes:.1f} min for {len(runs)} network(s)"
        )
    print("| model | test AUC | test ACC | kappa |")
    print("|---|---|---|---|")
    for label, m in rows:
        print(f"| {label} | {m['auc']:.3f} | {m['accuracy']:.3f} | {m['kappa']:.3f} |")
    for name, (auc, acc) in PUBLISHED.items():
        print(f"| {name} | {auc:.3f} | {acc:.3f} | – |")
    out = Path(args.output_dir) / f"{args.name}_summary.json"
    recorded = json.loads(out.read_text()) if args.collect and out.is_file() else {}
    if recorded.get("seeds") != args.seeds:
        if recorded.get("minutes") is not None:
            # Another set of networks, whose training time only that summary holds: kept.
            out = out.with_name(f"{args.name}_summary_seeds{'-'.join(str(s) for s in args.seeds)}.json")
        recorded = {}  # another set of networks: its time is not these networks'
    summary = {
        "seeds": args.seeds,
        # --collect trains nothing: it keeps the wall time the training invocation recorded.
        "minutes": recorded.get("minutes") if args.collect else round(minutes, 2),
        "results": [
            {"model": label, "auc": m["auc"], "accuracy": m["accuracy"], "kappa": m["kappa"]}
            for label, m in rows
        ],
    }
    atomic_write_text(out, json.dumps(summary, indent=2))
    print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
