"""The segmentation pipeline: train, evaluate and predict from a config or a checkpoint.

- :func:`train` builds the datalist (labelled, unlabelled, validation, test; split by
  patient), the datasets and loaders, the network and the trainer (supervised or TCSM),
  trains, then evaluates the best checkpoint on the test split (the validation split when
  there is no test split) into ``<run>/eval/``.
- :func:`evaluate` scores a checkpoint on a labelled dataset split.
- :func:`predict` writes a mask for every study given (NIfTI file, DICOM series folder,
  2D image, folders of them, or a ``.txt`` list), on the source's own voxel grid.
- :func:`evaluate_masks` scores masks already on disk (no model).

Loading a checkpoint and predicting a study on its own grid, which evaluation and
``predict`` share, live in :mod:`fewlabel.pipelines.segmentation_predict`; this module
re-exports them so that the command line reaches every task's ``train``, ``evaluate`` and
``predict`` the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fewlabel.config.segmentation import SegmentationData, SegmentationExperiment
from fewlabel.errors import ConfigError, DataError, FewLabelError
from fewlabel.inference.postprocessing import check_keep_largest
from fewlabel.pipelines.segmentation_predict import (
    LoadedModel,
    ModelEnsemble,
    case_name,
    collect_studies,
    load_segmentation_model,
    load_segmentation_models,
    mask_suffix,
    predict,
    predict_study,
    refuse_inside_inputs,
)
from fewlabel.runs import RunDir
from fewlabel.utils.files import check_replaceable, staged_folder
from fewlabel.utils.runtime import config_device, torch_threads
from fewlabel.utils.text import short_list

if TYPE_CHECKING:
    from fewlabel.data.segmentation import SegmentationDatalist

log = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "ModelEnsemble",
    "collect_studies",
    "evaluate",
    "evaluate_masks",
    "evaluate_studies",
    "load_segmentation_model",
    "load_segmentation_models",
    "predict",
    "predict_study",
    "train",
]

_SPLITS = ("train", "val", "test", "all")


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

    device = rank_device(config_device(cfg.run.device))
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
    # Checked now, not when the final evaluation would stop on them after the training.
    check_keep_largest(cfg.eval.keep_largest, classes)
    _merged_class_names(cfg.eval.merge, classes)
    if not datalist.train:
        raise DataError(cfg.data.path, "no labelled training studies left after the validation/test split")
    if cfg.tcsm.enabled and datalist.unlabeled:
        _check_demoted_share(cfg, datalist)
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
            datalist.unlabeled,
            cfg,
            classes,
            False,
            cfg.tcsm.unlabeled_batch_size,
            len(train_loader),
            demoted=datalist.demoted,
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
    _check_output(eval_dir, overwrite=True)
    with staged_folder(eval_dir) as staging:
        evaluation = evaluate_studies(
            model,
            records,
            staging,
            title=f"Segmentation: {split} split ({model.meta.get('model_name', 'student')} model)",
            context={"checkpoint": str(result.best_checkpoint), "split": split, "run": str(run.path)},
            published_as=eval_dir,
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
        ConfigError: 2.5D/3D on 2D images, or a 3D patch size the network cannot take or
            train on.
    """
    from fewlabel.networks.segmentation import check_training_size, size_divisor

    if spatial_dims == 2 and cfg.input.mode != "2d":
        raise ConfigError(f"input.mode is {cfg.input.mode!r} but the data are 2D images; use input.mode: 2d")
    if cfg.input.mode == "3d":
        divisor = size_divisor(cfg.model)
        if any(p % divisor for p in cfg.input.patch_size):
            raise ConfigError(
                f"input.patch_size {list(cfg.input.patch_size)}: every size must be a multiple of {divisor} "
                f"for model {cfg.model.name!r} with {len(cfg.model.features)} feature levels"
            )
        check_training_size(cfg.model, cfg.input.patch_size, "input.patch_size patches", "input.patch_size")


