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
in the output folder. Runs that the folder holds already are refused unless ``--overwrite``
says to retrain them. Runs trained with other settings than the rest of the table (read from
each run's ``config.yaml``) are named in a warning and are not paired.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fewlabel.utils.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "sup10": {"labels": 10, "tcsm": False},
    "tcsm10": {"labels": 10, "tcsm": True},
    "sup50": {"labels": 50, "tcsm": False},
    "tcsm50": {"labels": 50, "tcsm": True},
}
# (baseline, candidate) arms compared per test slice, on the seeds both were run on.
PAIRS = (("sup10", "tcsm10"), ("sup50", "tcsm50"), ("sup50", "tcsm10"))
PUBLISHED = {"Semi-Inf-Net (50 + 1600)": {"infection": 0.739, "ggo": 0.646, "consolidation": 0.362}}
# Config keys that run_arm derives from the study's own flags: a --set of one of them would
# change where a run is written or what its arm means, so that neither the run folder's name
# nor the row in study.json would describe it any more.
CONTROLLED_KEYS = {
    "run.seed": "--seeds",
    "run.name": "--arms and --seeds (runs are named <arm>-seed<N>)",
    "run.output_dir": "--output-dir",
    "data.labeled_count": "--arms (sup10/tcsm10: 10 labels, sup50/tcsm50: all)",
    "tcsm.enabled": "--arms (sup*: supervised, tcsm*: TCSM)",
    "data.path": "--data",
    "data.test_path": "--data",
    "data.val_fraction": "nothing: the study trains on every labelled slice and scores the test slices",
    "preprocess.slice_size": "--slice-size",
    "train.max_epochs": "--iterations",
    "train.iterations_per_epoch": "--iterations-per-epoch",
    "train.val_every": "--iterations",
    "run.num_threads": "--threads",
    "data.labeled_fraction": "--arms (sup10/tcsm10: 10 labels, sup50/tcsm50: all)",
    "data.folds": "nothing: the study trains on every labelled slice and scores the test slices",
    "data.fold": "nothing: the study trains on every labelled slice and scores the test slices",
    "data.test_fraction": "--data (the test slices are the dataset's test/ folder)",
    "data.format": "--data",
    "data.image_root": "--data",
    "data.classes": "nothing: the tables read the dataset's GGO and consolidation labels",
}
# Settings that differ between the runs of one study by design: the arm, seed and thread
# count. Any other setting that differs makes two runs incomparable (see setting_differences).
PER_RUN_KEYS = frozenset(
    {"run.seed", "run.name", "run.output_dir", "run.num_threads", "run.device", "data.labeled_count"}
)
_RUN_FOLDER = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)$")


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
    epochs = iterations // args.iterations_per_epoch  # main checked that it divides evenly
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
    argv = ["train", str(REPO / "configs" / "covid2d_supervised.yaml")]
    if args.overwrite:
        argv.append("--overwrite")
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
        results: rows of ``study.json`` (:func:`run_arm` or :func:`read_arm`).
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
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        help="arms to train (default: all four); with --collect, only these of the finished runs",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="seeds to train (default: 0); with --collect, only these of the finished runs",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=600,
        help="training iterations per arm, a multiple of --iterations-per-epoch",
    )
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--slice-size", type=int, default=192)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--output-dir", default="runs/covid-study")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides KEY=VALUE")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate the finished <arm>-seed<N> runs in --output-dir (all of "
        "them, or those of --arms / --seeds; with both, every combination must be there); the "
        "plot draws every finished run recorded in study.json",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain runs that --output-dir holds already (without it the study refuses them)",
    )
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if args.collect:
        runs, missing = find_runs(out, args.arms, args.seeds)
        if missing:
            # Checked before study.json is touched, so that a typo leaves the file as it was.
            print(f"--collect: no finished run {', '.join(missing)} in {out}", file=sys.stderr)
            return 2
    else:
        _check_training_args(parser, args)
        if not Path(args.data).is_dir():
            print(f"COVID-SemiSeg not found at {args.data}", file=sys.stderr)
            return 2
        args.arms = args.arms or list(ARMS)
        args.seeds = args.seeds or [0]
        runs = [(name, seed) for seed in args.seeds for name in args.arms]
        existing = [f"{name}-seed{seed}" for name, seed in runs if (out / f"{name}-seed{seed}").exists()]
        if existing and not args.overwrite:
            # Checked before anything trains: retraining deletes the finished run first, and
            # a study page's sections each need their own folder.
            print(
                f"{out} holds {', '.join(existing)} already: pass --overwrite to retrain "
                f"{'them' if len(existing) > 1 else 'it'}, or choose another --output-dir",
                file=sys.stderr,
            )
            return 2
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, seed in runs:
        if args.collect:
            # Tabulating trains nothing: its own (default) settings describe no run.
            results.append(_record(out / "study.json", None, read_arm(name, seed, out)))
        else:
            results.append(_record(out / "study.json", vars(args), run_arm(name, seed, args)))
    # From study.json, not this call's rows: with two processes side by side (one per core),
    # the one finishing last would otherwise draw only its own two arms. Rows whose run
    # folder was deleted or is being retrained no longer describe a run and are left out.
    recorded = json.loads((out / "study.json").read_text())["results"]
    plot(
        [r for r in recorded if (out / f"{r['arm']}-seed{r['seed']}" / "eval" / "summary.json").is_file()],
        out / "dice_vs_labels.png",
    )
    for line in difference_lines(setting_differences(out, runs)):
        print(line)
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
    for line in paired_lines(out, runs):
        print(line)
    return 0


