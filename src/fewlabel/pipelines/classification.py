"""Retinopathy grading end to end: train, evaluate and predict.

These are the functions behind ``fewlabel train|evaluate|predict`` for classification
experiments. A checkpoint (``checkpoints/best.pt``) carries everything needed to use the
model later: class names, input size, normalisation and the resolved config, so
:func:`evaluate` and :func:`predict` need nothing but the checkpoint and the images.

Outputs are never half-written: report folders are assembled under a hidden temporary name
and renamed into place when complete, CSV files are written atomically, and existing
outputs are only replaced with ``overwrite``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewlabel.config.classification import ClassificationAugment, ClassificationExperiment
from fewlabel.engines.checkpoint import ensemble_paths
from fewlabel.errors import DataError, FewLabelError
from fewlabel.runs import RunDir
from fewlabel.utils.files import check_replaceable, lies_within, staged_folder
from fewlabel.utils.runtime import torch_threads

log = logging.getLogger(__name__)

__all__ = ["evaluate", "predict", "train"]

EVAL_DIR = "eval"
_GALLERY_MAX_SIDE = 256


def _configure_runtime(cfg: ClassificationExperiment) -> torch.device:
    from fewlabel.utils.distributed import rank_device
    from fewlabel.utils.runtime import config_device, seed_everything

    seed_everything(cfg.run.seed, cfg.run.deterministic)
    return rank_device(config_device(cfg.run.device))


def train(cfg: ClassificationExperiment, run: RunDir, resume: bool = False) -> dict[str, Any]:
    """Train a classifier, then evaluate its best checkpoint on held-out images.

    The report goes to ``run/eval``: the test split when it has images, else the
    validation split, else (no held-out images at all) the training images, which the
    report then says.

    Args:
        cfg: the validated experiment config (already saved in the run folder).
        run: the run folder.
        resume: continue from ``checkpoints/last.pt``.

    Returns:
        ``{"report": path of report.html, "metrics": metrics dict, "checkpoint": best.pt}``.

    Raises:
        DataError: if the data cannot be read.
        ConfigError: if a setting cannot be honoured on this machine.
        CheckpointError: if resuming from an unusable checkpoint.
    """
    with torch_threads(cfg.run.num_threads):
        return _train(cfg, run, resume)


def _train(cfg: ClassificationExperiment, run: RunDir, resume: bool) -> dict[str, Any]:
    from fewlabel.data.classification import class_counts, load_classification_dataset
    from fewlabel.engines.checkpoint import load_checkpoint
    from fewlabel.engines.classification import train_classifier
    from fewlabel.engines.classification_eval import model_from_checkpoint
    from fewlabel.utils.distributed import is_main_process

    device = _configure_runtime(cfg)
    dataset = load_classification_dataset(cfg.data, cfg.run.seed)
    for split, records in dataset.splits.items():
        log.info(
            "%s: %d images, per class %s", split, len(records), class_counts(records, dataset.num_classes)
        )
    log.info("classes %s, device %s, mode %s", dataset.classes, device, cfg.train.mode)

    result = train_classifier(cfg, run, dataset, device, resume=resume)
    if not is_main_process():
        # Under torchrun the final evaluation and its report are rank 0's alone.
        return {"report": None, "metrics": None, "checkpoint": result.best_checkpoint}

    split = next((s for s in ("test", "val", "train") if dataset.splits.get(s)), "train")
    model, meta = model_from_checkpoint(load_checkpoint(result.best_checkpoint), result.best_checkpoint)
    context = {
        "checkpoint": str(result.best_checkpoint),
        "data": dataset.source,
        "split": split if split != "train" else "train (no held-out images: optimistic!)",
        "selected by": f"{result.best_metric} = {result.best_value}"
        if result.best_metric
        else "last epoch (no validation)",
        "best epoch": result.best_epoch,
    }
    with _staged_dir(run.path / EVAL_DIR, overwrite=True) as out:
        report = _evaluate_records([(model, meta)], dataset.splits[split], out, device, context)
    return {
        "report": run.path / EVAL_DIR / report["report"].name,
        "metrics": report["metrics"],
        "checkpoint": result.best_checkpoint,
    }


def evaluate(
    checkpoint: Path | Sequence[Path],
    data: str | None,
    output: Path,
    split: str = "test",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score a trained classifier, or the ensemble of several, and write a report folder.

    Args:
        checkpoint: a ``best.pt`` (or ``last.pt``) written by training, or several whose
            class probabilities are averaged; the first one's dataset and split apply, and an
            ensemble is refused on that ``val`` or ``test`` split if another member trained on it.
        data: ``None`` re-creates the checkpoint's own dataset and split (same seed, same
            split); otherwise a class folder, CSV or ``.npz`` file whose class names must be
            among the checkpoint's. Folders and CSV files are used whole; ``.npz`` files
            contribute their stored ``split``.
        output: report folder; must not exist unless ``overwrite``.
        split: ``train``, ``val``, ``test`` or ``all``.
        overwrite: replace an existing output folder.

    Returns:
        ``{"report": path of report.html, "metrics": metrics dict}``.

    Raises:
        FewLabelError: if the output exists (without ``overwrite``) or lies inside the data.
        DataError: if the data has classes the checkpoint does not know, the split is empty, or
            another ensemble member trained on the held-out split.
        CheckpointError: if a checkpoint is not a usable classification checkpoint, or the
            checkpoints of an ensemble have different classes.
    """
    checkpoints, output = ensemble_paths(checkpoint), Path(output)
    _check_output_dir(output, overwrite, checkpoints + ([Path(data)] if data is not None else []))
    members = _load_members(checkpoints)
    meta = members[0][1]
    cfg = ClassificationExperiment.model_validate(meta["config"])
    if data is None:
        from fewlabel.data.classification import load_classification_dataset, same_grades

        # Checked before the data are read: the training set's folder is as much at risk.
        _check_not_inside(output, Path(cfg.data.path))

        dataset = load_classification_dataset(cfg.data, cfg.run.seed)
        if list(dataset.classes) != list(meta["classes"]) and not same_grades(
            dataset.classes, meta["classes"]
        ):
            raise DataError(
                cfg.data.path, f"classes are now {dataset.classes}, the checkpoint has {meta['classes']}"
            )
        records = _select_split(
            {s: dataset.splits[s] for s in ("train", "val", "test")}, split, cfg.data.path
        )
        source = cfg.data.path
        if split in ("val", "test"):
            _refuse_seen_by_members(members, checkpoints, records, split, Path(cfg.data.path))
    else:
        source = data
        _check_not_inside(output, Path(data))
        records, split = _records_for(Path(data), split, list(meta["classes"]))
    device = _device_for_inference()
    context = {
        "checkpoint": ", ".join(str(c) for c in checkpoints),
        # Which epoch each file holds; how it was selected is training's report to tell,
        # since a last.pt was not selected at all.
        "checkpoint epoch": ", ".join(str(m.get("epoch", "unknown")) for _, m in members),
        "data": str(source),
        "split": split,
    }
    with _staged_dir(output, overwrite, [*checkpoints, Path(source)]) as out:
        report = _evaluate_records(members, records, out, device, context)
    return {"report": output / report["report"].name, "metrics": report["metrics"]}