def _check_demoted_share(cfg: SegmentationExperiment, datalist: SegmentationDatalist) -> None:
    """Fail before any study is read if ``tcsm.demoted_share`` asks for draws from an empty side.

    Raises:
        ConfigError: if the share needs set-aside training cases or other unlabelled cases
            and there are none.
    """
    from fewlabel.data.sampling import group_share_weights

    share = cfg.tcsm.demoted_share
    if share is None:
        return
    demoted, others = datalist.demoted, len(datalist.unlabeled) - datalist.demoted
    try:
        group_share_weights([i < demoted for i in range(len(datalist.unlabeled))], share)
    except ValueError as err:
        raise ConfigError(
            f"tcsm.demoted_share={share}: {err} ({demoted} set-aside training cases, {others} "
            "unlabelled ones; the set-aside cases come from data.labeled_count / data.labeled_fraction)"
        ) from err
    log.info(
        "unlabelled draws: %.0f%% from %d set-aside training cases, the rest from %d unlabelled ones",
        100 * share,
        demoted,
        others,
    )


def _in_channels(cfg: SegmentationExperiment) -> int:
    # Studies are single-channel (CT, one MR sequence, grey slices); a 2.5D slab stacks slices.
    return cfg.input.slab if cfg.input.mode == "2.5d" else 1