def _check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse settings that would train something other than what the study records.

    Args:
        parser: the parser, whose ``error`` exits with status 2 and the usage line.
        args: parsed command-line arguments.
    """
    per_epoch = args.iterations_per_epoch
    if per_epoch < 1 or args.iterations < per_epoch or args.iterations % per_epoch:
        # fewlabel trains whole epochs: any other budget would be rounded, and the study
        # would record iterations it did not train.
        parser.error(
            f"--iterations {args.iterations} must be a positive multiple of "
            f"--iterations-per-epoch {per_epoch}"
        )
    for item in args.set:
        key, sep, _ = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip()
        if key in CONTROLLED_KEYS:
            parser.error(f"--set {key}: set by the study itself; use {CONTROLLED_KEYS[key]}")
        inside = sorted(k for k in CONTROLLED_KEYS if k.startswith(key + "."))
        if inside:
            # A whole section would replace the keys the study sets in it.
            parser.error(
                f"--set {key}: a whole section, holding {', '.join(inside)}; set its keys one by one"
            )


def find_runs(
    output_dir: str | Path, arms: list[str] | None = None, seeds: list[int] | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """The finished ``<arm>-seed<N>`` runs of a study folder that ``--collect`` tabulates.

    A run is finished once its test evaluation (``eval/summary.json``) is written. Unfinished
    run folders (another process still training them) are skipped, with a note on stderr.

    Args:
        output_dir: the study's output folder.
        arms: only these arms (default: every arm found); each must have a finished run.
        seeds: only these seeds (default: every seed found); each must have a finished run.
            With ``arms`` too, every (arm, seed) combination must.

    Returns:
        The (arm, seed) runs, by seed then in :data:`ARMS` order, and the requested runs that
        are missing (``<arm>-seed<N>``, with ``*`` for a wildcard; empty when none is).
    """
    out = Path(output_dir)
    found, unfinished = set(), set()
    for folder in sorted(out.iterdir()) if out.is_dir() else []:
        match = _RUN_FOLDER.match(folder.name)
        if not folder.is_dir() or match is None or match["arm"] not in ARMS:
            continue
        run = (match["arm"], int(match["seed"]))
        (found if (folder / "eval" / "summary.json").is_file() else unfinished).add(run)
    if arms is not None and seeds is not None:
        wanted = [(arm, seed) for seed in seeds for arm in arms]
        missing = [f"{arm}-seed{seed}" for arm, seed in wanted if (arm, seed) not in found]
    else:
        wanted = [
            (arm, seed)
            for arm, seed in found
            if (arms is None or arm in arms) and (seeds is None or seed in seeds)
        ]
        missing = [f"{arm}-seed*" for arm in arms or [] if all(a != arm for a, _ in wanted)]
        missing += [f"*-seed{seed}" for seed in seeds or [] if all(s != seed for _, s in wanted)]
        if not wanted and not missing:
            missing = ["<arm>-seed<N>"]
    skipped = [
        f"{arm}-seed{seed}"
        for arm, seed in sorted(unfinished, key=_run_order)
        if (arms is None or arm in arms) and (seeds is None or seed in seeds)
    ]
    if skipped and not missing:
        # Said, because a table without them could pass for the whole study.
        print(f"--collect: skipping unfinished runs {', '.join(skipped)}", file=sys.stderr)
    return sorted(wanted, key=_run_order), missing


def _run_order(run: tuple[str, int]) -> tuple[int, int]:
    """Sort key of an (arm, seed) run: by seed, then in :data:`ARMS` order (the table's order)."""
    return run[1], list(ARMS).index(run[0])


def paired_lines(output_dir: str | Path, runs: list[tuple[str, int]]) -> list[str]:
    """Compare the arms of :data:`PAIRS` per test slice, each side averaged over their common seeds.

    Args:
        output_dir: the study's output folder.
        runs: the (arm, seed) runs of this invocation.

    Returns:
        Plain-text lines (:func:`fewlabel.reports.comparison.comparison_lines`), one block per
        pair whose two arms were run on at least one common seed; none when no pair was.
    """
    from fewlabel.reports.comparison import compare_evaluations, comparison_lines

    lines = []
    for base, cand in PAIRS:
        # Paired per test slice, so each side averages over the same seeds.
        seeds = sorted({s for a, s in runs if a == base} & {s for a, s in runs if a == cand})
        if not seeds:
            continue
        seeds_text = ", ".join(str(s) for s in seeds)
        differences = setting_differences(output_dir, [(arm, s) for arm in (base, cand) for s in seeds])
        if differences:
            # A per-slice difference between runs trained otherwise measures the settings too.
            lines += [
                "",
                f"{cand} - {base}, seeds {seeds_text}: not paired, the runs differ in {', '.join(differences)}",
            ]
            continue
        sides = {arm: [Path(output_dir) / f"{arm}-seed{s}" for s in seeds] for arm in (base, cand)}
        result = compare_evaluations(sides[base], sides[cand])
        lines += ["", f"{cand} - {base}, seeds {seeds_text}:", *comparison_lines(result)[1:]]
    return lines


def run_settings(run: Path) -> dict[str, str] | None:
    """The resolved settings a run was trained with, flattened to ``section.key`` names.

    Args:
        run: an ``<arm>-seed<N>`` run folder.

    Returns:
        Each setting's value as JSON text, except :data:`PER_RUN_KEYS`; ``None`` when the
        folder holds no ``config.yaml`` (a run made otherwise, whose settings are unknown).
    """
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif prefix not in PER_RUN_KEYS:
            flat[prefix] = json.dumps(value)

    walk("", yaml.safe_load(path.read_text()))
    return flat


def setting_differences(output_dir: str | Path, runs: list[tuple[str, int]]) -> dict[str, dict[str, str]]:
    """The settings in which runs that are tabulated or paired together differ.

    Every arm's runs must agree on every setting but :data:`PER_RUN_KEYS`; runs of different
    arms must agree on all but those and the ``tcsm`` section (the arms' method, whose
    settings each arm chooses for itself: the study uses another consistency weight with 50
    labels than with 10). Runs without a ``config.yaml`` are left out of the check.

    Args:
        output_dir: the study's output folder.
        runs: the (arm, seed) runs.

    Returns:
        ``{setting: {run folder name: value}}`` for each setting that differs; empty when the
        runs are comparable.
    """
    settings = {}
    for arm, seed in runs:
        found = run_settings(Path(output_dir) / f"{arm}-seed{seed}")
        if found is not None:
            settings[(arm, seed)] = found
    keys = sorted({key for values in settings.values() for key in values})
    differences: dict[str, dict[str, str]] = {}
    for key in keys:
        groups = (
            [settings]
            if not key.startswith("tcsm.")
            else [{run: values for run, values in settings.items() if run[0] == arm} for arm in ARMS]
        )
        for group in groups:
            values = {f"{arm}-seed{seed}": found.get(key, "(unset)") for (arm, seed), found in group.items()}
            if len(set(values.values())) > 1:
                differences.setdefault(key, {}).update(values)
    return differences


def difference_lines(differences: dict[str, dict[str, str]]) -> list[str]:
    """A warning naming the settings in which tabulated runs differ (none when they do not).

    Args:
        differences: :func:`setting_differences`' result.

    Returns:
        Plain-text lines.
    """
    if not differences:
        return []
    lines = ["", "Warning: these runs were trained with different settings, so the table mixes them:"]
    for key, values in differences.items():
        lines.append(f"  {key}: " + ", ".join(f"{run} {value}" for run, value in sorted(values.items())))
    return lines


def _record(path: Path, settings: dict | None, result: dict) -> dict:
    """Add one arm's result to ``study.json``, keeping the arms other invocations wrote there.

    Two processes of one study (side by side, one per core) share the file; each replaces
    only its own (arm, seed) rows, under a lock on ``study.json.lock``.

    Args:
        path: the study's ``study.json``.
        settings: the invocation's settings, added to the file's list unless already there;
            ``None`` records none (``--collect``).
        result: one row of :func:`read_arm`.

    Returns:
        The row as stored (with the recorded wall time when ``result`` has none).
    """
    with _locked(path):
        study = json.loads(path.read_text()) if path.is_file() else {"settings": [], "results": []}
        if isinstance(study.get("settings"), dict):  # files written before settings were a list
            study["settings"] = [study["settings"]]
        key = (result["arm"], result["seed"])
        old = [r for r in study.get("results", []) if (r["arm"], r["seed"]) == key]
        if result.get("minutes") is None and old and old[0].get("minutes") is not None:
            result = {**result, "minutes": old[0]["minutes"]}  # --collect keeps the recorded time
        rows = [r for r in study.get("results", []) if (r["arm"], r["seed"]) != key] + [result]
        entries = study.get("settings", [])
        if settings is not None:
            entries = [s for s in entries if s != settings] + [settings]
        rows.sort(key=lambda r: (r["seed"], list(ARMS).index(r["arm"]) if r["arm"] in ARMS else 0))
        # Temporary file + rename: a reader outside the lock never sees a half-written file.
        atomic_write_text(path, json.dumps({"settings": entries, "results": rows}, indent=2))
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (not on ``path``, which the write replaces).

    Without it, two processes finishing together both read the old file and the second
    rename drops the first one's row.

    Args:
        path: the file whose read-modify-write the lock guards.

    Yields:
        Nothing; the lock is held inside the ``with`` block.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    raise SystemExit(main())
