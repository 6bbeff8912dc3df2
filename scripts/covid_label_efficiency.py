"""Label-efficiency study on COVID-SemiSeg: supervised vs TCSM with 10 and 50 labelled slices.

Arms (same network, same iteration budget, same seed):

* ``sup10``  — supervised, 10 labelled training slices;
* ``tcsm10`` — TCSM, the same 10 labelled + the other 40 training slices and the 1600
  unlabelled slices as unlabelled data;
* ``sup50``  — supervised, all 50 labelled slices;
* ``tcsm50`` — TCSM, 50 labelled + 1600 unlabelled.

No validation split is held out (every labelled slice trains; the model after the last
iteration is scored), so the arms differ only in labels and in the consistency term. Each
arm is scored on the 48 test slices: per-class Dice (GGO, consolidation) and infection
(GGO or consolidation), argmax masks at native resolution, mean over slices. Every arm uses
the loss of ``configs/covid2d_supervised.yaml``; the study in docs/results.md pins the loss it
was measured with through ``--set``.

Usage::

    .venv/bin/python scripts/covid_label_efficiency.py --data ../shared/data/covid_semiseg \\
        --arms sup10 tcsm10 sup50 tcsm50 --output-dir runs/covid-study

Prints a markdown table and, for each pair of arms run on the same seeds (TCSM against
supervised with as many labels, and TCSM-10 against supervised-50), their Dice difference
paired per test slice (``fewlabel compare``); writes ``study.json`` and ``dice_vs_labels.png``
in the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fewlabel.utils.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "sup10": {"labels": 10, "tcsm": False},
    "tcsm10": {"labels": 10, "tcsm": True},
    "sup50": {"labels": 50, "tcsm": False},
    "tcsm50": {"labels": 50, "tcsm": True},
}
# (baseline, candidate) arms compared per test slice when both were run on the same seeds.
PAIRS = (("sup10", "tcsm10"), ("sup50", "tcsm50"), ("sup50", "tcsm10"))
PUBLISHED = {"Semi-Inf-Net (50 + 1600)": {"infection": 0.739, "ggo": 0.646, "consolidation": 0.362}}


# An arm's wall time (data checks, training and test evaluation; history.csv's per-epoch
# seconds cover the training alone), written by run_arm into the run folder.
_WALL_TIME = "study_minutes.json"


def read_arm(name: str, seed: int, output_dir: str | Path, minutes: float | None = None) -> dict:
    """Read one finished arm's test Dice from its run folder.

    Args:
        name: arm name (key of ``ARMS``).
        seed: run seed.
        output_dir: the study's output folder.
        minutes: wall time of the arm; by default the time :func:`run_arm` recorded in the run
            folder (``None`` for runs trained otherwise).

    Returns:
        Dice per class (GGO, consolidation, infection), infection precision and sensitivity
        (``None`` for runs scored before fewlabel reported them) and the arm's settings.
    """
    arm = ARMS[name]
    run = Path(output_dir) / f"{name}-seed{seed}"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    if minutes is None and (run / _WALL_TIME).is_file():
        minutes = json.loads((run / _WALL_TIME).read_text())["minutes"]
    dice = {
        cls: summary["mean"][idx]["Dice"]
        for idx, cls in (("1", "ggo"), ("2", "consolidation"), ("3", "infection"))
    }
    infection = summary["mean"]["3"]
    return {
        "arm": name,
        "seed": seed,
        "labels": arm["labels"],
        "tcsm": arm["tcsm"],
        "minutes": minutes,
        **dice,
        "infection_precision": infection.get("Precision"),
        "infection_sensitivity": infection.get("Sensitivity"),
    }


def run_arm(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score one arm.

    Args:
        name: arm name (key of ``ARMS``).
        seed: run seed (also picks the labelled slices).
        args: parsed command-line arguments.

    Returns:
        Dice per class and wall time.
    """
    from fewlabel.cli import main as fewlabel_main

    arm = ARMS[name]
    data = Path(args.data)
    iterations = args.iterations
    epochs = max(1, iterations // args.iterations_per_epoch)
    run_name = f"{name}-seed{seed}"
    overrides = {
        "data.path": data / "train",
        "data.test_path": data / "test",
        "data.unlabeled_path": data / "unlabeled" / "images",
        "data.val_fraction": 0.0,
        "data.labeled_count": arm["labels"] if arm["labels"] < 50 else "null",
        "preprocess.slice_size": f"[{args.slice_size}, {args.slice_size}]",
        "train.max_epochs": epochs,
        "train.iterations_per_epoch": args.iterations_per_epoch,
        "train.val_every": epochs,
        "tcsm.enabled": str(arm["tcsm"]).lower(),
        "run.seed": seed,
        "run.num_threads": args.threads,
        "run.output_dir": args.output_dir,
        "run.name": run_name,
        **dict(item.split("=", 1) for item in args.set),
    }
    argv = ["train", str(REPO / "configs" / "covid2d_supervised.yaml"), "--overwrite"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    status = fewlabel_main(argv)
    minutes = (time.perf_counter() - start) / 60
    if status != 0:
        raise SystemExit(f"arm {name} failed (exit {status})")
    # Kept with the run, so that --collect can tabulate it later.
    atomic_write_text(
        Path(args.output_dir) / run_name / _WALL_TIME, json.dumps({"minutes": round(minutes, 2)})
    )
    return read_arm(name, seed, args.output_dir, round(minutes, 2))


def plot(results: list[dict], path: Path) -> None:
    """Dice against the number of labelled slices, one line per method and class.

    Args:
        results: rows from :func:`run_arm`.
        path: PNG destination.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    for ax, cls in zip(axes, ("infection", "ggo", "consolidation"), strict=True):
        for tcsm, style in ((False, "o--"), (True, "s-")):
            rows = [r for r in results if r["tcsm"] == tcsm]
            xs = sorted({r["labels"] for r in rows})
            ys = [np.mean([r[cls] for r in rows if r["labels"] == x]) for x in xs]
            if xs:
                ax.plot(xs, ys, style, label="TCSM" if tcsm else "supervised")
        for name, values in PUBLISHED.items():
            ax.axhline(values[cls], color="grey", lw=0.8, ls=":", label=name)
        ax.set_title(cls)
        ax.set_xlabel("labelled training slices")
        ax.set_xticks([10, 50])
    axes[0].set_ylabel("mean test Dice (48 slices)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the study.

    Args:
        argv: command-line arguments.

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "covid_semiseg"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=600, help="training iterations per arm")
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--slice-size", type=int, default=192)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--output-dir", default="runs/covid-study")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides KEY=VALUE")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate and plot the arms already in --output-dir",
    )
    args = parser.parse_args(argv)
    if not args.collect and not Path(args.data).is_dir():
        print(f"COVID-SemiSeg not found at {args.data}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for name in args.arms:
            result = read_arm(name, seed, out) if args.collect else run_arm(name, seed, args)
            results.append(_record(out / "study.json", vars(args), result))
    plot(results, out / "dice_vs_labels.png")
    print(
        "\n| arm | labelled | seed | infection | GGO | consolidation "
        "| infection precision | infection sensitivity | minutes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['arm']} | {r['labels']} | {r['seed']} | {r['infection']:.3f} | {r['ggo']:.3f} | "
            f"{r['consolidation']:.3f} | {_fmt(r.get('infection_precision'))} | "
            f"{_fmt(r.get('infection_sensitivity'))} | {_fmt(r['minutes'], '.1f')} |"
        )
    for name, v in PUBLISHED.items():
        print(
            f"| {name} | 50 | – | {v['infection']:.3f} | {v['ggo']:.3f} | {v['consolidation']:.3f} | – | – | – |"
        )
    for line in paired_lines(out, args.arms, args.seeds):
        print(line)
    return 0


def paired_lines(output_dir: str | Path, arms: list[str], seeds: list[int]) -> list[str]:
    """Compare the arms of :data:`PAIRS` per test slice, each side averaged over the seeds.

    Args:
        output_dir: the study's output folder.
        arms: the arms of this invocation.
        seeds: its seeds.

    Returns:
        Plain-text lines (:func:`fewlabel.reports.comparison.comparison_lines`), one block per
        pair whose two arms are among ``arms``; none when no pair is.
    """
    from fewlabel.reports.comparison import compare_evaluations, comparison_lines

    lines = []
    for base, cand in PAIRS:
        if base in arms and cand in arms:
            runs = {arm: [Path(output_dir) / f"{arm}-seed{s}" for s in seeds] for arm in (base, cand)}
            result = compare_evaluations(runs[base], runs[cand])
            seeds_text = ", ".join(str(s) for s in seeds)
            lines += ["", f"{cand} - {base}, seeds {seeds_text}:", *comparison_lines(result)[1:]]
    return lines


def _record(path: Path, settings: dict, result: dict) -> dict:
    """Add one arm's result to ``study.json``, keeping the arms other invocations wrote there.

    Two processes of one study (side by side, one per core) share the file; each replaces
    only its own (arm, seed) rows.

    Returns:
        The row as stored (with the recorded wall time when ``result`` has none).
    """
    study = json.loads(path.read_text()) if path.is_file() else {"settings": [], "results": []}
    if isinstance(study.get("settings"), dict):  # files written before settings were a list
        study["settings"] = [study["settings"]]
    key = (result["arm"], result["seed"])
    old = [r for r in study.get("results", []) if (r["arm"], r["seed"]) == key]
    if result.get("minutes") is None and old and old[0].get("minutes") is not None:
        result = {**result, "minutes": old[0]["minutes"]}  # --collect keeps the recorded time
    rows = [r for r in study.get("results", []) if (r["arm"], r["seed"]) != key] + [result]
    entries = [s for s in study["settings"] if s != settings] + [settings]
    rows.sort(key=lambda r: (r["seed"], list(ARMS).index(r["arm"]) if r["arm"] in ARMS else 0))
    atomic_write_text(path, json.dumps({"settings": entries, "results": rows}, indent=2))
    return result


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    raise SystemExit(main())