def _loader(
    records: list[dict],
    cfg: SegmentationExperiment,
    classes: list[str],
    labeled: bool,
    batch_size: int,
    iterations_per_epoch: int | None,
    demoted: int = 0,
):
    """A loader whose batches depend on (seed, epoch, position) only, so that resuming replays them.

    For the unlabelled loader with ``tcsm.demoted_share`` set, the first ``demoted`` records
    (training cases whose labels were set aside) get that share of the draws.
    """
    from monai.data import DataLoader

    from fewlabel.data.sampling import ResumableSampler, group_share_weights
    from fewlabel.data.slices import SliceDataset, build_training_dataset
    from fewlabel.utils.distributed import per_rank_batch_size, rank, world_size

    dataset = build_training_dataset(
        records, cfg, train=True, labeled=labeled, classes=classes, batch_size=batch_size
    )
    if len(dataset) == 0:
        raise DataError(cfg.data.path, f"no {'labelled' if labeled else 'unlabelled'} training samples")
    if isinstance(dataset, SliceDataset):
        _check_slice_sizes(dataset, records, cfg, batch_size)
    iterations = iterations_per_epoch or math.ceil(len(dataset) / batch_size)
    weights = None
    if not labeled and cfg.tcsm.demoted_share is not None:
        # Every record yields at least one sample, so _check_demoted_share has ruled out an empty side.
        in_group = [dataset.volume_of(i) < demoted for i in range(len(dataset))]
        weights = group_share_weights(in_group, cfg.tcsm.demoted_share)
    # batch_size is the global batch: under torchrun each rank loads its share of every batch.
    sampler = ResumableSampler(
        len(dataset),
        seed=cfg.run.seed + (0 if labeled else 7919),
        num_samples=iterations * batch_size,
        num_replicas=world_size(),
        rank=rank(),
        weights=weights,
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


def _check_slice_sizes(
    dataset: Any, records: Sequence[dict[str, Any]], cfg: SegmentationExperiment, batch_size: int
) -> None:
    """Refuse slices the network cannot train on, or cannot batch, naming the studies.

    Found by the first batch instead, either would end the run in a traceback from inside
    MONAI or PyTorch that names neither a study nor a setting.

    Raises:
        ConfigError: for slices too small for the network (see
            :func:`fewlabel.networks.segmentation.check_training_size`), or of several sizes
            when batches hold more than one slice.
    """
    from fewlabel.data.images import image_size
    from fewlabel.networks.segmentation import check_training_size

    sizes = dataset.slice_sizes()
    if sizes is None:  # 2D images: their headers say how large they are
        sizes = {}
        for record in records:
            sizes.setdefault(image_size(record["image"]), record["image"])
    for size, source in sizes.items():
        what = "preprocess.slice_size slices" if source is None else f"the slices of {source}"
        check_training_size(cfg.model, size, what, "preprocess.slice_size")
    if len(sizes) > 1 and batch_size > 1:
        shown = ", ".join(
            f"{'x'.join(map(str, size))} ({source})" for size, source in list(sizes.items())[:3]
        )
        more = f" and {len(sizes) - 3} more sizes" if len(sizes) > 3 else ""
        largest = max(sizes, key=lambda size: size[0] * size[1])
        raise ConfigError(
            f"slices differ in size: {shown}{more}; a batch of {batch_size} needs one size: set "
            f"preprocess.slice_size (e.g. [{largest[0]}, {largest[1]}]) to resize them all"
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
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_studies(
    model: LoadedModel | ModelEnsemble,
    records: Sequence[dict[str, Any]],
    output: Path,
    title: str = "Segmentation report",
    context: dict[str, Any] | None = None,
    published_as: Path | None = None,
) -> dict[str, Any]:
    """Predict labelled studies, score them and write the report.

    Each predicted mask is written to ``output/predictions/<case>`` (source geometry), each
    case is scored against its label in the source geometry
    (:func:`fewlabel.metrics.segmentation.evaluate_case`: Dice, VolDice, continuous Dice), and
    :func:`fewlabel.reports.segmentation.write_segmentation_report` writes
    ``metrics_per_case.csv``, ``summary.json``, plots, overlays of the best, median and worst
    cases, and ``report.html``.

    Args:
        model: the loaded model, or an ensemble (its first member's ``eval`` settings apply).
        records: ``{"image", "label", "id"}`` records.
        output: the report folder (created).
        title: report title.
        context: facts shown at the top of the report.
        published_as: where ``output`` will be once complete, when it is a staging folder
            (:func:`~fewlabel.utils.files.staged_folder`): the report names the masks there.

    Returns:
        ``{"report": path, "summary": summary dict, "cases": list of CaseResult}``; the
        report's path is under ``published_as`` when that is given.

    Raises:
        DataError: if a label is missing, unreadable, out of range or not on its image's grid.
    """
    from fewlabel.data.readers import check_grid, read_label, write_mask
    from fewlabel.inference.uncertainty import mask_uncertainty, uncertainty_dice_correlation
    from fewlabel.metrics.segmentation import CaseResult, evaluate_case, overlay_cases
    from fewlabel.reports.segmentation import write_segmentation_report

    output = Path(output)
    cfg = model.cfg
    num_classes = len(model.classes)
    merge = dict(cfg.eval.merge) or None
    names = _merged_class_names(cfg.eval.merge, model.classes)
    pred_dir = output / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    foreground = list(range(1, num_classes))
    cases: list[CaseResult] = []
    files: dict[str, tuple[str, str, Path]] = {}
    for record in records:
        if not record.get("label"):
            raise DataError(record["image"], "has no label to evaluate against")
        case_id = _case_id(record)
        labels, probs, reference = predict_study(model, record["image"])
        gt = read_label(
            record["label"],
            model.classes,
            fix="the model was trained on these classes only; score it on labels of the same classes",
        )
        # The grid, not only the shape: a label shifted or rescaled against its image would
        # score against the wrong voxels.
        check_grid(
            record["image"], labels.shape, reference.affine, record["label"], gt.array.shape, gt.affine
        )
        axis = _source_axis(reference.affine, cfg, model.spatial_dims)
        metrics = evaluate_case(
            labels, gt.array, num_classes, prob=probs, spatial_dims=model.spatial_dims, axis=axis, merge=merge
        )
        mask_path = write_mask(labels, reference, pred_dir / (case_id + mask_suffix(reference)))
        cases.append(
            CaseResult(
                case_id,
                metrics,
                prediction_file=str((published_as or output) / mask_path.relative_to(output)),
                reference_file=str(record["label"]),
                uncertainty=round(mask_uncertainty(probs), 4),
            )
        )
        files[case_id] = (str(record["image"]), str(record["label"]), mask_path)
        log.debug(
            "evaluated %s: Dice %s", case_id, {names[k]: round(v, 4) for k, v in metrics["dice"].items()}
        )
        del labels, probs, reference, gt

    overlays = []
    for case in overlay_cases(cases, foreground, cfg.eval.overlays):
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
            "model": model.describe(),
            "cases": len(cases),
            **_postprocessing_context(cfg, model.spatial_dims),
            **_uncertainty_context(
                uncertainty_dice_correlation(cases, {k: n for k, n in enumerate(names) if k > 0})
            ),
        },
    )
    from fewlabel.metrics.segmentation import summarize

    summary = summarize(cases, names, foreground)
    # Where the report will be: a staging folder is renamed into place by the caller.
    report = (published_as or output) / Path(report).relative_to(output)
    log.info(
        "evaluated %d cases: mean foreground Dice %.4f; report %s",
        len(cases),
        summary["foreground_mean"].get("dice", math.nan),
        report,
    )
    return {"report": report, "summary": summary, "cases": cases}