def predict(
    checkpoint: Path | Sequence[Path], inputs: list[Path], output: Path, overwrite: bool = False
) -> Path:
    """Predict the class of every input image and write a CSV.

    The CSV has columns ``image,predicted,prob_<class>...``, one row per image, in input
    order. With ``eval.tta_rotations`` in the checkpoint's config, probabilities average
    the four 90-degree rotations. Several checkpoints average their probabilities.

    Args:
        checkpoint: a checkpoint written by training, or several (an ensemble).
        inputs: images, folders of images and ``.txt`` lists of image paths.
        output: destination CSV; must not exist unless ``overwrite``.
        overwrite: replace an existing CSV.

    Returns:
        The CSV path.

    Raises:
        FewLabelError: if the output exists (without ``overwrite``), is a folder, or lies
            inside an input folder.
        DataError: if an input is missing or not a readable image.
        CheckpointError: if a checkpoint is not a usable classification checkpoint, or the
            checkpoints of an ensemble have different classes.
    """
    from fewlabel.data.classification import list_images
    from fewlabel.data.images import verify_image
    from fewlabel.reports.classification import write_predictions_csv

    checkpoints, output = ensemble_paths(checkpoint), Path(output)
    if output.is_dir():
        raise FewLabelError(
            f"{output}: is a folder; predict writes a CSV file (e.g. {output / 'predictions.csv'})"
        )
    if output.exists() and not overwrite:
        raise FewLabelError(f"{output}: exists already; pass --overwrite to replace it")
    for folder in (Path(i) for i in inputs):
        # A CSV among the images would be harmless to read, but fewlabel never writes into its inputs.
        if folder.is_dir() and lies_within(output, folder):
            raise FewLabelError(
                f"{output}: lies inside the input folder {folder}; write predictions elsewhere"
            )
    members = _load_members(checkpoints)
    paths = list_images(inputs)
    # Decode errors inside the data loader would surface wrapped in MONAI's RuntimeError;
    # checking first names the bad file.
    channels = {verify_image(p)[2] for p in paths}
    for trained in sorted({meta.get("channels") for _, meta in members if meta.get("channels")}):
        if channels - {trained}:
            log.warning(
                "the model was trained on %d-channel images; some inputs have %s channel(s)",
                trained,
                sorted(channels),
            )
    outs = _predict_members(
        members, [{"image": str(p), "id": str(p)} for p in paths], _device_for_inference()
    )
    path = write_predictions_csv(output, [str(p) for p in paths], outs.probs, members[0][1]["classes"])
    log.info("predicted %d images", len(paths))
    return path


