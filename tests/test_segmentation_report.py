"""Segmentation report files and `evaluate --pred --gt` end to end on tiny masks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import fewlabel.reports.segmentation as seg_report
from fewlabel.errors import ConfigError, DataError, RunDirError
from fewlabel.metrics.segmentation import CaseResult
from fewlabel.pipelines.mask_evaluation import case_name, evaluate_masks
from fewlabel.reports.segmentation import overlay_slice, plot_overlay, write_segmentation_report

GT_2D = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0]], dtype=np.uint8)
PRED_2D = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 0], [0, 0, 2, 0]], dtype=np.uint8)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4) if affine is None else affine), str(path))


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def _volume_pair() -> tuple[np.ndarray, np.ndarray]:
    """Slice Dice 1 and 0 (third slice empty): mean slice Dice 0.5, VolDice 16/18."""
    gt = np.zeros((4, 4, 3), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[:2, :, 0] = 1
    pred[:2, :, 0] = 1
    gt[3, 3, 1] = 1
    pred[0, 0, 1] = 1
    return pred, gt


def _nifti_folders(root: Path) -> tuple[Path, Path]:
    pred_dir, gt_dir = root / "pred", root / "gt"
    pred_dir.mkdir(parents=True)
    gt_dir.mkdir()
    pred, gt = _volume_pair()
    _save_nifti(pred_dir / "case_a.nii.gz", pred)
    _save_nifti(gt_dir / "case_a.nii.gz", gt)
    _save_nifti(pred_dir / "case_b.nii", gt)  # a perfect prediction, uncompressed on one side
    _save_nifti(gt_dir / "case_b.nii.gz", gt)
    return pred_dir, gt_dir


def test_case_name_strips_mask_suffixes():
    assert case_name("x/LIDC_R_1.nii.gz") == "LIDC_R_1"
    assert case_name("a.b.NII") == "a.b"
    assert case_name("18.png") == "18"
    assert case_name("notes.txt") is None
    assert case_name("c7.TIF") == "c7" and case_name("c8.bmp") == "c8"  # as training reads masks


def test_tiff_and_bmp_masks_are_scored(tmp_path):
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1:4, 2:6] = 1
    for folder, suffix in (("pred", ".tif"), ("gt", ".png")):
        (tmp_path / folder).mkdir()
        for case in ("a", "b"):
            Image.fromarray(mask).save(tmp_path / folder / f"{case}{suffix}")
    Image.fromarray(mask).save(tmp_path / "pred" / "b.bmp")
    (tmp_path / "pred" / "b.tif").unlink()
    evaluate_masks(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", classes=["bg", "lesion"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]] == [1.0, 1.0]


def test_report_files_and_nnunet_summary(tmp_path):
    cases = [
        CaseResult("good", {"dice": {1: 0.9, 2: math.nan}, "voldice": {1: 0.95, 2: math.nan}}),
        CaseResult("fair", {"dice": {1: 0.6, 2: 0.4}, "voldice": {1: 0.7, 2: 0.5}}),
        CaseResult("poor", {"dice": {1: 0.3, 2: 0.0}, "voldice": {1: 0.2, 2: 0.0}}),
    ]
    image = np.linspace(0, 1, 24 * 24).reshape(24, 24)
    overlays = [
        {"case_id": c, "image": image, "gt": g, "pred": p}
        for c, g, p in [
            ("good", np.pad(GT_2D, 10), np.pad(GT_2D, 10)),
            ("fair", np.pad(GT_2D, 10), np.pad(PRED_2D, 10)),
            ("poor", np.pad(GT_2D, 10), np.zeros((24, 24), dtype=np.uint8)),
        ]
    ]
    report = write_segmentation_report(tmp_path / "rep", cases, ["background", "a", "b"], overlays=overlays)
    out = tmp_path / "rep"
    assert report == out / "report.html"
    for name in [
        "metrics_per_case.csv",
        "summary.json",
        "boxplot_dice.png",
        "boxplot_voldice.png",
        "overlay_best.png",
        "overlay_median.png",
        "overlay_worst.png",
    ]:
        assert (out / name).stat().st_size > 0, name

    rows = list(csv.DictReader((out / "metrics_per_case.csv").open()))
    assert len(rows) == 6
    assert rows[0] == {"case_id": "good", "metric": "dice", "a": "0.900000", "b": "nan"}

    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["good", "fair", "poor"]
    assert summary["metric_per_case"][0]["metrics"]["2"]["Dice"] is None  # NaN -> null
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.6)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.2)  # nanmean over the two defined cases
    assert summary["n"]["2"]["Dice"] == 2
    assert summary["median"]["1"]["VolDice"] == pytest.approx(0.7)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.4)
    lo, hi = summary["ci95"]["1"]["Dice"]
    assert 0.0 <= lo < 0.6 < hi <= 1.0
    assert summary["classes"] == {"0": "background", "1": "a", "2": "b"}

    page = report.read_text()
    assert "best: good" in page and "worst: poor" in page and "median: fair" in page
    assert page.count("data:image/png;base64,") == 5  # self-contained: 2 box plots + 3 overlays


def test_overlay_slice_picks_most_ground_truth():
    gt = np.zeros((5, 5, 4), dtype=np.uint8)
    gt[1:3, 1:3, 1] = 1
    gt[0:4, 0:4, 2] = 1
    pred = np.zeros_like(gt)
    assert overlay_slice(gt, pred) == 2
    pred[0, 0, 3] = 1
    assert overlay_slice(np.zeros_like(gt), pred) == 3  # empty truth: follow the prediction
    assert overlay_slice(np.zeros_like(gt), np.zeros_like(gt)) == 2  # both empty: middle slice


def _drawn_overlay(monkeypatch, tmp_path, gt: np.ndarray):
    """The figure plot_overlay draws for ``gt`` as truth and prediction, and its contour's box."""
    figures = []
    monkeypatch.setattr(seg_report, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    plot_overlay(None, gt, gt, ["background", "lesion"], tmp_path / "overlay.png")
    (ax,) = figures[0].axes
    vertices = np.concatenate([p.vertices for c in ax.collections for p in c.get_paths() if len(p.vertices)])
    return ax, vertices.min(axis=0), vertices.max(axis=0)


def test_overlay_contours_run_along_the_edges_of_the_pixels_they_outline(monkeypatch, tmp_path):
    # A non-square image with the lesion near its top: contour() with origin="upper" used to
    # mirror the outline to the bottom of the picture.
    gt = np.zeros((40, 12), dtype=np.uint8)
    gt[1:8, 2:10] = 1  # rows 1..7, columns 2..9
    ax, low, high = _drawn_overlay(monkeypatch, tmp_path, gt)
    # imshow draws pixel (row i, column j) centred on (x=j, y=i), so the edges are at ±0.5
    assert ax.images[0].get_extent() == [-0.5, 11.5, 39.5, -0.5]
    np.testing.assert_allclose(low, [1.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(high, [9.5, 7.5], atol=1e-6)


def test_overlay_contours_of_a_volume_slice_run_along_its_voxel_edges(monkeypatch, tmp_path):
    gt = np.zeros((9, 14, 3), dtype=np.uint8)
    gt[2:5, 3:8, 1] = 1  # x 2..4, y 3..7 on slice 1; x runs across the figure, y up
    ax, low, high = _drawn_overlay(monkeypatch, tmp_path, gt)
    assert ax.images[0].get_extent() == [-0.5, 8.5, -0.5, 13.5]
    np.testing.assert_allclose(low, [1.5, 2.5], atol=1e-6)
    np.testing.assert_allclose(high, [4.5, 7.5], atol=1e-6)


def test_overlay_of_a_one_pixel_wide_image_draws_without_contours(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(seg_report, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    plot_overlay(None, np.ones((1, 5), np.uint8), np.ones((1, 5), np.uint8), ["bg", "a"], tmp_path / "o.png")
    assert not figures[0].axes[0].collections  # contour() needs 2x2 samples; the legend still names the class


def test_evaluate_nifti_masks_end_to_end(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    before = sorted(p.name for p in pred_dir.iterdir()) + sorted(p.name for p in gt_dir.iterdir())
    result = evaluate_masks(pred_dir, gt_dir, tmp_path / "out")
    metrics = result["summary"]["metrics"]
    assert result["summary"]["classes"] == {0: "background", 1: "class_1"}
    assert metrics["dice"][1]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["voldice"][1]["mean"] == pytest.approx((16 / 18 + 1.0) / 2)
    assert result["report"] == tmp_path / "out" / "report.html"
    assert result["report"].is_file()
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    per_case = {c["case"]: c["metrics"]["1"] for c in saved["metric_per_case"]}
    assert per_case["case_a"] == pytest.approx(
        {"Dice": 0.5, "VolDice": 16 / 18, "Precision": 8 / 9, "Sensitivity": 8 / 9}
    )
    assert (tmp_path / "out" / "overlay_worst.png").is_file()
    # inputs untouched, no temporary folders left behind
    assert sorted(p.name for p in pred_dir.iterdir()) + sorted(p.name for p in gt_dir.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "out", "pred"]


def test_evaluate_png_masks_with_merged_class_and_images(tmp_path):
    pred_dir, gt_dir, img_dir = tmp_path / "pred", tmp_path / "gt", tmp_path / "img"
    for d in (pred_dir, gt_dir, img_dir):
        d.mkdir()
    _save_png(pred_dir / "s1.png", PRED_2D)
    _save_png(gt_dir / "s1.png", GT_2D)
    _save_png(pred_dir / "s2.png", GT_2D)
    _save_png(gt_dir / "s2.png", GT_2D)
    _save_png(img_dir / "s1.png", np.arange(16).reshape(4, 4) * 10)
    result = evaluate_masks(
        pred_dir,
        gt_dir,
        tmp_path / "out",
        classes=["background", "ggo", "consolidation"],
        image_dir=img_dir,
        merge={"infection": [1, 2]},
    )
    dice = result["summary"]["metrics"]["dice"]
    # s1 by hand: ggo 6/7, consolidation 1/2, infection (union) 8/11; s2 is perfect
    assert dice[1]["mean"] == pytest.approx((6 / 7 + 1) / 2)
    assert dice[2]["mean"] == pytest.approx((0.5 + 1) / 2)
    assert dice[3]["mean"] == pytest.approx((8 / 11 + 1) / 2)
    assert result["summary"]["classes"][3] == "infection"
    # the merged class stays out of the foreground mean
    assert result["summary"]["foreground_mean"]["dice"] == pytest.approx(((6 / 7 + 1) / 2 + 0.75) / 2)
    header = (tmp_path / "out" / "metrics_per_case.csv").read_text().splitlines()[0]
    assert header == "case_id,metric,ggo,consolidation,infection"
    assert (tmp_path / "out" / "overlay_best.png").is_file()
    assert (tmp_path / "out" / "overlay_worst.png").is_file()


def test_dollar_signs_in_case_and_class_names_are_drawn_as_text(tmp_path):
    # Matplotlib reads text between two "$" as mathtext; "$^$" would not even render.
    pred, gt = _volume_pair()
    for folder, mask in (("pred", pred), ("gt", gt)):
        (tmp_path / folder).mkdir()
        _save_nifti(tmp_path / folder / "scan$^$01.nii.gz", mask)
    result = evaluate_masks(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", classes=["bg", "GGO $x$"])
    assert result["report"].is_file() and (tmp_path / "out" / "overlay_best.png").is_file()


def test_unmatched_files_are_listed(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    _save_nifti(pred_dir / "extra_pred.nii.gz", np.zeros((4, 4, 3)))
    _save_nifti(gt_dir / "extra_gt.nii.gz", np.zeros((4, 4, 3)))
    with pytest.raises(DataError, match=r"without ground truth.*extra_pred.*without prediction.*extra_gt"):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_probability_maps_beside_their_masks_are_not_cases(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    _save_nifti(pred_dir / "case_a_probabilities.nii.gz", np.zeros((4, 4, 3)))  # eval.save_probabilities
    (pred_dir / "case_b_prob_lesion.png").write_bytes(b"")
    result = evaluate_masks(pred_dir, gt_dir, tmp_path / "out")
    assert result["summary"]["n_cases"] == 2


def test_masks_saved_as_0_and_255_are_refused_with_the_fix(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for folder in (pred_dir, gt_dir):
        _save_png(folder / "a.png", GT_2D.clip(0, 1) * 255)
    with pytest.raises(
        DataError, match=r"gt: the masks hold only the values 0 and 255.*save the lesion as 1"
    ):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_overlay_image_on_another_grid_is_refused(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # same shape, mirrored left to right
    for name in ("case_a", "case_b"):
        _save_nifti(img_dir / f"{name}.nii.gz", np.zeros((4, 4, 3)), flipped)
    with pytest.raises(DataError, match=r"img/case_.\.nii\.gz"):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out", image_dir=img_dir)
    assert not (tmp_path / "out").exists()


def test_bad_masks_raise_data_errors(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    _save_nifti(pred_dir / "case_b.nii", np.zeros((4, 4, 2)))
    with pytest.raises(DataError, match=r"case_b\.nii.*shape.*case_b\.nii\.gz"):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out")

    pred_dir, gt_dir = _nifti_folders(tmp_path / "labels")
    _save_nifti(pred_dir / "case_a.nii.gz", np.full((4, 4, 3), 2))
    with pytest.raises(DataError, match=r"case_a\.nii\.gz.*label values \[2\]"):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out", classes=["background", "nodule"])
    with pytest.raises(ConfigError, match="infection"):
        evaluate_masks(
            pred_dir, gt_dir, tmp_path / "out", classes=["background", "nodule"], merge={"infection": [1, 2]}
        )

    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    geo_pred, geo_gt = _nifti_folders(tmp_path / "geo")
    _save_nifti(geo_pred / "case_b.nii", _volume_pair()[1], affine=shifted)
    with pytest.raises(DataError, match="affine"):
        evaluate_masks(geo_pred, geo_gt, tmp_path / "out")


def test_output_rules(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RunDirError, match="overwrite"):
        evaluate_masks(pred_dir, gt_dir, out)
    # Not a report: even --overwrite leaves it alone.
    with pytest.raises(RunDirError, match="does not look like a fewlabel output"):
        evaluate_masks(pred_dir, gt_dir, out, overwrite=True)
    assert (out / "old.txt").is_file()
    (out / "summary.json").write_text("{}")  # an earlier report
    evaluate_masks(pred_dir, gt_dir, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "report.html").is_file()
    with pytest.raises(DataError, match="inside the input folder"):
        evaluate_masks(pred_dir, gt_dir, gt_dir / "report")
    with pytest.raises(DataError, match="not found"):
        evaluate_masks(tmp_path / "missing", gt_dir, tmp_path / "out2")


@pytest.mark.realdata
def test_covid_masks_scored_against_themselves(shared_data, tmp_path):
    masks = sorted((shared_data / "covid_semiseg" / "test" / "masks").glob("*.png"))[:3]
    if not masks:
        pytest.skip("COVID-SemiSeg test masks not found")
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for m in masks:
        (pred_dir / m.name).symlink_to(m)
        (gt_dir / m.name).symlink_to(m)
    result = evaluate_masks(
        pred_dir,
        gt_dir,
        tmp_path / "out",
        classes=["background", "ggo", "consolidation"],
        merge={"infection": [1, 2]},
        image_dir=shared_data / "covid_semiseg" / "test" / "images",
    )
    for k, stats in result["summary"]["metrics"]["dice"].items():
        assert stats["n"] == 0 or stats["mean"] == pytest.approx(1.0), k
    assert result["summary"]["metrics"]["dice"][3]["n"] == 3  # every test slice has infection


def test_a_missing_images_folder_is_called_an_image_folder(tmp_path):
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / folder / "a.png")
    with pytest.raises(DataError, match="imgs: image folder not found"):
        evaluate_masks(
            tmp_path / "pred",
            tmp_path / "gt",
            tmp_path / "out",
            classes=["bg", "lesion"],
            image_dir=tmp_path / "imgs",
        )


def test_cases_with_an_uncertainty_get_a_scatter_against_dice(tmp_path):
    cases = [CaseResult(f"c{i}", {"dice": {1: 0.9 - 0.2 * i, 2: 0.5}}, uncertainty=0.1 * i) for i in range(4)]
    report = write_segmentation_report(tmp_path / "rep", cases, ["background", "GGO $x$", "b"])
    page = report.read_text()
    assert (tmp_path / "rep" / "uncertainty_vs_dice.png").stat().st_size > 0
    assert "Uncertainty against Dice" in page and page.count("data:image/png;base64,") == 2
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert [c["uncertainty"] for c in summary["metric_per_case"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])

    # Masks scored from disk have no probabilities, so no uncertainty and no scatter.
    plain = [CaseResult(c.case_id, c.metrics) for c in cases]
    page = write_segmentation_report(tmp_path / "plain", plain, ["background", "a", "b"]).read_text()
    assert not (tmp_path / "plain" / "uncertainty_vs_dice.png").exists() and "Uncertainty" not in page


def test_an_image_folder_given_as_ground_truth_is_refused_before_writing(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    grey = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8  # values 0..240, like a slice
    for name in ("a", "b"):
        _save_png(pred_dir / f"{name}.png", np.kron(GT_2D, np.ones((4, 4), np.uint8)))
        Image.fromarray(grey, mode="L").save(gt_dir / f"{name}.jpg", quality=90)
    with pytest.raises(
        DataError, match=r"gt/a\.jpg: holds \d+ label values up to \d+.*predictions' largest label is 2"
    ) as err:
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out")
    assert "more than 32 classes" in str(err.value)
    assert "check that --gt is the mask folder, not the images, or pass --classes" in str(err.value)
    assert not (tmp_path / "out").exists()
    # with the classes named, the user has said the values are labels: nothing is guessed
    with pytest.raises(DataError, match=r"gt/a\.jpg: .*label values"):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out", classes=["background", "ggo", "consolidation"])


def test_an_image_volume_given_as_predictions_is_refused(tmp_path):
    pred_dir, gt_dir = _nifti_folders(tmp_path)
    image = np.arange(48).reshape(4, 4, 3)  # non-negative intensities read as 48 labels
    _save_nifti(pred_dir / "case_b.nii", image)
    with pytest.raises(
        DataError, match=r"pred/case_b\.nii: holds 48 label values up to 47.*check that --pred"
    ):
        evaluate_masks(pred_dir, gt_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_masks_with_32_classes_are_scored_without_classes(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    labels = np.arange(32, dtype=np.uint8).reshape(4, 8)  # background and 31 structures
    _save_png(pred_dir / "a.png", labels)
    _save_png(gt_dir / "a.png", labels)
    summary = evaluate_masks(pred_dir, gt_dir, tmp_path / "out")["summary"]
    assert len(summary["classes"]) == 32 and summary["metrics"]["dice"][31]["mean"] == 1.0