def _refuse_other_declared_classes(data: Path, classes: list[str], renamed: bool = False) -> None:
    """Refuse ``--data`` whose ``dataset.json`` names its labels otherwise than the model.

    The model's class list is imposed on ``--data`` (a plain folder names no classes), so a
    dataset with label 1 = consolidation and 2 = GGO would be scored with the two swapped. A
    model trained with ``data.classes`` gave the labels its own names: then only their number
    must agree.
    """
    from fewlabel.data.segmentation import load_records

    _, _, declared = load_records(data, "auto", None)
    if declared is None:
        return
    if renamed and len(declared) != len(classes):
        raise DataError(
            data,
            f"its dataset.json has {len(declared)} labels {list(declared)}, the model {len(classes)} {classes}",
        )
    if not renamed and list(declared) != list(classes):
        raise DataError(
            data,
            f"its dataset.json labels {list(declared)} differ from the model's classes {classes}; "
            "relabel the masks, or score a dataset with the same labels",
        )


def _case_id(record: dict[str, Any]) -> str:
    """The case name a study's mask and report rows take: its id, else its file name."""
    return str(record.get("id") or case_name(record["image"]))


def _merged_class_names(merge: dict[str, list[int]], classes: list[str]) -> list[str]:
    """The class names with ``eval.merge``'s merged classes appended, refused when they do not fit.

    Raises:
        ConfigError: naming ``eval.merge`` when a merged class lists labels outside ``classes``.
    """
    from fewlabel.metrics.segmentation import class_names_with_merge

    try:
        return class_names_with_merge(classes, dict(merge) or None)
    except ValueError as err:
        raise ConfigError(f"eval.merge: {err}") from err


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

    from fewlabel.data.readers import array_axis_along

    world_axis = int(nib.orientations.axcodes2ornt(tuple(cfg.preprocess.orientation))[cfg.input.axis][0])
    axis = array_axis_along(affine, world_axis)
    return cfg.input.axis if axis is None else axis