# --------------------------------------------------------------------------- helpers


def _device_for_inference() -> torch.device:
    from fewlabel.utils.runtime import select_device

    return select_device("auto")


def _eval_loader(records: Sequence[dict], meta: dict, batch_size: int, device: torch.device) -> Any:
    from monai.data import DataLoader

    from fewlabel.data.classification_transforms import build_classification_transforms, make_dataset

    tf = build_classification_transforms(
        int(meta["image_size"]), False, ClassificationAugment(), meta["mean"], meta["std"]
    )
    ds = make_dataset(records, tf, None, cache=False)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=0, pin_memory=device.type == "cuda"
    )


def _load_members(checkpoints: Sequence[Path]) -> list[tuple[torch.nn.Module, dict]]:
    """The ``(model, meta)`` of every checkpoint; an ensemble's must grade the same classes."""
    from fewlabel.engines.checkpoint import load_checkpoint
    from fewlabel.engines.classification_eval import model_from_checkpoint
    from fewlabel.errors import CheckpointError

    members = [model_from_checkpoint(load_checkpoint(c), c) for c in checkpoints]
    from fewlabel.config import parse_config
    from fewlabel.errors import ConfigError

    for path, (_, meta) in zip(checkpoints, members, strict=True):
        # Checked here, where the file is known: a stored config this release refuses is a
        # checkpoint problem, not a traceback from a later validation.
        try:
            parse_config(meta["config"], source=f"{path} (stored config)")
        except ConfigError as err:
            raise CheckpointError(str(err)) from err
    first = list(members[0][1]["classes"])
    for path, (_, meta) in zip(checkpoints[1:], members[1:], strict=True):
        if list(meta["classes"]) != first:
            raise CheckpointError(
                f"{path}: grades {list(meta['classes'])}, {checkpoints[0]} {first}; models averaged "
                "together must grade the same classes in the same order"
            )
    return members


def _record_key(record: dict, source: Path) -> str:
    image = record["image"]
    if isinstance(image, (str, Path)):
        return str(Path(image).resolve())
    # An .npz image is known by its file and its place in it: two files share the ids.
    return f"{Path(source).resolve()}#{record['id']}"


def _refuse_seen_by_members(
    members: Sequence[tuple[torch.nn.Module, dict]],
    checkpoints: Sequence[Path],
    records: Sequence[dict],
    split: str,
    source: Path,
) -> None:
    """Refuse an ensemble whose later members trained on the first member's held-out split.

    Runs of other seeds split a folder or CSV differently, so the first checkpoint's test
    images can be another run's training images. ``source`` is the data ``records`` came from.
    """
    from fewlabel.data.classification import load_classification_dataset

    held_out = {_record_key(r, source) for r in records}
    for path, (_, meta) in zip(checkpoints[1:], members[1:], strict=True):
        cfg = ClassificationExperiment.model_validate(meta["config"])
        splits = load_classification_dataset(cfg.data, cfg.run.seed).splits
        own = Path(cfg.data.path)
        seen = sum(1 for r in splits["train"] + splits["val"] if _record_key(r, own) in held_out)
        if seen:
            raise DataError(
                path,
                f"was trained or validated on {seen} of the {len(records)} images of {checkpoints[0]}'s "
                f"{split} split; average models that held out the same images, or evaluate the "
                "ensemble on other data with --data",
            )


def _predict_members(
    members: Sequence[tuple[torch.nn.Module, dict]], records: Sequence[dict], device: torch.device
) -> Any:
    """Every member's class probabilities over ``records``, averaged (each with its own input size and TTA)."""
    from fewlabel.engines.classification_eval import average_outputs, create_evaluator, run_evaluator

    outputs = []
    for model, meta in members:
        cfg = ClassificationExperiment.model_validate(meta["config"])
        model.to(device)
        loader = _eval_loader(records, meta, cfg.train.batch_size, device)
        evaluator = create_evaluator(model, device, amp=cfg.train.amp, tta=cfg.eval.tta_rotations)
        outputs.append(run_evaluator(evaluator, loader))
        model.to("cpu")
    return average_outputs(outputs)


