"""The ``fewlabel`` command line.

Subcommands dispatch on the experiment's ``task`` (from the config, or from the
checkpoint's metadata) to :mod:`fewlabel.pipelines`. User errors print one clear
message and exit with status 2; nothing half-written is left looking complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fewlabel import __version__
from fewlabel.errors import DataError, FewLabelError

log = logging.getLogger("fewlabel")

EXIT_USER_ERROR = 2
# 128 + SIGPIPE, what a shell reports for a command whose reader closed the pipe.
EXIT_BROKEN_PIPE = 141
#: Exit status after Ctrl-C (128 + SIGINT) and SIGTERM (128 + SIGTERM), as shells report them.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _pipeline(task: str):
    if task == "classification":
        from fewlabel.pipelines import classification as module
    elif task == "segmentation":
        from fewlabel.pipelines import segmentation as module
    else:  # pragma: no cover - the config schema rejects other tasks
        raise FewLabelError(f"unknown task {task!r}")
    return module


def _cmd_train(args: argparse.Namespace) -> int:
    from fewlabel.config import load_config
    from fewlabel.utils.distributed import distributed_session

    if args.resume:
        if args.config or args.set or args.output_dir or args.overwrite:
            raise FewLabelError(
                "--resume continues a run in its own folder with its saved config; do not pass a "
                "config, --set, --output-dir or --overwrite"
            )
        from fewlabel.engines.checkpoint import check_resume_config
        from fewlabel.engines.handlers import LAST_CHECKPOINT
        from fewlabel.runs import open_run_dir

        run = open_run_dir(args.resume)
        cfg = load_config(run.config_file)
        check_resume_config(cfg, run.checkpoints / LAST_CHECKPOINT, run.config_file)
    else:
        if not args.config:
            raise FewLabelError("train needs a config file (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.set)
        if args.output_dir:
            cfg.run.output_dir = args.output_dir
    # Under torchrun every process runs this; rank 0 alone creates the run folder and writes
    # config.yaml and status.json, and the others train into the folder it announces.
    with distributed_session(_train_device(cfg.run.device)):
        return _train_in_session(args, cfg)


def _input_paths(cfg: Any) -> list[Path]:
    """Existing files and folders the config's ``data`` and ``model`` sections name."""
    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value and Path(value).exists():
            found.append(Path(value))

    for section in ("data", "model"):
        walk(getattr(cfg, section).model_dump())
    return found


def _check_named_paths(cfg: Any) -> None:
    """Refuse a fresh run whose data or weights path does not exist, before its folder exists.

    Found later, by the pipeline, such a typo would leave a failed run folder behind, and
    ``--resume`` would repeat the typo from the saved config.
    """
    named = [("data.path", cfg.data.path), ("data.unlabeled_path", getattr(cfg.data, "unlabeled_path", None))]
    weights = getattr(cfg.model, "weights", None)
    if isinstance(weights, str) and weights not in ("imagenet", "none"):
        named.append(("model.weights", weights))
    for key, value in named:
        if value and not Path(value).exists():
            raise DataError(Path(value), f"not found (set by {key}); check the path")
    # A run folder inside a data folder would be read as data by this run (a class folder of
    # no images) or the next, and fewlabel never writes into its inputs.
    from fewlabel.utils.files import lies_within

    for key in ("path", "unlabeled_path", "test_path"):
        value = getattr(cfg.data, key, None)
        if value and Path(value).is_dir() and lies_within(cfg.run.output_dir, value):
            raise DataError(
                Path(cfg.run.output_dir),
                f"lies inside the data folder {value} (data.{key}); write runs elsewhere (run.output_dir / --output-dir)",
            )


def _train_device(name: str) -> str:
    from fewlabel.utils.runtime import select_device

    try:
        return str(select_device(name))
    except ValueError:
        return name  # the pipeline reports the bad device as a config error