def evaluate(
    checkpoint: Path | Sequence[Path],
    data: str | None,
    output: Path,
    split: str = "test",
    overwrite: bool = False,
    eval_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Score a trained model, or the ensemble of several, on a labelled dataset split.

    Args:
        checkpoint: the model checkpoint, or several whose probabilities are averaged
            (:class:`ModelEnsemble`); the first one's dataset, split and ``eval`` settings apply.
        data: dataset (folder or CSV, in any format the config's ``data.format`` accepts);
            ``None`` uses the checkpoint's own dataset. The checkpoint's seed, split fractions
            and fold apply, so ``test`` is the same held-out patients when the dataset is the
            same; ``all`` evaluates every labelled study, and ``train`` and ``all`` include
            the training studies whose labels ``labeled_count`` set aside. An ensemble is
            refused on its first checkpoint's ``val`` or ``test`` split if another member
            trained on any of it (with ``data``, a member whose training data cannot be read
            is only warned about).
        output: the report folder (must not exist unless ``overwrite``).
        split: ``train``, ``val``, ``test`` or ``all``.
        overwrite: replace an existing report folder.
        eval_overrides: ``eval.KEY=VALUE`` changes (test-time augmentation, merged classes...).

    Returns:
        ``{"report": path, "summary": summary dict}``.

    Raises:
        DataError: if the split is empty or the data unreadable, another ensemble member
            trained on the held-out split, or ``data`` has too few patients for the
            checkpoint's cross-validation folds (except with ``split="all"``).
        FewLabelError: if ``output`` exists and ``overwrite`` is false.
    """
    from fewlabel.data.segmentation import build_datalist

    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    from fewlabel.engines.checkpoint import ensemble_paths

    checkpoints = ensemble_paths(checkpoint)
    model = load_segmentation_models(checkpoints, eval_overrides=eval_overrides)
    cfg = model.cfg
    # Every labelled study is scored with its label: the labels that labeled_count set aside
    # for training are back, unlabelled studies are not read, and folds only decide what is
    # val and what is train, which "all" unites.
    fields = cfg.data.model_dump()
    fields.update(labeled_count=None, labeled_fraction=1.0, unlabeled_path=None)
    if split == "all":
        fields.update(folds=0, fold=0)
    if data is not None:
        _refuse_other_declared_classes(Path(data), model.classes, renamed=cfg.data.classes is not None)
        fields.update(path=str(data), format="auto", image_root=None, test_path=None, classes=model.classes)
    data_cfg = SegmentationData.model_validate(fields)
    try:
        datalist = build_datalist(data_cfg, cfg.run.seed)
    except ConfigError as err:
        if data is None or not data_cfg.folds:
            raise
        raise DataError(
            data,
            f"the {split!r} split of the model's {data_cfg.folds}-fold cross-validation cannot be "
            f"re-created here ({err}); score every study with --split all",
        ) from err
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
    names = [_case_id(r) for r in records]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            data_cfg.test_path or data_cfg.path,
            f"--split {split}: cases {short_list(repeated)} are named alike in data.path and "
            "data.test_path, and their masks and rows would overwrite each other; score the splits apart",
        )
    if split in ("val", "test") and isinstance(model, ModelEnsemble):
        # --data may be the members' own dataset again, split the first member's way.
        _refuse_seen_by_members(model, records, split, strict=data is None)
    # Not inside any folder read: the data, the test data, or those a CSV lists studies in.
    read = {Path(p) for p in (data_cfg.path, data_cfg.test_path) if p}
    read |= {Path(r[key]).parent for r in records for key in ("image", "label") if r.get(key)}
    refuse_inside_inputs(output, sorted(read))
    output = Path(output)
    _check_output(output, overwrite, [*checkpoints, Path(data_cfg.path)])
    # Built aside and swapped in: a case failing half-way leaves the previous report intact.
    with torch_threads(cfg.run.num_threads), staged_folder(output) as staging:
        result = evaluate_studies(
            model,
            records,
            staging,
            title=f"Segmentation: {split} split of {data_cfg.path}",
            context={
                "checkpoint": ", ".join(str(c) for c in checkpoints),
                "data": str(data_cfg.path),
                "split": split,
            },
            published_as=output,
        )
    return {"report": result["report"], "summary": result["summary"]}


def _uncertainty_context(rho: dict[str, float]) -> dict[str, str]:
    """The report line saying how well ``predict``'s uncertainty ranks the cases by Dice."""
    if not rho:
        return {}
    shown = ", ".join(f"{name} {value:+.2f}" for name, value in rho.items())
    return {"uncertainty vs Dice": f"Spearman ρ {shown} (negative: the uncertain masks are the worse ones)"}


def _postprocessing_context(cfg: SegmentationExperiment, spatial_dims: int) -> dict[str, str]:
    """The report line for the ``eval`` post-processing rules, when any is on."""
    rules = []
    if cfg.eval.min_component_size > 0:
        unit = "mm³" if spatial_dims == 3 else "pixels"
        rules.append(f"components under {cfg.eval.min_component_size:g} {unit} removed")
    if cfg.eval.keep_largest:
        rules.append(f"largest component kept for {', '.join(cfg.eval.keep_largest)}")
    return {"post-processing": "; ".join(rules)} if rules else {}


def _refuse_seen_by_members(
    model: ModelEnsemble, records: list[dict], split: str, strict: bool = True
) -> None:
    """Refuse an ensemble whose later members trained on the first member's held-out split.

    Runs of other seeds split a dataset differently, so the first checkpoint's test patients
    can be another run's training patients; averaging that run in would score it on cases it
    has seen.

    Args:
        model: the ensemble.
        records: the studies about to be scored.
        split: their split's name, for the message.
        strict: a member whose training data cannot be read is an error; otherwise (scoring
            other data, where the members' training data may not be at hand) it is a warning.

    Raises:
        DataError: naming the member and some of the cases it saw.
    """
    from fewlabel.data.segmentation import build_datalist

    held_out = {str(Path(r["image"]).resolve()): _case_id(r) for r in records}
    for member in model.members[1:]:
        try:
            seen = build_datalist(member.cfg.data, member.cfg.run.seed)
        except FewLabelError as err:
            if strict:
                raise
            log.warning("%s: cannot check which studies it trained on (%s)", member.path, err)
            continue
        # Unlabelled studies count too: a single run never trains on its own held-out images,
        # with or without labels (build_datalist drops them from its unlabelled pool).
        used = seen.train + seen.val + seen.unlabeled
        overlap = sorted(
            {held_out[key] for r in used if (key := str(Path(r["image"]).resolve())) in held_out}
        )
        if overlap:
            raise DataError(
                member.path,
                f"was trained (with or without labels) or validated on {len(overlap)} of the {len(records)} studies of "
                f"{model.members[0].path}'s {split} split ({short_list(overlap)}); average models that held out the "
                "same studies, or evaluate the ensemble on other data with --data",
            )


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
# Output folders
# ---------------------------------------------------------------------------------------------


def _check_output(output: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse a report folder that exists, unless asked to replace it and it is a report."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise FewLabelError(f"{output}: exists already; pass --overwrite to replace it")
        check_replaceable(output, inputs)