def _describe(meta: dict) -> str:
    cfg = ClassificationExperiment.model_validate(meta["config"])
    tta = ", mean of 4 rotations" if cfg.eval.tta_rotations else ""
    return f"GoogLeNet ({meta['model'].get('weights')} weights, {meta['image_size']} px{tta})"


def _evaluate_records(
    members: Sequence[tuple[torch.nn.Module, dict]],
    records: Sequence[dict],
    output: Path,
    device: torch.device,
    context: dict[str, Any],
) -> dict[str, Any]:
    from fewlabel.reports.classification import write_classification_report

    if not records:
        raise DataError(None, "no images to evaluate")
    meta = members[0][1]
    cfg = ClassificationExperiment.model_validate(meta["config"])
    outs = _predict_members(members, records, device)
    context = {**context, "images": len(records)}
    if len(members) == 1:
        context["model"] = f"GoogLeNet ({meta['model'].get('weights')} weights, {meta['image_size']} px)"
        context["test-time augmentation"] = "mean of 4 rotations" if cfg.eval.tta_rotations else "none"
    else:
        described = sorted({_describe(m) for _, m in members})
        context["model"] = f"mean of {len(members)} models: {'; '.join(described)}"
    names = [r["image"] if isinstance(r["image"], (str, Path)) else r["id"] for r in records]
    return write_classification_report(
        output,
        outs.labels,
        outs.probs,
        meta["classes"],
        [str(n) for n in names],
        image_loader=lambda i: _display_image(records[i]),
        gallery_size=cfg.eval.gallery_size,
        title="Retinopathy grading report",
        context=context,
        loss=outs.loss,
    )


def _display_image(record: dict) -> np.ndarray:
    from PIL import Image

    from fewlabel.data.images import read_image

    value = record["image"]
    arr = np.asarray(value) if not isinstance(value, (str, Path)) else read_image(value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if max(arr.shape[:2]) > _GALLERY_MAX_SIDE:
        img = Image.fromarray(arr)
        img.thumbnail((_GALLERY_MAX_SIDE, _GALLERY_MAX_SIDE))
        arr = np.asarray(img)
    return arr


def _select_split(splits: dict[str, list[dict]], split: str, source: str | Path) -> list[dict]:
    if split == "all":
        records = [r for s in ("train", "val", "test") for r in splits.get(s, [])]
    elif split in splits:
        records = splits[split]
    else:
        raise DataError(source, f"unknown split {split!r} (expected train, val, test or all)")
    if not records:
        sizes = {s: len(v) for s, v in splits.items()}
        raise DataError(
            source, f"the {split!r} split is empty (split sizes: {sizes}); choose another --split"
        )
    return records


def _records_for(path: Path, split: str, classes: list[str]) -> tuple[list[dict], str]:
    from fewlabel.data.classification import load_records

    if path.is_dir():
        # Folder names are the labels: a test folder may lack some classes (even hold one
        # grade only), but must not have one the model never learned.
        records, found = load_records(path, "folder", None, min_classes=1)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(
                path / unknown[0], f"label '{unknown[0]}' is not a class of the checkpoint {classes}"
            )
        for r in records:
            r["label"] = classes.index(found[r["label"]])
    else:
        # CSV and npz labels are checked against the checkpoint's class list while loading.
        records, _ = load_records(path, "auto", classes)
        if "split" in records[0]:
            groups: dict[str, list[dict]] = {}
            for r in records:
                groups.setdefault(r["split"], []).append(r)
            return _select_split(groups, split, path), split
    if split not in ("test", "all"):
        log.info("%s has no stored split: evaluating all %d images", path, len(records))
    return records, "all images (no stored split)"


def _check_output_dir(output: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    if output.exists() and not overwrite:
        raise FewLabelError(f"{output}: exists already; choose another --output or pass --overwrite")
    check_replaceable(output, inputs)


def _check_not_inside(output: Path, data: Path) -> None:
    # A report folder inside a class-folder data set would be read as a class next time.
    if not data.is_dir():
        return
    if lies_within(output, data):
        raise FewLabelError(f"{output}: lies inside the input data folder {data}; write reports elsewhere")


@contextmanager
def _staged_dir(output: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; rename it to ``output`` once complete."""
    output = Path(output)
    _check_output_dir(output, overwrite, inputs)
    with staged_folder(output) as tmp:
        yield tmp
