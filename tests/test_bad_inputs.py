"""Catalogue of bad inputs, each run through the command line.

Every row builds one broken input in ``tmp_path/in`` and the command that meets it. The
command must fail the way a user can act on:

- exit status 2 and a one-line ``fewlabel: error:`` message, no traceback;
- the message names the offending file, folder or config key, and says what is wrong;
- the inputs are byte-identical afterwards (nothing is ever written into them);
- the output area ``tmp_path/out`` keeps every file it had (a sentinel and, for some rows, an
  earlier run or report) and gains nothing that looks complete: a run folder made by
  ``train`` is marked ``failed`` in ``status.json``; ``evaluate`` and ``convert`` leave no
  output at all, not even hidden temporary files.

Routes: NIfTI masks through ``evaluate --pred --gt``, NIfTI studies through ``train`` of a tiny
segmentation experiment (MSD layout), DICOM series through ``convert``, images and configs
through ``train`` of a tiny classification experiment. Every error is raised while reading
the data, before any training step.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from _factories import (
    save_nifti,
    snapshot,
    tiny_classification_config,
    tiny_segmentation_config,
    write_config,
    write_dicom_series,
    write_image,
)
from fewlabel.cli import build_parser, main
from fewlabel.data.synthetic_ct import make_synthetic_ct

SENTINEL = "KEEP.txt"
SENTINEL_TEXT = "results of an earlier experiment; must survive every failed command\n"


@dataclass
class Case:
    """One bad input and what the command line must say about it.

    Attributes:
        argv: the ``fewlabel`` arguments.
        names: strings the message must contain to name the offending input (file or
            folder name, or config key).
        problem: regular expression (case-insensitive) for the specific problem.
        kind: ``train`` (a run folder under ``out/runs`` may appear, marked failed),
            ``report`` or ``file`` (no output may appear at all).
    """

    argv: list[str]
    names: list[str]
    problem: str
    kind: str


Builder = Callable[[Path, Path], Case]

# ---------------------------------------------------------------------------------------------
# NIfTI masks, scored with `evaluate --pred --gt`
# ---------------------------------------------------------------------------------------------

MASK_SHAPE = (8, 8, 4)


def _good_mask(value: int = 1) -> np.ndarray:
    mask = np.zeros(MASK_SHAPE, np.uint8)
    mask[2:5, 2:5, 1:3] = value
    return mask


def _mask_folders(inp: Path) -> tuple[Path, Path]:
    """pred/ and gt/ with one good case each (``case0``), for rows to add a bad ``case1`` to."""
    pred, gt = inp / "pred", inp / "gt"
    save_nifti(pred / "case0.nii.gz", _good_mask())
    save_nifti(gt / "case0.nii.gz", _good_mask())
    return pred, gt


def _evaluate(pred: Path, gt: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--pred", str(pred), "--gt", str(gt), "--output", str(out / "report"), *extra]


def nifti_truncated(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(gt / "case1.nii.gz", _good_mask())
    full = save_nifti(pred / "case1.nii.gz", _good_mask()).read_bytes()
    (pred / "case1.nii.gz").write_bytes(full[: len(full) // 2])
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"truncated", "report")


def nifti_wrong_magic(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(gt / "case1.nii.gz", _good_mask())
    # A gzip stream whose content is not a NIfTI header (e.g. a renamed archive).
    (pred / "case1.nii.gz").write_bytes(gzip.compress(b"PK\x03\x04 not a nifti header " * 20))
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"not a NIfTI file.*magic", "report")


def nifti_not_gzip(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(gt / "case1.nii.gz", _good_mask())
    write_image(inp / "tmp.png")
    (inp / "tmp.png").rename(pred / "case1.nii.gz")  # a PNG with a NIfTI name
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"not gzip-compressed", "report")


def nifti_zero_size(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(pred / "case1.nii.gz", _good_mask())
    (gt / "case1.nii.gz").write_bytes(b"")
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"empty file \(0 bytes\)", "report")


def nifti_4d(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(gt / "case1.nii.gz", _good_mask())
    save_nifti(pred / "case1.nii.gz", np.stack([_good_mask(), _good_mask()], axis=-1))
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"expected a 3D volume.*shape", "report")


def mask_shape_mismatch(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(gt / "case1.nii.gz", _good_mask())
    save_nifti(pred / "case1.nii.gz", np.zeros((8, 8, 5), np.uint8))
    return Case(
        _evaluate(pred, gt, out), ["case1.nii.gz"], r"shape \(8, 8, 5\) differs .*\(8, 8, 4\)", "report"
    )


def mask_affine_mismatch(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # the same grid moved by 2 mm
    save_nifti(gt / "case1.nii.gz", _good_mask())
    save_nifti(pred / "case1.nii.gz", _good_mask(), shifted)
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"geometry \(affine\) differs", "report")


def mask_nan_voxels(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(gt / "case1.nii.gz", _good_mask())
    bad = _good_mask().astype(np.float32)
    bad[1, 2, 3] = np.nan
    save_nifti(pred / "case1.nii.gz", bad)
    return Case(_evaluate(pred, gt, out), ["case1.nii.gz"], r"NaN", "report")


def mask_label_out_of_range(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(pred / "case1.nii.gz", _good_mask())
    save_nifti(gt / "case1.nii.gz", _good_mask(value=3))
    argv = _evaluate(pred, gt, out, "--classes", "background", "lesion")
    return Case(
        argv, ["case1.nii.gz"], r"label values \[3\] are outside the classes.*pass --classes", "report"
    )


def mask_names_unmatched(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    save_nifti(pred / "case1.nii.gz", _good_mask())
    save_nifti(gt / "case_one.nii.gz", _good_mask())
    return Case(_evaluate(pred, gt, out), ["case1", "case_one"], r"case names do not match", "report")


def mask_folder_not_found(inp: Path, out: Path) -> Case:
    _, gt = _mask_folders(inp)
    return Case(_evaluate(inp / "no_such_folder", gt, out), ["no_such_folder"], r"not found", "report")


def report_inside_input(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    argv = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--output", str(gt / "report")]
    return Case(argv, [str(gt / "report")], r"inside the input folder", "report")


def report_exists(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    (out / "report").mkdir()
    (out / "report" / "summary.json").write_text('{"earlier": true}\n')
    return Case(_evaluate(pred, gt, out), [str(out / "report")], r"exists already.*--overwrite", "report")


def report_overwrite_holds_the_inputs(inp: Path, out: Path) -> Case:
    # --overwrite replaces the output folder; one that holds the inputs must not be deleted.
    pred, gt = _mask_folders(inp)
    argv = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--output", str(inp), "--overwrite"]
    return Case(argv, [str(inp)], r"holds the input", "report")


def report_overwrite_foreign_folder(inp: Path, out: Path) -> Case:
    pred, gt = _mask_folders(inp)
    (out / "report").mkdir()
    (out / "report" / "notes.txt").write_text("not written by fewlabel\n")
    argv = _evaluate(pred, gt, out, "--overwrite")
    return Case(argv, [str(out / "report")], r"does not look like a fewlabel output", "report")


# ---------------------------------------------------------------------------------------------
# DICOM series, converted with `convert`
# ---------------------------------------------------------------------------------------------


def _convert(dicom: Path, out: Path) -> list[str]:
    return ["convert", str(dicom), str(out / "ct.nii.gz")]


def dicom_missing_slice(inp: Path, out: Path) -> Case:
    write_dicom_series(inp / "series", n=6, skip=(3,))
    return Case(_convert(inp / "series", out), [str(inp / "series")], r"missing slice.*gap", "file")


def dicom_irregular_spacing(inp: Path, out: Path) -> Case:
    # Five gaps of 2.5 mm, then 3.5 mm: no gap looks like a missing slice, but no even grid fits.
    write_dicom_series(
        inp / "series", n=10, position=lambda k: [0.0, 0.0, 2.5 * min(k, 4) + 3.5 * max(k - 4, 0)]
    )
    return Case(_convert(inp / "series", out), [str(inp / "series")], r"irregular slice spacing", "file")


def dicom_sheared_stack(inp: Path, out: Path) -> Case:
    # Each slice 0.8 mm further along y: a tilted gantry; axial slices no longer stack along z.
    write_dicom_series(inp / "series", n=6, position=lambda k: [0.0, 0.8 * k, 2.5 * k])
    return Case(
        _convert(inp / "series", out), [str(inp / "series")], r"do not stack along their normal", "file"
    )


def dicom_mixed_pixel_spacing(inp: Path, out: Path) -> Case:
    write_dicom_series(inp / "series", n=5)
    odd = sorted((inp / "series").glob("*.dcm"))[2]
    ds = pydicom.dcmread(odd)
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(odd, enforce_file_format=True)
    return Case(
        _convert(inp / "series", out), [str(inp / "series")], r"differ in size or pixel spacing", "file"
    )


def dicom_mixed_series(inp: Path, out: Path) -> Case:
    uid_a = write_dicom_series(inp / "mixed", description="lung kernel")
    uid_b = write_dicom_series(inp / "mixed" / "extra", n=3, description="soft tissue")
    return Case(
        _convert(inp / "mixed", out), [str(inp / "mixed"), uid_a, uid_b], r"holds 2 DICOM series", "file"
    )


def dicom_none_in_folder(inp: Path, out: Path) -> Case:
    (inp / "notes").mkdir()
    (inp / "notes" / "readme.txt").write_text("scanned on Monday")
    return Case(_convert(inp / "notes", out), [str(inp / "notes")], r"no DICOM files", "file")


def dicom_folder_not_found(inp: Path, out: Path) -> Case:
    return Case(_convert(inp / "no_such_series", out), ["no_such_series"], r"not found", "file")


def dicom_duplicate_slice(inp: Path, out: Path) -> Case:
    write_dicom_series(inp / "series")
    first = sorted((inp / "series").glob("*.dcm"))[0]
    (inp / "series" / "copy_of_first.dcm").write_bytes(first.read_bytes())
    return Case(_convert(inp / "series", out), ["copy_of_first.dcm"], r"duplicated slice position", "file")


def dicom_unreadable_end_slice(inp: Path, out: Path) -> Case:
    write_dicom_series(inp / "series", n=5)
    files = sorted((inp / "series").glob("*.dcm"))
    top = max(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    top.write_bytes(top.read_bytes()[:300])  # cut inside the header: a damaged copy
    return Case(
        _convert(inp / "series", out), [top.name], r"truncated|corrupt|cannot read|unreadable", "file"
    )


def convert_into_input(inp: Path, out: Path) -> Case:
    write_dicom_series(inp / "series")
    argv = ["convert", str(inp / "series"), str(inp / "series" / "ct.nii.gz")]
    return Case(argv, ["ct.nii.gz"], r"refusing to write inside the input folder", "file")


# ---------------------------------------------------------------------------------------------
# Checkpoints, through `evaluate --checkpoint` and `export`
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Pickles as a call to ``os.mkdir``: if unpickling ever ran it, a folder would appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def checkpoint_corrupt(inp: Path, out: Path) -> Case:
    (inp / "best.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    argv = ["evaluate", "--checkpoint", str(inp / "best.pt"), "--output", str(out / "report")]
    return Case(argv, ["best.pt"], r"not a readable checkpoint \(truncated or corrupt", "report")


def checkpoint_runs_code(inp: Path, out: Path) -> Case:
    torch.save({"model": {"w": torch.zeros(2)}, "meta": _RunsCode(out / "code_ran")}, inp / "best.pt")
    argv = ["export", "--checkpoint", str(inp / "best.pt"), "--output", str(out / "model.safetensors")]
    return Case(argv, ["best.pt"], r"refused to load.*execute code", "file")


# ---------------------------------------------------------------------------------------------
# Classification: images and configs, through `train`
# ---------------------------------------------------------------------------------------------


def _class_folders(inp: Path, per_class: int = 2) -> Path:
    root = inp / "fundus"
    for c in ("grade_0", "grade_1"):
        for i in range(per_class):
            write_image(root / c / f"{c}_{i}.png", value=i)
    return root


def _train(inp: Path, cfg: dict, *extra: str) -> list[str]:
    return ["train", str(write_config(inp / "exp.yaml", cfg)), *extra]


def _cls_train(inp: Path, out: Path, *extra: str, **sections) -> list[str]:
    return _train(inp, tiny_classification_config(_class_folders(inp), out / "runs", **sections), *extra)


def class_folder_empty(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out)
    (inp / "fundus" / "grade_2").mkdir()
    return Case(argv, ["grade_2"], r"class folder .* contains no images", "train")


def image_corrupt_jpeg(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out)
    jpeg = write_image(inp / "fundus" / "grade_1" / "scan_7.jpg", size=32).read_bytes()
    (inp / "fundus" / "grade_1" / "scan_7.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return Case(argv, ["scan_7.jpg"], r"truncated", "train")


def image_not_an_image(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out)
    (inp / "fundus" / "grade_0" / "notes.png").write_text("this is text, not a PNG")
    return Case(argv, ["notes.png"], r"not a readable image", "train")


def image_channels_mixed(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out)
    write_image(inp / "fundus" / "grade_0" / "grey.png", channels=1)
    return Case(argv, ["grey.png"], r"mixed channel counts", "train")


def csv_unknown_label(inp: Path, out: Path) -> Case:
    root = _class_folders(inp)
    rows = ["image,label", "grade_0/grade_0_0.png,0", "grade_0/grade_0_1.png,0", "grade_1/grade_1_0.png,1"]
    rows.append("grade_1/grade_1_1.png,severe")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_classification_config(root / "labels.csv", out / "runs", data={"classes": ["0", "1"]})
    return Case(_train(inp, cfg), ["labels.csv", "severe"], r"label|class", "train")


def data_path_not_found(inp: Path, out: Path) -> Case:
    cfg = tiny_classification_config(inp / "no_such_data", out / "runs")
    return Case(_train(inp, cfg), ["no_such_data"], r"not found", "train")


def config_unknown_key(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out, train={"epochz": 3})
    return Case(argv, ["exp.yaml", "train.epochz"], r"unknown key", "train")


def config_wrong_type(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out, train={"max_epochs": "many"})
    return Case(argv, ["train.max_epochs", "many"], r"valid integer", "train")


def config_negative_lr(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out, train={"lr_head": -0.01})
    return Case(argv, ["train.lr_head"], r"greater than 0", "train")


def config_bad_override(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out, "--set", "model.image_size=8")
    return Case(argv, ["model.image_size"], r"greater than or equal to 32", "train")


def config_run_name_leaves_the_output_dir(inp: Path, out: Path) -> Case:
    # With --overwrite a run named ".." would replace out/ itself.
    argv = _cls_train(inp, out, "--set", "run.name=..", "--overwrite")
    return Case(argv, ["run.name"], r"single folder name", "train")


def config_not_found(inp: Path, out: Path) -> Case:
    return Case(["train", str(inp / "missing.yaml")], ["missing.yaml"], r"config file not found", "train")


def config_not_yaml(inp: Path, out: Path) -> Case:
    (inp / "broken.yaml").write_text("task: classification\ndata: {path: [unclosed\n")
    return Case(["train", str(inp / "broken.yaml")], ["broken.yaml"], r"not valid YAML", "train")


def config_class_folder_missing(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out, data={"classes": ["grade_0", "grade_1", "grade_9"]})
    return Case(argv, ["grade_9"], r"not found", "train")


def weights_file_garbage(inp: Path, out: Path) -> Case:
    # A failed download: the server's error page saved under the weights' name.
    (inp / "googlenet.pth").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    argv = _cls_train(inp, out, model={"weights": str(inp / "googlenet.pth")})
    return Case(argv, ["googlenet.pth"], r"corrupt|truncated|not a (readable|valid)", "train")


def run_folder_exists(inp: Path, out: Path) -> Case:
    argv = _cls_train(inp, out)
    earlier = out / "runs" / "run"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "best.pt").write_bytes(b"weights of an earlier run")
    (earlier / "status.json").write_text(json.dumps({"state": "completed"}))
    return Case(argv, [str(earlier)], r"exists already.*--overwrite", "train")


# ---------------------------------------------------------------------------------------------
# Segmentation: NIfTI studies in an MSD dataset, through `train`
# ---------------------------------------------------------------------------------------------


def _seg_dataset(inp: Path) -> Path:
    """Two labelled 32x32x4 volumes (``synct_000``, ``synct_001``), both training cases."""
    return make_synthetic_ct(inp / "ct", n_labeled=2, n_unlabeled=0, shape=(32, 32, 4), seed=0)


def _seg_train(inp: Path, out: Path, data: Path) -> list[str]:
    return _train(inp, tiny_segmentation_config(data, out / "runs"))


def _affine_of(path: Path) -> np.ndarray:
    import nibabel as nib

    return nib.load(str(path)).affine


def seg_shape_mismatch(inp: Path, out: Path) -> Case:
    data = _seg_dataset(inp)
    label = data / "labelsTr" / "synct_001.nii.gz"
    save_nifti(label, np.zeros((32, 32, 5), np.uint8), _affine_of(label))
    return Case(_seg_train(inp, out, data), ["synct_001.nii.gz"], r"shape.*does not match", "train")


def seg_affine_mismatch(inp: Path, out: Path) -> Case:
    data = _seg_dataset(inp)
    label = data / "labelsTr" / "synct_001.nii.gz"
    affine = _affine_of(label).copy()
    affine[2, 2] = 5.0  # slices twice as thick as the image's
    save_nifti(label, np.zeros((32, 32, 4), np.uint8), affine)
    return Case(_seg_train(inp, out, data), ["synct_001.nii.gz"], r"affine differs", "train")


def seg_nan_voxels(inp: Path, out: Path) -> Case:
    data = _seg_dataset(inp)
    image = data / "imagesTr" / "synct_000.nii.gz"
    array = np.full((32, 32, 4), -1000.0, np.float32)
    array[4, 5, 2] = np.nan
    save_nifti(image, array, _affine_of(image))
    return Case(_seg_train(inp, out, data), ["synct_000.nii.gz"], r"NaN", "train")


def seg_label_out_of_range(inp: Path, out: Path) -> Case:
    data = _seg_dataset(inp)
    label = data / "labelsTr" / "synct_000.nii.gz"
    array = np.zeros((32, 32, 4), np.uint8)
    array[10:12, 10:12, 1] = 7
    save_nifti(label, array, _affine_of(label))
    return Case(_seg_train(inp, out, data), ["synct_000.nii.gz"], r"label values \[7\] are outside", "train")


def seg_truncated_image(inp: Path, out: Path) -> Case:
    data = _seg_dataset(inp)
    image = data / "imagesTr" / "synct_001.nii.gz"
    full = image.read_bytes()
    image.write_bytes(full[: len(full) - 200])
    return Case(_seg_train(inp, out, data), ["synct_001.nii.gz"], r"truncated", "train")


def seg_listed_file_missing(inp: Path, out: Path) -> Case:
    data = _seg_dataset(inp)
    (data / "imagesTr" / "synct_001.nii.gz").unlink()
    return Case(_seg_train(inp, out, data), ["synct_001.nii.gz", "dataset.json"], r"missing", "train")


def seg_corrupt_test_case(inp: Path, out: Path) -> Case:
    data = make_synthetic_ct(inp / "ct", n_labeled=3, n_unlabeled=0, shape=(32, 32, 4), seed=0)
    # With seed 0 and test_fraction 0.34, synct_000 is the test case (checked below).
    cfg = tiny_segmentation_config(data, out / "runs", data={"test_fraction": 0.34})
    argv = _train(inp, cfg)
    from fewlabel.config import load_config
    from fewlabel.data.segmentation import build_datalist

    assert [r["id"] for r in build_datalist(load_config(argv[1]).data, 0).test] == ["synct_000"]
    label = data / "labelsTr" / "synct_000.nii.gz"
    label.write_bytes(label.read_bytes()[:100])
    return Case(argv, ["synct_000.nii.gz"], r"truncated", "train")


def seg_corrupt_validation_case(inp: Path, out: Path) -> Case:
    data = make_synthetic_ct(inp / "ct", n_labeled=3, n_unlabeled=0, shape=(32, 32, 4), seed=0)
    cfg = tiny_segmentation_config(data, out / "runs", data={"val_fraction": 0.34, "cache": False})
    argv = _train(inp, cfg)
    from fewlabel.config import load_config
    from fewlabel.data.segmentation import build_datalist

    (case,) = [r["id"] for r in build_datalist(load_config(argv[1]).data, 0).val]
    image = data / "imagesTr" / f"{case}.nii.gz"
    image.write_bytes(image.read_bytes()[:-200])
    return Case(argv, [f"{case}.nii.gz"], r"truncated", "train")


def seg_unlabelled_not_nifti(inp: Path, out: Path) -> Case:
    data = make_synthetic_ct(inp / "ct", n_labeled=2, n_unlabeled=1, shape=(32, 32, 4), seed=0)
    cfg = tiny_segmentation_config(data, out / "runs", data={"cache": False}, tcsm={"enabled": True})
    write_image(inp / "tmp.png")
    (inp / "tmp.png").replace(data / "imagesUnl" / "synct_002.nii.gz")  # a PNG with a NIfTI name
    return Case(_train(inp, cfg), ["synct_002.nii.gz"], r"not gzip-compressed", "train")


# ---------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------

CATALOGUE: list = [
    pytest.param(nifti_truncated, id="nifti-truncated-gz"),
    pytest.param(nifti_wrong_magic, id="nifti-wrong-magic-bytes"),
    pytest.param(nifti_not_gzip, id="nifti-named-gz-but-not-gzip"),
    pytest.param(nifti_zero_size, id="nifti-zero-size"),
    pytest.param(nifti_4d, id="nifti-4d"),
    pytest.param(mask_shape_mismatch, id="mask-shape-mismatch"),
    pytest.param(mask_affine_mismatch, id="mask-affine-mismatch"),
    pytest.param(mask_nan_voxels, id="mask-nan-voxels"),
    pytest.param(mask_label_out_of_range, id="mask-label-out-of-range"),
    pytest.param(mask_names_unmatched, id="mask-case-names-unmatched"),
    pytest.param(mask_folder_not_found, id="mask-folder-not-found"),
    pytest.param(report_inside_input, id="report-inside-input-folder"),
    pytest.param(report_exists, id="report-exists"),
    pytest.param(report_overwrite_holds_the_inputs, id="report-overwrite-holds-the-inputs"),
    pytest.param(report_overwrite_foreign_folder, id="report-overwrite-foreign-folder"),
    pytest.param(dicom_missing_slice, id="dicom-missing-slice"),
    pytest.param(dicom_irregular_spacing, id="dicom-irregular-spacing"),
    pytest.param(dicom_sheared_stack, id="dicom-sheared-stack"),
    pytest.param(dicom_mixed_pixel_spacing, id="dicom-mixed-pixel-spacing"),
    pytest.param(dicom_mixed_series, id="dicom-mixed-series"),
    pytest.param(dicom_none_in_folder, id="dicom-no-dicom-files"),
    pytest.param(dicom_folder_not_found, id="dicom-folder-not-found"),
    pytest.param(dicom_duplicate_slice, id="dicom-duplicate-slice"),
    pytest.param(dicom_unreadable_end_slice, id="dicom-unreadable-end-slice"),
    pytest.param(convert_into_input, id="convert-into-input-folder"),
    pytest.param(checkpoint_corrupt, id="checkpoint-corrupt"),
    pytest.param(checkpoint_runs_code, id="checkpoint-runs-code"),
    pytest.param(class_folder_empty, id="class-folder-empty"),
    pytest.param(image_corrupt_jpeg, id="image-corrupt-jpeg"),
    pytest.param(image_not_an_image, id="image-text-named-png"),
    pytest.param(image_channels_mixed, id="image-mixed-channels"),
    pytest.param(csv_unknown_label, id="csv-unknown-label"),
    pytest.param(data_path_not_found, id="data-path-not-found"),
    pytest.param(config_unknown_key, id="config-unknown-key"),
    pytest.param(config_wrong_type, id="config-wrong-type"),
    pytest.param(config_negative_lr, id="config-negative-learning-rate"),
    pytest.param(config_bad_override, id="config-override-out-of-range"),
    pytest.param(config_run_name_leaves_the_output_dir, id="config-run-name-leaves-the-output-dir"),
    pytest.param(config_not_found, id="config-not-found"),
    pytest.param(config_not_yaml, id="config-not-yaml"),
    pytest.param(config_class_folder_missing, id="config-class-folder-missing"),
    pytest.param(weights_file_garbage, id="weights-file-garbage"),
    pytest.param(run_folder_exists, id="run-folder-exists"),
    pytest.param(seg_shape_mismatch, id="seg-image-label-shape-mismatch"),
    pytest.param(seg_affine_mismatch, id="seg-image-label-affine-mismatch"),
    pytest.param(seg_nan_voxels, id="seg-nan-voxels"),
    pytest.param(seg_label_out_of_range, id="seg-label-out-of-range"),
    pytest.param(seg_truncated_image, id="seg-truncated-image"),
    pytest.param(seg_listed_file_missing, id="seg-listed-file-missing"),
    pytest.param(seg_corrupt_test_case, id="seg-corrupt-test-case"),
    pytest.param(seg_corrupt_validation_case, id="seg-corrupt-validation-case"),
    pytest.param(seg_unlabelled_not_nifti, id="seg-unlabelled-named-nii-gz-but-png"),
]


def _run_dir_state(run: Path) -> str | None:
    status = run / "status.json"
    return json.loads(status.read_text())["state"] if status.is_file() else None


@pytest.mark.parametrize("build", CATALOGUE)
def test_bad_input_is_reported_and_damages_nothing(
    build: Builder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    (out / SENTINEL).write_text(SENTINEL_TEXT)
    case = build(inp, out)
    inputs_before, outputs_before = snapshot(inp), snapshot(out)
    capsys.readouterr()

    rc = main(case.argv)
    err = capsys.readouterr().err

    # One clear message: exit status 2, no traceback, names the input and the problem.
    assert rc == 2, err
    assert "Traceback" not in err
    # Training may have drawn progress bars on stderr first; the message comes last.
    assert "fewlabel: error: " in err, err
    msg = err[err.index("fewlabel: error: ") :]
    for name in case.names:
        assert name in msg, f"{name!r} not named in: {msg}"
    assert re.search(case.problem, msg, re.IGNORECASE | re.DOTALL), f"{case.problem!r} not in: {msg}"

    # Inputs are byte-identical; nothing new appeared among them.
    assert snapshot(inp) == inputs_before
    # Every earlier output survives unchanged.
    outputs_after = snapshot(out)
    assert (out / SENTINEL).read_text() == SENTINEL_TEXT
    assert {k: outputs_after.get(k) for k in outputs_before} == outputs_before
    new = sorted(set(outputs_after) - set(outputs_before))
    if case.kind == "train":
        # A run folder may have been created, but it must say it failed, with the same message.
        runs = out / "runs"
        fresh = [d for d in runs.iterdir() if d.is_dir()] if runs.is_dir() else []
        fresh = [d for d in fresh if not any(k.startswith(f"runs/{d.name}/") for k in outputs_before)]
        assert all(k.startswith(tuple(f"runs/{d.name}/" for d in fresh)) for k in new), new
        for run in fresh:
            assert _run_dir_state(run) == "failed", sorted(p.name for p in run.iterdir())
            assert json.loads((run / "status.json").read_text())["error"] in msg
            assert not (run / "eval" / "report.html").exists()
            assert not (run / "checkpoints" / "best.pt").exists()
            assert not [q for q in run.rglob(".*")], "hidden temporary files left behind"
    else:
        # evaluate/convert build their output elsewhere and move it in only when complete.
        assert new == []
        assert sorted(p.name for p in out.iterdir()) == sorted({*(k.split("/")[0] for k in outputs_before)})


def test_series_choice_message_suggests_an_existing_option(tmp_path: Path, capsys) -> None:
    write_dicom_series(tmp_path / "mixed", description="lung kernel")
    write_dicom_series(tmp_path / "mixed" / "extra", n=3, description="soft tissue")
    assert main(["convert", str(tmp_path / "mixed"), str(tmp_path / "ct.nii.gz")]) == 2
    err = capsys.readouterr().err
    suggested = re.findall(r"(?<![\w-])--[a-z][a-z-]+", err)
    assert suggested, err
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    known = {opt for action in convert._actions for opt in action.option_strings}
    assert set(suggested) <= known, f"{suggested} suggested; convert accepts {sorted(known)}"