def _train_in_session(args: argparse.Namespace, cfg: Any) -> int:
    from contextlib import nullcontext

    from fewlabel.config import dump_config
    from fewlabel.runs import RunDir, create_run_dir, open_run_dir, track_run
    from fewlabel.utils.distributed import broadcast_str, is_main_process

    main_process = is_main_process()
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)
    outcome, failure = "", None
    if main_process:
        try:
            if args.resume:
                run = open_run_dir(args.resume)
            else:
                _check_named_paths(cfg)
                run = create_run_dir(
                    cfg.run.output_dir,
                    cfg.run.name,
                    Path(args.config).stem,
                    args.overwrite,
                    inputs=[Path(args.config), *_input_paths(cfg)],
                )
                dump_config(cfg, run.config_file)
            outcome = f"ok:{run.path}"
        except Exception as err:
            text = str(err) if isinstance(err, FewLabelError) else f"{type(err).__name__}: {err}"
            outcome, failure = f"error:{text}", err
    # The other ranks learn the folder (or the error, whatever its type: an OSError from a full
    # disk too), instead of waiting for rank 0 forever.
    outcome = broadcast_str(outcome)
    if failure is not None:
        raise failure
    if outcome.startswith("error:"):
        raise FewLabelError(outcome[len("error:") :])
    run = RunDir(Path(outcome[len("ok:") :]))
    if main_process:
        print(f"run folder: {run.path}", flush=True)
    with track_run(run) if main_process else nullcontext(run):
        result = _pipeline(cfg.task).train(cfg, run, resume=bool(args.resume))
    if not isinstance(result, dict):
        return 0
    if main_process:
        _print_scores(result.get("metrics"))
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def _print_scores(scores: dict | None, title: str = "test scores") -> None:
    from fewlabel.reports.console import score_lines

    for line in score_lines(scores, title):
        print(line)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.pred or args.gt:
        if not (args.pred and args.gt):
            raise FewLabelError("evaluate --pred DIR needs --gt DIR too (and the reverse)")
        # Options of the model evaluation would be ignored here; say so instead.
        given = _given(
            ("--checkpoint", args.checkpoint),
            ("--data", args.data),
            ("--split", args.split != "test"),
            ("--set", args.set),
        )
        if given:
            raise FewLabelError(
                f"evaluate --pred/--gt scores masks on disk and does not take {', '.join(given)}; "
                "to evaluate a model, give --checkpoint without --pred/--gt"
            )
        from fewlabel.pipelines.mask_evaluation import evaluate_masks

        result = evaluate_masks(
            Path(args.pred),
            Path(args.gt),
            Path(args.output),
            classes=args.classes,
            overwrite=args.overwrite,
            image_dir=Path(args.images) if args.images else None,
            merge=_parse_merge(args.merge),
        )
    else:
        if not args.checkpoint:
            raise FewLabelError("evaluate needs --checkpoint CKPT (or --pred DIR --gt DIR)")
        given = _given(("--classes", args.classes), ("--images", args.images), ("--merge", args.merge))
        if given:
            raise FewLabelError(
                f"evaluate --checkpoint does not take {', '.join(given)} (they are for --pred/--gt scoring); "
                "a checkpoint brings its own classes "
                "(use --set eval.merge=... for merged classes)"
            )
        task = _checkpoints_task(args.checkpoint)
        result = _pipeline(task).evaluate(
            [Path(c) for c in args.checkpoint],
            args.data,
            Path(args.output),
            split=args.split,
            overwrite=args.overwrite,
            **_eval_overrides(task, args.set),
        )
    _print_scores(result.get("summary", result.get("metrics")), title="scores")
    print(f"report: {result['report']}")
    return 0


def _given(*options: tuple[str, Any]) -> list[str]:
    """The flags among ``(flag, value)`` pairs that the command line set (a truthy value)."""
    return [flag for flag, value in options if value]


def _eval_overrides(task: str, items: list[str]) -> dict:
    if not items:
        return {}
    if task != "segmentation":
        raise FewLabelError(
            "--set after training applies to segmentation checkpoints (eval.*, run.device, run.num_threads)"
        )
    return {"eval_overrides": list(items)}


def _parse_merge(items: list[str]) -> dict[str, list[int]] | None:
    merge = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            merge[name] = [int(v) for v in values.split(",")]
        except ValueError as err:
            raise FewLabelError(f"--merge {item!r}: expected NAME=1,2 (label values to join)") from err
        if not name or not merge[name]:
            raise FewLabelError(f"--merge {item!r}: expected NAME=1,2 (label values to join)")
    return merge or None


