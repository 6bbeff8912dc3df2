"""The segmentation pipeline: train, evaluate and predict from a config or a checkpoint.

- :func:`train` builds the datalist (labelled, unlabelled, validation, test; split by
  patient), the datasets and loaders, the network and the trainer (supervised or TCSM),
  trains, then evaluates the best checkpoint on the test split (the validation split when
  there is no test split) into ``<run>/eval/``.
- :func:`evaluate` scores a checkpoint on a labelled dataset split.
- :func:`predict` writes a mask for every study given (NIfTI file, DICOM series folder,
  2D image, folders of them, or a ``.txt`` list), on the source's own voxel grid.
- :func:`evaluate_masks` scores masks already on disk (no model).

Predictions go back to the source geometry by inverting the preprocessing with MONAI's
``Invertd`` (reorientation, resampling and foreground crop undone); the class probabilities
are inverted (bilinear) and the mask is their arg-max, so a reopened mask overlays its
source voxel for voxel.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fewlabel.config.segmentation import SegmentationData, SegmentationExperiment
from fewlabel.errors import CheckpointError, ConfigError, DataError, FewLabelError
from fewlabel.runs import RunDir
from fewlabel.utils.files import atomic_write, atomic_write_text
from fewlabel.utils.runtime import torch_threads

if TYPE_CHECKING:
    from fewlabel.data.segmentation import SegmentationDatalist

log = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "collect_studies",
    "evaluate",
    "evaluate_masks",
    "evaluate_studies",
    "load_segmentation_model",
    "predict",
    "predict_study",
    "train",
]

_SPLITS = ("train", "val", "test", "all")
_REPORT_MARKERS = ("report.html", "summary.json", "predictions.csv")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: SegmentationExperiment, run: RunDir, resume: bool = False) -> dict[str, Any]:
    """Train a segmentation model, then evaluate its best checkpoint.

    Args:
        cfg: the resolved experiment config.
        run: the run folder (it exists and holds ``config.yaml``).
        resume: continue from ``checkpoints/last.pt``.

    Returns:
        ``{"report": eval/report.html, "metrics": summary, "best_checkpoint": path,
        "best_value": validation mean foreground Dice, "model_name": "student" | "teacher",
        "eval_split": "test" | "val" | None}``; ``report`` is ``None`` when no labelled
        split is left to evaluate on.

    Raises:
        ConfigError: if the config does not fit the data (input mode, patch size, device).
        DataError: for unreadable or inconsistent data; every study of every split is checked
            before the first training step.
    """
    from fewlabel.utils.distributed import rank_device

    device = rank_device(_device(cfg.run.device))
    with torch_threads(cfg.run.num_threads):
        return _train(cfg, run, resume, device)


def _train(cfg: SegmentationExperiment, run: RunDir, resume: bool, device: torch.device) -> dict[str, Any]:
    from fewlabel.data.segmentation import build_datalist
    from fewlabel.data.slices import build_volume_dataset, records_spatial_dims
    from fewlabel.engines.segmentation import train_segmentation
    from fewlabel.networks.segmentation import build_segmentation_net, size_divisor
    from fewlabel.utils.distributed import is_main_process
    from fewlabel.utils.runtime import seed_everything

    seed_everything(cfg.run.seed, cfg.run.deterministic)

    datalist = build_datalist(cfg.data, cfg.run.seed)
    classes = list(datalist.classes)
    if not datalist.train:
        raise DataError(cfg.data.path, "no labelled training studies left after the validation/test split")
    spatial_dims = records_spatial_dims(datalist.train + datalist.val + datalist.test + datalist.unlabeled)
    check_input_mode(cfg, spatial_dims)
    _check_studies(datalist, classes)
    in_channels = _in_channels(cfg)
    net = build_segmentation_net(cfg.model, 3 if cfg.input.mode == "3d" else 2, in_channels, len(classes))
    log.info(
        "segmentation: %d labelled, %d unlabelled, %d validation, %d test studies; classes %s; %s input; %s",
        len(datalist.train),
        len(datalist.unlabeled),
        len(datalist.val),
        len(datalist.test),
        classes,
        cfg.input.mode,
        "TCSM" if cfg.tcsm.enabled else "supervised",
    )

    train_loader = _loader(
        datalist.train, cfg, classes, True, cfg.train.batch_size, cfg.train.iterations_per_epoch
    )
    unlabeled_loader = None
    if cfg.tcsm.enabled and datalist.unlabeled:
        # One unlabelled batch per iteration: its epochs then line up with the labelled ones.
        unlabeled_loader = _loader(
            datalist.unlabeled, cfg, classes, False, cfg.tcsm.unlabeled_batch_size, len(train_loader)
        )
    val_data = (
        build_volume_dataset(datalist.val, cfg, with_label=True, classes=classes, label_dtype=torch.uint8)
        if datalist.val
        else []
    )

    result = train_segmentation(
        cfg,
        run,
        net,
        train_loader,
        val_data,
        classes,
        spatial_dims,
        in_channels,
        device,
        unlabeled_loader=unlabeled_loader,
        size_divisor=size_divisor(cfg.model),
        resume=resume,
    )
    del train_loader, unlabeled_loader, val_data

    split, records = ("test", datalist.test) if datalist.test else ("val", datalist.val)
    out: dict[str, Any] = {
        "best_checkpoint": str(result.best_checkpoint),
        "best_value": None if math.isnan(result.best_value) else result.best_value,
        "model_name": result.model_name,
        "eval_split": split if records else None,
        "report": None,
        "metrics": None,
    }
    if not records:
        log.warning("no test or validation studies: skipping the final evaluation")
        return out
    if not is_main_process():
        out["eval_split"] = None  # under torchrun the final evaluation is rank 0's alone
        return out
    model = load_segmentation_model(result.best_checkpoint, device)
    eval_dir = run.path / "eval"
    _prepare_output(eval_dir, overwrite=True)
    evaluation = evaluate_studies(
        model,
        records,
        eval_dir,
        title=f"Segmentation: {split} split ({model.meta.get('model_name', 'student')} model)",
        context={"checkpoint": str(result.best_checkpoint), "split": split, "run": str(run.path)},
    )
    out.update(report=str(evaluation["report"]), metrics=evaluation["summary"])
    return out


def _check_studies(datalist: SegmentationDatalist, classes: list[str]) -> None:
    """Read every study the run will use, before training, so that a bad one costs no training time.

    Labelled studies (training, validation and test) are read in full with their labels: the
    checks of :func:`~fewlabel.data.readers.read_study`, :func:`~fewlabel.data.readers.read_label`
    (label range) and :func:`~fewlabel.data.readers.check_pair` (same grid). The test split in
    particular is otherwise read only after training. Unlabelled studies can be many, so they
    are only opened (:func:`~fewlabel.data.readers.check_study_opens`); with ``data.cache`` they
    are read in full while the datasets are built, still before training.
    """
    import time

    from fewlabel.data.readers import check_pair, check_study_opens, read_label, read_study

    start = time.perf_counter()
    labelled = datalist.train + datalist.val + datalist.test
    for record in labelled:
        image = read_study(record["image"])
        if record.get("label"):
            check_pair(image, read_label(record["label"], classes))
        del image
    for record in datalist.unlabeled:
        check_study_opens(record["image"])
    log.info(
        "checked %d labelled and %d unlabelled studies in %.1f s",
        len(labelled),
        len(datalist.unlabeled),
        time.perf_counter() - start,
    )


def check_input_mode(cfg: SegmentationExperiment, spatial_dims: int) -> None:
    """Reject input settings that cannot work with the data.

    Args:
        cfg: the experiment config.
        spatial_dims: 3 for volumes, 2 for 2D images.

    Raises:
        ConfigError: 2.5D/3D on 2D images, or a 3D patch size the network cannot take.
    """
    from fewlabel.networks.segmentation import size_divisor

    if spatial_dims == 2 and cfg.input.mode != "2d":
        raise ConfigError(f"input.mode is {cfg.input.mode!r} but the data are 2D images; use input.mode: 2d")
    if cfg.input.mode == "3d":
        divisor = size_divisor(cfg.model)
        if any(p % divisor for p in cfg.input.patch_size):
            raise ConfigError(
                f"input.patch_size {list(cfg.input.patch_size)}: every size must be a multiple of {divisor} "
                f"for model {cfg.model.name!r} with {len(cfg.model.features)} feature levels"
            )


def _device(name: str) -> torch.device:
    from fewlabel.utils.runtime import select_device

    try:
        return select_device(name)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"run.device: {err}") from err


def _in_channels(cfg: SegmentationExperiment) -> int:
    # Studies are single-channel (CT, one MR sequence, grey slices); a 2.5D slab stacks slices.
    return cfg.input.slab if cfg.input.mode == "2.5d" else 1


def _study_dims(path: str | Path) -> int:
    from fewlabel.data.readers import is_volume_path

    return 3 if is_volume_path(path) else 2


def _loader(
    records: list[dict],
    cfg: SegmentationExperiment,
    classes: list[str],
    labeled: bool,
    batch_size: int,
    iterations_per_epoch: int | None,
):
    """A loader whose batches depend on (seed, epoch, position) only, so that resuming replays them."""
    from monai.data import DataLoader

    from fewlabel.data.sampling import ResumableSampler
    from fewlabel.data.slices import build_training_dataset
    from fewlabel.utils.distributed import per_rank_batch_size, rank, world_size

    dataset = build_training_dataset(records, cfg, train=True, labeled=labeled, classes=classes)
    if len(dataset) == 0:
        raise DataError(cfg.data.path, f"no {'labelled' if labeled else 'unlabelled'} training samples")
    iterations = iterations_per_epoch or math.ceil(len(dataset) / batch_size)
    # batch_size is the global batch: under torchrun each rank loads its share of every batch.
    sampler = ResumableSampler(
        len(dataset),
        seed=cfg.run.seed + (0 if labeled else 7919),
        num_samples=iterations * batch_size,
        num_replicas=world_size(),
        rank=rank(),
    )
    return DataLoader(
        _SeededSamples(dataset),
        batch_size=per_rank_batch_size(
            batch_size, "train.batch_size" if labeled else "tcsm.unlabeled_batch_size"
        ),
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        # Each new iterator (every epoch, and once more on resuming mid-epoch) draws a base seed
        # from this generator; drawn from torch's global one, it would shift the global stream
        # of a resumed run against an uninterrupted one (dropout draws from that stream).
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )


class _SeededSamples(torch.utils.data.Dataset):
    """Draw each sample's random choices from the seed its sampler gives it.

    The slice/patch datasets draw foreground sampling and augmentation from torch's global
    generator; seeding it per sample (inside ``fork_rng``, so the training process's own
    stream is untouched) makes a sample depend on ``(seed, epoch, position)`` only, whatever
    the worker count and whether the run was resumed.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


