"""Score predicted masks against ground-truth masks on disk (``fewlabel evaluate --pred --gt``).

No model is involved: two folders of label maps are matched by case name (the file name
without ``.nii.gz``, ``.nii``, ``.png``, ``.jpg`` or ``.jpeg``), scored with
:func:`fewlabel.metrics.segmentation.evaluate_case` (NIfTI studies: per-slice Dice along the
third array axis and VolDice; PNG/JPEG slices: the image's Dice), and written as a
segmentation report (:func:`fewlabel.reports.segmentation.write_segmentation_report`).

The report is built in a hidden sibling folder and moved into place at the end, so an
interrupted evaluation never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fewlabel.data.readers import (
    AFFINE_TOLERANCE,
    Study,
    array_axis_along,
    check_grid,
    read_label,
    read_study,
)
from fewlabel.errors import ConfigError, DataError, RunDirError
from fewlabel.metrics.segmentation import (
    CaseResult,
    class_names_with_merge,
    evaluate_case,
    overlay_cases,
    summarize,
)
from fewlabel.reports.segmentation import write_segmentation_report
from fewlabel.utils.files import check_replaceable

__all__ = ["MASK_SUFFIXES", "MAX_INFERRED_CLASSES", "case_name", "evaluate_masks", "index_masks"]

log = logging.getLogger(__name__)

# Here the classes come from the command line, not from a config.
_CLASSES_FIX = "pass --classes (classes= in Python) naming every value in the masks"


def _read_pair(pred: Path, gt: Path, classes: Sequence[str]) -> tuple[Study, Study]:
    return read_label(pred, classes, fix=_CLASSES_FIX), read_label(gt, classes, fix=_CLASSES_FIX)


#: File name endings recognised as masks (and images for overlays), longest first.
# The image suffixes are those training reads masks from, so any mask it takes can be scored.
MASK_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Names listed in an error message before the rest is only counted.
_MAX_LISTED = 20

# Without --classes, a label of this value or above (more classes than this, background
# included) is taken for a folder of images given as masks: an 8-bit grey image holds most of
# 0..255 and would be scored as a 256-class report. Real masks scored without names rarely have
# this many classes, and --classes scores any number.
MAX_INFERRED_CLASSES = 32


def case_name(path: str | Path) -> str | None:
    """The case name of a mask file: its name without the mask suffix.

    Args:
        path: a file path.

    Returns:
        The name without one of :data:`MASK_SUFFIXES` (any case), or ``None`` when the
        file is not a mask file.
    """
    name = Path(path).name
    for suffix in MASK_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _probability_map_of(name: str) -> str | None:
    """The case whose ``predict`` probability map ``name`` would be (``a_probabilities``, ``a_prob_ggo``)."""
    if name.endswith("_probabilities"):
        return name[: -len("_probabilities")]
    case, sep, _ = name.rpartition("_prob_")
    return case if sep else None


def index_masks(folder: Path, kind: str = "mask") -> dict[str, Path]:
    """Map case names to the mask files of a folder (not recursive; hidden files skipped).

    ``fewlabel predict``'s probability maps (``<case>_probabilities.nii.gz``,
    ``<case>_prob_<class>.png``) next to their case's mask are skipped too.

    Args:
        folder: the folder.
        kind: what the folder holds (``"mask"`` or ``"image"``), for the error messages.

    Returns:
        Case name → file, sorted by case name.

    Raises:
        DataError: if the folder is missing, holds no mask files, or holds two files for one case.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, f"{kind} folder not found (or not a folder)")
    found: dict[str, Path] = {}
    skipped = 0
    for path in sorted(folder.iterdir()):
        name = case_name(path)
        if path.name.startswith(".") or not path.is_file() or name is None:
            skipped += 1
            continue
        if name in found:
            raise DataError(folder, f"two files for case {name!r}: {found[name].name} and {path.name}")
        found[name] = path
    # fewlabel predict's probability maps beside the masks they belong to are not cases.
    maps = [name for name in found if _probability_map_of(name) in found]
    for name in maps:
        del found[name]
    skipped += len(maps)
    if not found:
        raise DataError(folder, f"holds no {kind} files ({', '.join(MASK_SUFFIXES)})")
    if skipped:
        log.info("%s: ignored %d entries that are not mask files", folder, skipped)
    return dict(sorted(found.items()))