def _checkpoints_task(checkpoints: list[str]) -> str:
    """The task of the checkpoints given (``--checkpoint`` repeated for an ensemble), all alike."""
    from fewlabel.engines.checkpoint import load_checkpoint

    tasks = [load_checkpoint(c).get("meta", {}).get("task", "classification") for c in checkpoints]
    for path, task in zip(checkpoints[1:], tasks[1:], strict=True):
        if task != tasks[0]:
            raise FewLabelError(
                f"{path}: a {task} checkpoint, {checkpoints[0]} a {tasks[0]} one; "
                "an ensemble averages models of one task"
            )
    return tasks[0]


def _cmd_predict(args: argparse.Namespace) -> int:
    task = _checkpoints_task(args.checkpoint)
    out = _pipeline(task).predict(
        [Path(c) for c in args.checkpoint],
        [Path(p) for p in args.inputs],
        Path(args.output),
        overwrite=args.overwrite,
        **_eval_overrides(task, args.set),
    )
    print(f"predictions: {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fewlabel.pipelines.demo import run_demo

    reports = run_demo(Path(args.output), segmentation=not args.skip_segmentation, overwrite=args.overwrite)
    for name, path in reports.items():
        print(f"{name} report: {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from fewlabel.data.readers import convert_dicom_to_nifti

    out = convert_dicom_to_nifti(
        Path(args.dicom_dir), Path(args.output), series_uid=args.series, overwrite=args.overwrite
    )
    print(f"wrote {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fewlabel.engines.checkpoint import export_paths, export_safetensors, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    if "model" not in ckpt:
        raise FewLabelError(f"{args.checkpoint}: holds no model weights")
    out = Path(args.output)
    existing = [p for p in export_paths(out) if p.exists()]
    if existing and not args.overwrite:
        raise FewLabelError(f"{existing[0]}: exists already; pass --overwrite to replace it")
    path = export_safetensors(ckpt["model"], ckpt.get("meta", {}), out)
    print(f"wrote {path} and {export_paths(out)[1]}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fewlabel.reports.comparison import (
        compare_evaluations,
        comparison_json_text,
        comparison_lines,
        plot_comparison,
    )
    from fewlabel.utils.files import atomic_write_text

    outputs = {"--output": (args.output, ".json"), "--plot": (args.plot, ".png")}
    for option, (given, suffix) in outputs.items():
        if given is None:
            continue
        if Path(given).suffix.lower() != suffix:
            raise FewLabelError(f"{given}: compare {option} writes a {suffix} file")
        if Path(given).exists() and not args.overwrite:
            raise FewLabelError(f"{given}: exists already; pass --overwrite to replace it")
    result = compare_evaluations(args.baseline, args.candidate, args.metric)
    if args.plot and result["task"] == "classification":
        plot_comparison(result, args.plot)  # refuses, before anything is printed or written
    print("\n".join(comparison_lines(result)))
    if args.output:
        atomic_write_text(args.output, comparison_json_text(result))
        print(f"wrote {args.output}")
    if args.plot:
        plot_comparison(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _add_eval_overrides(parser: argparse.ArgumentParser) -> None:
    """Add the ``--set eval.KEY=VALUE`` option shared by ``evaluate`` and ``predict``."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="change an evaluation setting of a segmentation checkpoint, e.g. eval.tta=true, or where "
        "it runs: run.device=cpu, run.num_threads=4",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser.

    Returns:
        The parser with every subcommand.
    """
    parser = argparse.ArgumentParser(
        prog="fewlabel",
        description="Train and evaluate medical-imaging models from few annotations.",
        epilog="Run 'fewlabel COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fewlabel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", nargs="?", help="experiment YAML (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.max_epochs=3",
    )
    p.add_argument("--output-dir", help="parent folder of the run folder (overrides run.output_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score a trained model, or masks on disk")
    p.add_argument(
        "--checkpoint",
        action="append",
        help="model checkpoint (best.pt in a run folder); repeat it to score the mean of several models",
    )
    p.add_argument("--data", help="dataset to evaluate on (default: the checkpoint's test split)")
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test", "all"], help="which split of --data"
    )
    p.add_argument("--pred", help="folder of predicted masks (NIfTI/PNG) to score without a model")
    p.add_argument("--gt", help="folder of ground-truth masks matching --pred by file name")
    p.add_argument("--classes", nargs="+", help="class names for --pred/--gt, index = label value")
    p.add_argument("--images", help="folder of source images for the report's overlays (with --pred/--gt)")
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="NAME=1,2",
        help="also score the union of label values, e.g. infection=1,2",
    )
    p.add_argument("--output", required=True, help="folder for metrics and report")
    _add_eval_overrides(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="apply a trained model to new images or studies")
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="model checkpoint; repeat it to average several models (e.g. one per seed)",
    )
    p.add_argument("inputs", nargs="+", help="images, folders of images, a .txt list, or studies")
    p.add_argument("--output", required=True, help="CSV file (classification) or folder (segmentation)")
    _add_eval_overrides(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "compare", help="compare two evaluations case by case (paired difference and interval)"
    )
    p.add_argument(
        "--baseline",
        nargs="+",
        required=True,
        metavar="EVAL",
        help="evaluation folder(s), run folder(s) or metrics_per_case.csv; several (e.g. one per seed) are averaged per case",
    )
    p.add_argument(
        "--candidate",
        nargs="+",
        required=True,
        metavar="EVAL",
        help="the same, for the model compared with the baseline",
    )
    p.add_argument(
        "--metric",
        nargs="+",
        help="metrics to compare: dice, voldice, precision, sensitivity, cdice (default: dice); "
        "classification evaluations compare accuracy",
    )
    p.add_argument("--output", help="also write the comparison to this .json file")
    p.add_argument(
        "--plot", help="also draw each class's per-case scores, baseline against candidate, as this .png"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing --output and --plot files")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="run every pipeline end to end on synthetic data")
    p.add_argument("--output", default="fewlabel-demo", help="demo folder")
    p.add_argument("--skip-segmentation", action="store_true", help="run only the classification demo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("convert", help="convert a DICOM series folder to NIfTI")
    p.add_argument("dicom_dir", help="folder holding the series' slices (searched below too)")
    p.add_argument("output", help="destination .nii.gz")
    p.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace an existing NIfTI file")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="export a checkpoint's weights as safetensors + JSON metadata")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (best.pt or last.pt of a run)")
    p.add_argument(
        "--output",
        required=True,
        help="destination .safetensors file; the metadata goes beside it as .json",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_export)
    return parser


class _IgniteExceptionEcho(logging.Filter):
    """Drops Ignite's "Engine run is terminating due to exception" line.

    The exception itself reaches :func:`main`, which reports it in one line (or Python
    prints its traceback); Ignite's echo comes first and is empty for Ctrl-C.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name.startswith("ignite.")
            and record.getMessage().startswith("Engine run is terminating due to exception")
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fewlabel`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Ignite's engines log every validation run ("Engine run starting", "Epoch[1] Complete")
    # and call a fresh run "resuming from iteration 0"; fewlabel logs its own progress.
    logging.getLogger("ignite").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _IgniteExceptionEcho) for f in handler.filters):
            handler.addFilter(_IgniteExceptionEcho())
    try:
        status = args.func(args)
        # Flushing here, not at interpreter exit, lets a closed pipe surface below.
        sys.stdout.flush()
        return status
    except FewLabelError as err:
        print(f"fewlabel: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader (``| head``) has gone: stop quietly like other Unix tools, and point
        # stdout at devnull so the interpreter's final flush does not print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as err:
        # The file system said no (an output path under a file, a folder where a file goes,
        # no permission, a full disk): the message names the path, which is the user's to fix.
        print(f"fewlabel: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:
        # Ctrl-C or SIGTERM: the run folder says so already; seventy lines of traceback do not help.
        from fewlabel.runs import RunTerminated

        terminated = isinstance(stop, RunTerminated)
        print(
            f"fewlabel: {'terminated' if terminated else 'interrupted'}; a training run continues with "
            "fewlabel train --resume RUN_FOLDER",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