# ---------------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------------


class LoadedModel:
    """A trained network with everything needed to preprocess, predict and invert.

    Attributes:
        net: the network (eval mode, on ``device``).
        cfg: the experiment config it was trained with.
        meta: the checkpoint metadata.
        classes: class names, index = label value.
        spatial_dims: 3 (volumes) or 2 (2D images).
        device: where it runs.
        path: the checkpoint file.
    """

    def __init__(
        self,
        net: nn.Module,
        cfg: SegmentationExperiment,
        meta: dict[str, Any],
        device: torch.device,
        path: Path,
    ) -> None:
        self.net = net
        self.cfg = cfg
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.spatial_dims = int(meta["spatial_dims"])
        self.device = device
        self.path = path


def load_segmentation_model(
    checkpoint: str | Path, device: torch.device | str | None = None, eval_overrides: list[str] | None = None
) -> LoadedModel:
    """Rebuild a network from a checkpoint written by segmentation training.

    Args:
        checkpoint: ``best.pt`` (or ``last.pt``) of a segmentation run.
        device: where to run; default the config's ``run.device``.
        eval_overrides: ``eval.KEY=VALUE`` changes to the stored config's evaluation section
            (e.g. ``eval.tta=true``); other sections describe how the model was trained and stay.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        CheckpointError: if the file is not a segmentation checkpoint or does not fit its config.
    """
    from fewlabel.config import parse_config
    from fewlabel.engines.checkpoint import load_checkpoint
    from fewlabel.networks.segmentation import build_segmentation_net

    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    if meta.get("task") != "segmentation":
        raise CheckpointError(f"{path}: not a segmentation checkpoint (task {meta.get('task')!r})")
    for key in ("classes", "spatial_dims", "in_channels", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: holds no model weights")
    stored = meta["config"]
    if eval_overrides:
        from fewlabel.config import apply_overrides

        outside = [o for o in eval_overrides if not o.startswith("eval.")]
        if outside:
            raise ConfigError(f"--set {outside[0]!r}: only eval.* keys can change after training")
        stored = apply_overrides(stored, eval_overrides)
    try:
        cfg = parse_config(stored, source=f"{path} (stored config)")
    except ConfigError as err:
        if eval_overrides:
            raise
        raise CheckpointError(str(err)) from err
    device = _device(cfg.run.device) if device is None else torch.device(device)
    net = build_segmentation_net(
        cfg.model, 3 if cfg.input.mode == "3d" else 2, int(meta["in_channels"]), len(meta["classes"])
    )
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the stored model config: {err}") from err
    net.to(device).eval()
    return LoadedModel(net, cfg, meta, device, path)


# ---------------------------------------------------------------------------------------------
# Prediction of one study, back on its own voxel grid
# ---------------------------------------------------------------------------------------------


def predict_study(
    model: LoadedModel, path: str | Path, preprocessing=None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Predict one study and map the result back onto the source's voxel grid.

    Args:
        model: the loaded model.
        path: NIfTI file, DICOM series folder, or 2D image.
        preprocessing: the model's preprocessing ``Compose`` (built when ``None``; pass it to
            reuse it across studies).

    Returns:
        ``(labels, probabilities, reference)``: ``uint8`` labels with the source's shape,
        float32 probabilities ``(K, *shape)`` and the source :class:`~fewlabel.data.readers.Study`.

    Raises:
        DataError: if the study is unreadable, or its kind (2D/3D) does not match the model.
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from fewlabel.data.readers import read_study
    from fewlabel.data.segmentation_transforms import build_preprocessing
    from fewlabel.inference import predict_volume
    from fewlabel.networks.segmentation import size_divisor

    path = Path(path)
    dims = _study_dims(path)
    if dims != model.spatial_dims:
        kinds = {2: "2D images", 3: "3D volumes"}
        raise DataError(
            path, f"is one of the {kinds[dims]}, but the model was trained on {kinds[model.spatial_dims]}"
        )
    cfg = model.cfg
    if preprocessing is None:
        preprocessing = build_preprocessing(cfg.preprocess, with_label=False, spatial_dims=dims)
    data = preprocessing({"image": str(path)})
    image = data["image"]
    probs = predict_volume(
        model.net,
        image,
        cfg.input,
        cfg.eval,
        dims,
        model.device,
        cfg.preprocess.slice_size,
        size_divisor=size_divisor(cfg.model),
        amp=cfg.train.amp,
    )
    if getattr(image, "applied_operations", None):
        data["pred"] = MetaTensor(probs, meta=dict(image.meta))
        inverted = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(
            data
        )
        probs = _as_numpy(inverted["pred"]).astype(np.float32, copy=False)
        del inverted
    else:  # nothing geometric was applied (2D images): the prediction is on the source grid already
        probs = probs.numpy()
    del data, image
    # A foreground crop is undone by zero padding; those voxels are background.
    probs[0] = np.clip(1.0 - probs[1:].sum(axis=0), 0.0, 1.0)
    labels = probs.argmax(axis=0).astype(np.uint8)
    reference = read_study(path)
    if labels.shape != reference.array.shape:  # pragma: no cover - a preprocessing step that Invertd missed
        raise FewLabelError(
            f"{path}: the inverted prediction has shape {labels.shape}, the study {reference.array.shape}; "
            f"a preprocessing step could not be inverted"
        )
    return labels, probs, reference


def _as_numpy(value: Any) -> np.ndarray:
    as_tensor = getattr(value, "as_tensor", None)
    value = as_tensor() if callable(as_tensor) else value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_studies(
    model: LoadedModel,
    records: Sequence[dict[str, Any]],
    output: Path,
    title: str = "Segmentation report",
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict labelled studies, score them and write the report.

    Each predicted mask is written to ``output/predictions/<case>`` (source geometry), each
    case is scored against its label in the source geometry
    (:func:`fewlabel.metrics.segmentation.evaluate_case`: Dice, VolDice, continuous Dice), and
    :func:`fewlabel.reports.segmentation.write_segmentation_report` writes
    ``metrics_per_case.csv``, ``summary.json``, plots, overlays of the best, median and worst
    cases, and ``report.html``.

    Args:
        model: the loaded model.
        records: ``{"image", "label", "id"}`` records.
        output: the report folder (created).
        title: report title.
        context: facts shown at the top of the report.

    Returns:
        ``{"report": path, "summary": summary dict, "cases": list of CaseResult}``.

    Raises:
        DataError: if a label is missing, unreadable, out of range or not on its image's grid.
    """
    from fewlabel.data.readers import read_label, write_mask
    from fewlabel.data.segmentation_transforms import build_preprocessing
    from fewlabel.metrics.segmentation import CaseResult, class_names_with_merge, evaluate_case, rank_cases
    from fewlabel.reports.segmentation import write_segmentation_report

    output = Path(output)
    pred_dir = output / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    num_classes = len(model.classes)
    merge = dict(cfg.eval.merge) or None
    try:
        names = class_names_with_merge(model.classes, merge)
    except ValueError as err:
        raise ConfigError(f"eval.merge: {err}") from err
    foreground = list(range(1, num_classes))
    preprocessing = build_preprocessing(cfg.preprocess, with_label=False, spatial_dims=model.spatial_dims)
    cases: list[CaseResult] = []
    files: dict[str, tuple[str, str, Path]] = {}
    for record in records:
        if not record.get("label"):
            raise DataError(record["image"], "has no label to evaluate against")
        case_id = str(record.get("id") or case_name(record["image"]))
        labels, probs, reference = predict_study(model, record["image"], preprocessing)
        gt = read_label(record["label"], model.classes)
        if gt.array.shape != labels.shape:
            raise DataError(
                record["label"],
                f"label shape {gt.array.shape} differs from its image {record['image']} {labels.shape}",
            )
        axis = _source_axis(reference.affine, cfg, model.spatial_dims)
        metrics = evaluate_case(
            labels, gt.array, num_classes, prob=probs, spatial_dims=model.spatial_dims, axis=axis, merge=merge
        )
        mask_path = write_mask(labels, reference, pred_dir / (case_id + _mask_suffix(reference)))
        cases.append(
            CaseResult(case_id, metrics, prediction_file=str(mask_path), reference_file=str(record["label"]))
        )
        files[case_id] = (str(record["image"]), str(record["label"]), mask_path)
        log.debug(
            "evaluated %s: Dice %s", case_id, {names[k]: round(v, 4) for k, v in metrics["dice"].items()}
        )
        del labels, probs, reference, gt

    overlays = []
    for case in _overlay_cases(rank_cases(cases, "dice"), cfg.eval.overlays):
        image_path, label_path, mask_path = files[case.case_id]
        overlays.append(_overlay_entry(case.case_id, image_path, label_path, mask_path, model.classes))
    report = write_segmentation_report(
        output,
        cases,
        names,
        overlays=overlays,
        foreground=foreground,
        title=title,
        context={
            **(context or {}),
            "classes": ", ".join(model.classes),
            "input mode": cfg.input.mode,
            "model": f"{cfg.model.name} {list(cfg.model.features)} ({model.meta.get('model_name', 'student')})",
            "cases": len(cases),
        },
    )
    from fewlabel.metrics.segmentation import summarize

    summary = summarize(cases, names, foreground)
    log.info(
        "evaluated %d cases: mean foreground Dice %.4f; report %s",
        len(cases),
        summary["foreground_mean"].get("dice", math.nan),
        report,
    )
    return {"report": report, "summary": summary, "cases": cases}


def _overlay_cases(ranked: list, count: int) -> list:
    if count <= 0 or not ranked:
        return []
    if count == 1 or len(ranked) == 1:
        return ranked[:1]
    if count == 2 or len(ranked) == 2:
        return [ranked[0], ranked[-1]]
    return [ranked[0], ranked[(len(ranked) - 1) // 2], ranked[-1]]


def _overlay_entry(case_id: str, image: str, label: str, mask: Path, classes: list[str]) -> dict[str, Any]:
    from fewlabel.data.readers import read_label, read_study

    return {
        "case_id": case_id,
        "image": read_study(image).array,
        "gt": read_label(label, classes).array,
        "pred": read_label(mask, classes).array,
    }


def _source_axis(affine: np.ndarray, cfg: SegmentationExperiment, spatial_dims: int) -> int:
    """The source array axis that ``input.axis`` of the reoriented volume corresponds to.

    ``input.axis`` counts axes after reorientation to ``preprocess.orientation``; metrics and
    overlays work on the source arrays, whose axes may be ordered differently.
    """
    if spatial_dims != 3 or not cfg.preprocess.orientation:
        return cfg.input.axis
    import nibabel as nib

    world_axis = int(nib.orientations.axcodes2ornt(tuple(cfg.preprocess.orientation))[cfg.input.axis][0])
    source = nib.orientations.io_orientation(affine)
    matches = [a for a in range(3) if int(source[a][0]) == world_axis]
    return matches[0] if matches else cfg.input.axis


def evaluate(
    checkpoint: Path,
    data: str | None,
    output: Path,
    split: str = "test",
    overwrite: bool = False,
    eval_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Score a trained model on a labelled dataset split.

    Args:
        checkpoint: the model checkpoint.
        data: dataset (folder or CSV, in any format the config's ``data.format`` accepts);
            ``None`` uses the checkpoint's own dataset. The checkpoint's seed and split
            fractions apply, so ``test`` is the same held-out patients when the dataset is the
            same; ``all`` evaluates every labelled study.
        output: the report folder (must not exist unless ``overwrite``).
        split: ``train``, ``val``, ``test`` or ``all``.
        overwrite: replace an existing report folder.
        eval_overrides: ``eval.KEY=VALUE`` changes (test-time augmentation, merged classes...).

    Returns:
        ``{"report": path, "summary": summary dict}``.

    Raises:
        DataError: if the split is empty or the data unreadable.
        FewLabelError: if ``output`` exists and ``overwrite`` is false.
    """
    from fewlabel.data.segmentation import build_datalist

    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    model = load_segmentation_model(checkpoint, eval_overrides=eval_overrides)
    cfg = model.cfg
    if data is None:
        data_cfg = cfg.data
    else:
        fields = cfg.data.model_dump()
        fields.update(path=str(data), format="auto", image_root=None, unlabeled_path=None, test_path=None)
        fields["classes"] = model.classes
        data_cfg = SegmentationData.model_validate(fields)
    datalist = build_datalist(data_cfg, cfg.run.seed)
    if list(datalist.classes) != model.classes:
        raise DataError(
            data_cfg.path, f"classes {list(datalist.classes)} differ from the model's {model.classes}"
        )
    records = {
        "train": datalist.train,
        "val": datalist.val,
        "test": datalist.test,
        "all": datalist.train + datalist.val + datalist.test,
    }[split]
    if not records:
        raise DataError(
            data_cfg.path, f"the {split!r} split holds no labelled studies; choose another --split (e.g. all)"
        )
    _refuse_inside_inputs(output, [Path(data_cfg.path)])
    _prepare_output(Path(output), overwrite)
    with torch_threads(cfg.run.num_threads):
        result = evaluate_studies(
            model,
            records,
            Path(output),
            title=f"Segmentation: {split} split of {data_cfg.path}",
            context={"checkpoint": str(checkpoint), "data": str(data_cfg.path), "split": split},
        )
    return {"report": result["report"], "summary": result["summary"]}


def evaluate_masks(
    pred_dir: Path,
    gt_dir: Path,
    output: Path,
    classes: list[str] | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score predicted masks on disk against ground-truth masks (no model needed).

    Thin entry point for the CLI; see :func:`fewlabel.pipelines.mask_evaluation.evaluate_masks`.

    Args:
        pred_dir: folder of predicted masks.
        gt_dir: folder of ground-truth masks with the same case names.
        output: report folder.
        classes: class names (default from the largest label seen).
        overwrite: replace an existing report folder.
        kwargs: ``image_dir`` and ``merge``, passed on.

    Returns:
        ``{"report": path, "summary": summary dict}``.
    """
    from fewlabel.pipelines.mask_evaluation import evaluate_masks as _evaluate_masks

    return _evaluate_masks(pred_dir, gt_dir, output, classes=classes, overwrite=overwrite, **kwargs)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def predict(
    checkpoint: Path,
    inputs: list[Path],
    output: Path,
    overwrite: bool = False,
    eval_overrides: list[str] | None = None,
) -> Path:
    """Write a mask for every study given, on the study's own voxel grid.

    Volumes give ``<case>.nii.gz`` (the source's affine and shape), 2D images ``<case>.png``.
    With ``eval.save_probabilities`` the class probabilities are written too:
    ``<case>_probabilities.nii.gz`` (``X, Y, Z, K``, float32) for volumes, one 8-bit
    ``<case>_prob_<class>.png`` per foreground class for 2D images. ``predictions.csv`` lists
    every case with the size of each predicted class (voxels, and millilitres for volumes).

    Args:
        checkpoint: the model checkpoint.
        inputs: NIfTI files, DICOM series folders, 2D images, folders of those, or ``.txt``
            files listing them one per line.
        output: destination folder (created); must not be one of the input folders.
        overwrite: replace existing outputs of the same names.

    Returns:
        The output folder.

    Raises:
        DataError: for missing or unreadable inputs, duplicate case names, outputs that exist
            already (without ``overwrite``) or an output folder inside an input folder.
    """
    model = load_segmentation_model(checkpoint, eval_overrides=eval_overrides)
    studies = collect_studies(inputs)
    output = Path(output)
    _refuse_inside_inputs(output, [p if p.is_dir() else p.parent for p in studies])
    names = [case_name(p) for p in studies]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            None, f"several inputs share the case name(s) {duplicates}; predict them into separate folders"
        )
    planned = {n: _outputs_for(n, p, model) for n, p in zip(names, studies, strict=True)}
    existing = [str(f) for files in planned.values() for f in files if (output / f).exists()]
    if (output / "predictions.csv").exists():
        existing.append(str(output / "predictions.csv"))
    if existing and not overwrite:
        raise DataError(
            output, f"outputs exist already ({', '.join(existing[:5])}...); pass --overwrite to replace them"
        )
    output.mkdir(parents=True, exist_ok=True)

    from fewlabel.data.readers import write_mask
    from fewlabel.data.segmentation_transforms import build_preprocessing

    preprocessing = build_preprocessing(
        model.cfg.preprocess, with_label=False, spatial_dims=model.spatial_dims
    )
    rows = []
    with torch_threads(model.cfg.run.num_threads):
        for name, path in zip(names, studies, strict=True):
            labels, probs, reference = predict_study(model, path, preprocessing)
            mask_path = write_mask(labels, reference, output / planned[name][0])
            if model.cfg.eval.save_probabilities:
                _write_probabilities(probs, reference, output, name, model.classes)
            rows.append(_manifest_row(name, path, mask_path, labels, reference, model.classes))
            log.info("predicted %s -> %s", path, mask_path)
            del labels, probs, reference
    _write_manifest(output / "predictions.csv", rows)
    return output


def collect_studies(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand inputs into a list of studies.

    Args:
        inputs: NIfTI files, 2D images, DICOM series folders, folders holding any of those
            (one level deep), or ``.txt`` files listing paths (relative to the list's folder).

    Returns:
        The studies, in the order given (folders sorted by name).

    Raises:
        DataError: for missing paths, unsupported files, or folders with nothing to predict.
    """
    from fewlabel.data.images import is_image_file
    from fewlabel.data.readers import is_nifti_file

    studies: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(path, "input not found")
        if path.is_file():
            if path.suffix.lower() == ".txt":
                lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
                listed = [
                    Path(ln) if Path(ln).is_absolute() else path.parent / ln
                    for ln in lines
                    if ln and not ln.startswith("#")
                ]
                if not listed:
                    raise DataError(path, "the list names no studies")
                studies.extend(collect_studies(listed))
            elif is_nifti_file(path) or is_image_file(path):
                studies.append(path)
            else:
                raise DataError(
                    path,
                    "unsupported input; expected .nii/.nii.gz, a 2D image, a DICOM folder or a .txt list",
                )
        elif _is_dicom_folder(path):
            studies.append(path)
        else:
            found = [
                p
                for p in sorted(path.iterdir())
                if (p.is_file() and (is_nifti_file(p) or is_image_file(p)))
                or (p.is_dir() and _is_dicom_folder(p))
            ]
            if not found:
                raise DataError(path, "holds no NIfTI files, 2D images or DICOM series folders")
            studies.extend(found)
    return studies


def case_name(path: str | Path) -> str:
    """Case name of a study: the file name without ``.nii.gz``/``.nii``/image suffix, or the folder name.

    Args:
        path: a study path.

    Returns:
        The name.
    """
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if path.is_dir() else path.stem


def _is_dicom_folder(folder: Path) -> bool:
    for i, child in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        if child.suffix.lower() in (".dcm", ".ima"):
            return True
        if child.suffix == "":
            try:
                with open(child, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                pass
        if i >= 20:
            break
    return False


def _mask_suffix(reference_or_dims: Any) -> str:
    dims = reference_or_dims if isinstance(reference_or_dims, int) else reference_or_dims.array.ndim
    return ".png" if dims == 2 else ".nii.gz"


def _outputs_for(name: str, path: Path, model: LoadedModel) -> list[str]:
    dims = _study_dims(path)
    files = [name + _mask_suffix(dims)]
    if model.cfg.eval.save_probabilities:
        if dims == 3:
            files.append(f"{name}_probabilities.nii.gz")
        else:
            files.extend(f"{name}_prob_{c}.png" for c in model.classes[1:])
    return files


def _write_probabilities(
    probs: np.ndarray, reference: Any, output: Path, name: str, classes: list[str]
) -> None:
    if reference.array.ndim == 2:
        from PIL import Image

        for k, cls in enumerate(classes[1:], start=1):
            image = Image.fromarray(np.round(probs[k] * 255).astype(np.uint8), mode="L")
            atomic_write(output / f"{name}_prob_{cls}.png", lambda p, im=image: im.save(p, format="PNG"))
        return
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), reference.affine)
    img.set_qform(reference.affine, code=1)
    img.set_sform(reference.affine, code=1)
    img.header["descrip"] = b"fewlabel class probabilities"
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    atomic_write(output / f"{name}_probabilities.nii.gz", lambda p: p.write_bytes(data))


def _manifest_row(
    name: str, path: Path, mask: Path, labels: np.ndarray, reference: Any, classes: list[str]
) -> dict:
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    row: dict[str, Any] = {"case": name, "input": str(path), "mask": str(mask)}
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0 if labels.ndim == 3 else None
    for k, cls in enumerate(classes[1:], start=1):
        row[f"{cls}_voxels"] = int(counts[k])
        if voxel_ml is not None:
            row[f"{cls}_ml"] = round(counts[k] * voxel_ml, 3)
    return row


def _write_manifest(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------


def _prepare_output(output: Path, overwrite: bool) -> None:
    """Create a report folder; replace an existing one only when asked and only if it is a report."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FewLabelError(f"{output}: exists already; pass --overwrite to replace it")
        if not any((output / m).exists() for m in _REPORT_MARKERS) and not (output / "predictions").is_dir():
            raise FewLabelError(
                f"{output}: exists and does not look like a fewlabel report folder; refusing to delete it"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def _refuse_inside_inputs(output: Path, inputs: Sequence[Path]) -> None:
    out = Path(output).resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if folder.is_file():
            folder = folder.parent
        if out == folder or out.is_relative_to(folder):
            raise DataError(
                output, f"refusing to write into the input folder {folder}; choose another output"
            )