def evaluate_masks(
    pred_dir: Path,
    gt_dir: Path,
    output: Path,
    classes: list[str] | None = None,
    overwrite: bool = False,
    image_dir: Path | None = None,
    merge: dict[str, list[int]] | None = None,
) -> dict:
    """Score a folder of predicted masks against a folder of ground-truth masks.

    Args:
        pred_dir: predicted label maps (NIfTI studies or PNG slices).
        gt_dir: ground-truth label maps with the same case names.
        output: report folder to create (``report.html``, ``summary.json``, CSV, plots).
        classes: class names, index = label value; default ``["background", "class_1", ...]``
            up to the largest label found in either folder (which then reads every file twice).
        overwrite: replace an existing ``output`` folder.
        image_dir: optional images with the same case names, drawn under the overlays.
        merge: extra classes scored as the union of labels, e.g. ``{"infection": [1, 2]}``.

    Returns:
        ``{"report": path of report.html, "summary": the summary dict}``
        (:func:`fewlabel.metrics.segmentation.summarize`).

    Raises:
        DataError: for missing folders, unmatched case names (all listed), masks whose shapes or
            geometry differ (both files named), label values outside ``classes``, unreadable files,
            or an ``output`` inside an input folder; without ``classes``, also for masks holding
            only 0 and 255, or a label that would make more than :data:`MAX_INFERRED_CLASSES`
            classes (most likely images given as masks; the file is named).
        ConfigError: for fewer than two classes or a bad ``merge``.
        RunDirError: if ``output`` exists and ``overwrite`` is false.
    """
    pred_dir, gt_dir, output = Path(pred_dir), Path(gt_dir), Path(output)
    inputs = [pred_dir, gt_dir] + ([Path(image_dir)] if image_dir is not None else [])
    _check_output(output, inputs, overwrite)
    preds, gts = index_masks(pred_dir), index_masks(gt_dir)
    _check_matching(preds, gts, pred_dir, gt_dir)

    if classes is None:
        pred_values = {path: _label_values(path) for path in preds.values()}
        gt_values = {path: _label_values(path) for path in gts.values()}
        values = set().union(*pred_values.values(), *gt_values.values())
        if values == {0, 255} or values == {255}:
            raise DataError(
                gt_dir,
                "the masks hold only the values 0 and 255: binary masks saved as 0/255 pixels, which "
                "would be scored as 255 classes; save the lesion as 1 (or pass --classes for 256 classes)",
            )
        _check_plausible_labels(gt_values, pred_values)
        top = max(values)
        classes = ["background"] + [f"class_{k}" for k in range(1, max(top, 1) + 1)]
        log.info("classes not given; using %s from the largest label found", classes)
    classes = list(classes)
    if len(classes) < 2:
        raise ConfigError(f"classes needs background and at least one foreground class, got {classes}")
    try:
        names = class_names_with_merge(classes, merge)
    except ValueError as err:
        raise ConfigError(f"merge: {err}") from err
    num_classes = len(classes)

    cases: list[CaseResult] = []
    for name in gts:
        pred, gt = _read_pair(preds[name], gts[name], classes)
        _check_same_grid(pred, gt)
        metrics = evaluate_case(
            pred.array,
            gt.array,
            num_classes,
            spatial_dims=_spatial_dims(gt),
            axis=_axial_axis(gt),
            merge=merge,
        )
        cases.append(CaseResult(name, metrics, prediction_file=str(pred.path), reference_file=str(gt.path)))
        log.debug("%s: %s", name, metrics)

    foreground = list(range(1, num_classes))
    overlays, notes = _overlays(cases, preds, gts, classes, foreground, image_dir)
    context = {
        "predictions": str(pred_dir),
        "ground truth": str(gt_dir),
        "classes": ", ".join(f"{k}={n}" for k, n in enumerate(names)),
    }
    if merge:
        context["merged classes"] = "; ".join(f"{n} = union of {list(m)}" for n, m in merge.items())
    context.update(notes)

    report = _write_atomically(
        output,
        lambda folder: write_segmentation_report(
            folder,
            cases,
            names,
            overlays=overlays,
            title="Segmentation report",
            foreground=foreground,
            context=context,
        ),
    )
    return {"report": report, "summary": summarize(cases, names, foreground)}


def _check_output(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    resolved = output.resolve()
    for folder in inputs:
        folder_resolved = folder.resolve()
        if resolved == folder_resolved or folder_resolved in resolved.parents:
            raise DataError(output, f"is inside the input folder {folder}; inputs are never written to")
    if output.exists():
        if not overwrite:
            raise RunDirError(f"{output}: exists already; pass --overwrite to replace it")
        check_replaceable(output, inputs)


def _check_matching(preds: Mapping[str, Path], gts: Mapping[str, Path], pred_dir: Path, gt_dir: Path) -> None:
    no_gt = sorted(set(preds) - set(gts))
    no_pred = sorted(set(gts) - set(preds))
    if not (no_gt or no_pred):
        return
    parts = []
    if no_gt:
        parts.append(f"{len(no_gt)} prediction(s) without ground truth in {gt_dir}: {_listing(no_gt)}")
    if no_pred:
        parts.append(
            f"{len(no_pred)} ground truth file(s) without prediction in {pred_dir}: {_listing(no_pred)}"
        )
    raise DataError(pred_dir, "case names do not match; " + "; ".join(parts))


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _check_plausible_labels(gt_values: Mapping[Path, set[int]], pred_values: Mapping[Path, set[int]]) -> None:
    """Refuse label values that look like image intensities rather than classes, naming the file.

    Args:
        gt_values: the label values in each ground-truth file.
        pred_values: the label values in each predicted file.

    Raises:
        DataError: if a file holds a label of :data:`MAX_INFERRED_CLASSES` or above, which
            would make more classes than that (the ground truth is checked first).
    """
    for values, option, other in ((gt_values, "--gt", pred_values), (pred_values, "--pred", gt_values)):
        path = max(values, key=lambda p: max(values[p]))  # first file with the largest label
        top = max(values[path])
        if top < MAX_INFERRED_CLASSES:
            continue
        other_top = max(max(v) for v in other.values())
        side = "predictions'" if option == "--gt" else "ground truth's"
        hint = (
            "a binary mask saved as 0/255 pixels? save the lesion as 1; otherwise "
            if values[path] <= {0, 255}
            else ""
        )
        raise DataError(
            path,
            f"holds {len(values[path])} label values up to {top}, which would be scored as "
            f"{top + 1} classes (the {side} largest label is {other_top}); without --classes, "
            f"more than {MAX_INFERRED_CLASSES} classes are taken for images rather than masks: "
            f"{hint}check that {option} is the mask folder, not the images, or pass --classes "
            "naming every value in the masks",
        )


def _label_values(path: Path) -> set[int]:
    labels = read_label(path, None).array
    return {int(v) for v in np.unique(labels)} if labels.size else {0}


def _axial_axis(study: Study) -> int:
    """The array axis closest to the body's long (inferior-superior) axis.

    Slice Dice is taken over axial slices, as for a model evaluated with the default
    ``input.axis`` 2 in RAS, whatever the order of the file's array axes.
    """
    axis = array_axis_along(study.affine, 2) if _spatial_dims(study) == 3 else None
    return 2 if axis is None else axis


def _spatial_dims(study: Study) -> int:
    # NIfTI files are volumes even with one slice; image files are 2D slices.
    return 2 if study.meta.get("format") == "image" else 3


def _check_same_grid(pred: Study, gt: Study) -> None:
    if pred.array.shape != gt.array.shape or _spatial_dims(pred) != _spatial_dims(gt):
        raise DataError(
            pred.path,
            f"prediction shape {pred.array.shape} differs from ground truth {gt.path} shape {gt.array.shape}",
        )
    diff = float(np.abs(np.asarray(pred.affine) - np.asarray(gt.affine)).max())
    if diff > AFFINE_TOLERANCE:
        raise DataError(
            pred.path,
            f"prediction geometry (affine) differs from ground truth {gt.path} by up to {diff:.4g} mm; "
            "the masks are not on the same voxel grid",
        )


def _overlays(
    cases: Sequence[CaseResult],
    preds: Mapping[str, Path],
    gts: Mapping[str, Path],
    classes: Sequence[str],
    foreground: Sequence[int],
    image_dir: Path | None,
) -> tuple[list[dict], dict[str, str]]:
    """Load the best, median and worst cases only: reading every image would cost memory for nothing."""
    picked = [c.case_id for c in overlay_cases(cases, foreground)]
    images = index_masks(Path(image_dir), kind="image") if image_dir is not None else {}
    missing = []
    overlays = []
    for name in picked:
        pred, gt = _read_pair(preds[name], gts[name], classes)
        image = None
        if name in images:
            study = read_study(images[name])
            if study.array.shape != gt.array.shape:
                raise DataError(
                    images[name],
                    f"image shape {study.array.shape} differs from ground truth {gt.path} shape {gt.array.shape}",
                )
            # The grid too: an image in another orientation would have the outlines drawn on
            # the wrong anatomy.
            check_grid(images[name], study.array.shape, study.affine, gt.path, gt.array.shape, gt.affine)
            image = study.array
        elif image_dir is not None:
            missing.append(name)
        overlays.append({"case_id": name, "image": image, "gt": gt.array, "pred": pred.array})
    notes = {}
    if missing:
        log.warning(
            "%s: no image for case(s) %s; their overlays are drawn on black", image_dir, ", ".join(missing)
        )
        notes["overlays without image"] = ", ".join(missing)
    return overlays, notes


def _write_atomically(output: Path, write) -> Path:
    """Build the report in a hidden sibling folder, then swap it in, so no half report is ever visible."""
    from fewlabel.utils.files import staged_folder

    with staged_folder(output) as tmp:
        report = Path(write(tmp))
    return output / report.relative_to(tmp)
