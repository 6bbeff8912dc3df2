"""Segmentation datalists (MSD, nnU-Net, CSV, slices2d), label selection, preprocessing and synthetic CT."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd
from PIL import Image

from fewlabel.config.segmentation import Preprocess, SegmentationAugment, SegmentationData
from fewlabel.data.readers import read_label, read_study
from fewlabel.data.segmentation import (
    build_datalist,
    load_records,
    msd_test_records,
    patient_id_from_name,
)
from fewlabel.data.segmentation_transforms import build_preprocessing, build_train_augmentation
from fewlabel.data.synthetic_ct import make_synthetic_ct
from fewlabel.errors import ConfigError, DataError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _msd(root: Path, labels: dict, cases: list[str], unlabeled: list[str] = ()) -> Path:
    training = []
    for case in cases:
        _touch(root / "imagesTr" / f"{case}.nii.gz")
        _touch(root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    for case in unlabeled:
        _touch(root / "imagesUnl" / f"{case}.nii.gz")
    meta = {
        "labels": labels,
        "training": training,
        "unlabeled": [f"./imagesUnl/{c}.nii.gz" for c in unlabeled],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ----------------------------------------------------------------------------------------------
# Record loading
# ----------------------------------------------------------------------------------------------


def test_msd_style_labels_and_training_list(tmp_path: Path) -> None:
    root = _msd(tmp_path / "msd", {"0": "background", "2": "tumour", "1": "organ"}, ["lv_1", "lv_2"], ["u_1"])
    labelled, unlabelled, classes = load_records(root)
    assert classes == ["background", "organ", "tumour"]
    assert [r["id"] for r in labelled] == ["lv_1", "lv_2"]
    assert labelled[0]["image"] == str(root / "imagesTr" / "lv_1.nii.gz")
    assert labelled[0]["label"] == str(root / "labelsTr" / "lv_1.nii.gz")
    assert unlabelled == [
        {"image": str(root / "imagesUnl" / "u_1.nii.gz"), "label": None, "id": "u_1", "patient_id": "u_1"}
    ]
    # The same file saved with a byte-order mark, as Windows editors do, reads the same.
    text = (root / "dataset.json").read_text(encoding="utf-8")
    (root / "dataset.json").write_text("\ufeff" + text, encoding="utf-8")
    assert load_records(root)[2] == classes


def test_nnunet_v2_labels_and_file_naming(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_Lung"
    for case in ("lung_002", "lung_010", "lung_001"):
        _touch(root / "imagesTr" / f"{case}_0000.nii.gz")
        _touch(root / "labelsTr" / f"{case}.nii.gz")
    _touch(root / "imagesTr" / "._lung_001_0000.nii.gz")  # macOS metadata file: ignored
    _touch(root / "imagesTs" / "lung_100_0000.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz", "numTraining": 3})
    )
    labelled, unlabelled, classes = load_records(root, fmt="msd")
    assert classes == ["background", "lesion"]
    assert [r["id"] for r in labelled] == ["lung_001", "lung_002", "lung_010"]
    assert labelled[0]["label"] == str(root / "labelsTr" / "lung_001.nii.gz")
    assert unlabelled == []  # test images never join the training pool
    assert [r["id"] for r in msd_test_records(root)] == ["lung_100"]


def test_nnunet_case_ids_are_the_label_names_listed_or_scanned(tmp_path: Path) -> None:
    # A training list naming <case>_0000 images gives the ids a scan of imagesTr/ gives.
    root = tmp_path / "listed"
    for case in ("lung_001", "lung_002"):
        _touch(root / "imagesTr" / f"{case}_0000.nii.gz")
        _touch(root / "labelsTr" / f"{case}.nii.gz")
    training = [
        {"image": f"./imagesTr/{c}_0000.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
        for c in ("lung_001", "lung_002")
    ]
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "lesion": 1}, "training": training})
    )
    listed = load_records(root)[0]
    assert [r["id"] for r in listed] == ["lung_001", "lung_002"]
    # The split is drawn on the patient ids, which keep the names splits were drawn on before.
    assert [r["patient_id"] for r in listed] == ["lung_001_0000", "lung_002_0000"]
    # Names ending in four digits are cases when a label of the same name exists, not channels.
    scanned = tmp_path / "scanned"
    for case in ("patient_0001", "scan_0000"):
        _touch(scanned / "imagesTr" / f"{case}.nii.gz")
        _touch(scanned / "labelsTr" / f"{case}.nii.gz")
    (scanned / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    assert [r["id"] for r in load_records(scanned)[0]] == ["patient_0001", "scan_0000"]


def test_a_test_path_holding_the_training_files_is_refused(tmp_path: Path) -> None:
    root = _msd(tmp_path / "data", {"0": "background", "1": "lesion"}, ["a", "b", "c", "d"])
    cfg = SegmentationData(path=str(root), test_path=str(root), val_fraction=0.0)
    with pytest.raises(DataError, match=r"4 test studies are files of data.path too"):
        build_datalist(cfg, seed=0)


def test_evaluate_data_labels_must_match_the_model_unless_it_renamed_them(tmp_path: Path) -> None:
    from fewlabel.pipelines.segmentation import _refuse_other_declared_classes

    root = _msd(tmp_path / "data", {"0": "background", "1": "tumour"}, ["a"])
    with pytest.raises(DataError, match=r"labels \['background', 'tumour'\] differ from the model's"):
        _refuse_other_declared_classes(root, ["background", "lesion"])
    # trained with data.classes: [background, lesion] over the same dataset.json
    _refuse_other_declared_classes(root, ["background", "lesion"], renamed=True)
    with pytest.raises(DataError, match="has 2 labels"):
        _refuse_other_declared_classes(root, ["background", "ggo", "consolidation"], renamed=True)


def test_a_csv_given_as_an_msd_folder_says_which_format_to_set(tmp_path: Path) -> None:
    table = tmp_path / "list.csv"
    table.write_text("image,label\n")
    with pytest.raises(
        DataError, match=r"list.csv: is a file, but data.format is msd .*set data.format: csv"
    ):
        load_records(table, fmt="msd")


def test_nnunets_ignore_label_is_refused_not_trained_as_a_class(tmp_path: Path) -> None:
    root = _msd(tmp_path / "data", {"background": 0, "lesion": 1, "ignore": 2}, ["a"])
    with pytest.raises(DataError, match=r"dataset.json: label 2 is nnU-Net's 'ignore' label"):
        load_records(root)


def test_msd_errors_name_the_problem(tmp_path: Path) -> None:
    root = _msd(tmp_path / "gap", {"0": "background", "2": "tumour"}, ["a"])
    with pytest.raises(DataError, match=r"0\.\.n-1 without gaps"):
        load_records(root)
    root = _msd(tmp_path / "missing", {"0": "background", "1": "tumour"}, ["a", "b"])
    (root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match="listed as training label") as err:
        load_records(root)
    assert "b.nii.gz" in str(err.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(tmp_path / "bad")


def test_csv_records_with_unlabelled_rows(tmp_path: Path) -> None:
    for name in ("a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "c.nii.gz", "c_seg.nii.gz"):
        _touch(tmp_path / "data" / name)
    table = tmp_path / "cases.csv"
    table.write_text(
        "image,label,patient_id\n"
        "data/a.nii.gz,data/a_seg.nii.gz,P1\n"
        "data/b.nii.gz,,P1\n"
        f"{tmp_path / 'data' / 'c.nii.gz'},data/c_seg.nii.gz,P2\n"
    )
    labelled, unlabelled, classes = load_records(table)
    assert classes is None
    assert [(r["id"], r["patient_id"]) for r in labelled] == [("a", "P1"), ("c", "P2")]
    assert labelled[1]["label"] == str(tmp_path / "data" / "c_seg.nii.gz")
    assert [(r["id"], r["label"]) for r in unlabelled] == [("b", None)]

    table.write_text("image,label\ndata/a.nii.gz,data/missing.nii.gz\n")
    with pytest.raises(DataError, match=r"line 2\) but missing") as err:
        load_records(table)
    assert "missing.nii.gz" in str(err.value)
    table.write_text("path,mask\ndata/a.nii.gz,data/a_seg.nii.gz\n")
    with pytest.raises(DataError, match="'image' column"):
        load_records(table)
    # An unquoted comma in a path makes one cell too many.
    table.write_text("image,label,patient_id\ndata/a.nii.gz,data/a_seg.nii.gz,P1,extra\n")
    with pytest.raises(DataError, match=r"cases.csv: line 2 has 4 fields, the header 3; quote paths"):
        load_records(table)


def _slices2d(root: Path, names: list[str], masks: bool = True) -> Path:
    for name in names:
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / "images" / f"{name}.jpg")
        if masks:
            (root / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def test_slices2d_pairs_and_patient_ids(tmp_path: Path) -> None:
    root = _slices2d(tmp_path / "train", ["Data-1_case_a_2", "Data-1_case_a_10", "Data-1_case_b_1", "7"])
    labelled, unlabelled, _ = load_records(root)
    assert unlabelled == []
    assert [r["id"] for r in labelled] == ["7", "Data-1_case_a_2", "Data-1_case_a_10", "Data-1_case_b_1"]
    assert [r["patient_id"] for r in labelled] == ["7", "case_a", "case_a", "case_b"]
    assert labelled[0]["label"] == str(root / "masks" / "7.png")
    assert patient_id_from_name("LIDC-IDRI-0042_R_3") == "LIDC-IDRI-0042"

    (root / "images" / "orphan.jpg").write_bytes((root / "images" / "7.jpg").read_bytes())
    with pytest.raises(DataError, match="no mask for this image") as err:
        load_records(root)
    assert "orphan.jpg" in str(err.value)

    unl = _slices2d(tmp_path / "unlabeled", ["Data-1_c_1", "Data-1_c_2"], masks=False)
    labelled, unlabelled, _ = load_records(unl)
    assert labelled == [] and [r["patient_id"] for r in unlabelled] == ["c", "c"]


def test_slices2d_masks_pair_whatever_the_case_of_their_suffix(tmp_path: Path) -> None:
    root = tmp_path / "upper"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / "images" / "Case_01.JPG", format="JPEG")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "Case_01.PNG", format="PNG")
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / "images" / "Case_02.JPG", format="JPEG")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "Case_02.jpg", format="JPEG")
    labelled, unlabelled, _ = load_records(root)
    assert unlabelled == []
    assert [Path(r["label"]).name for r in labelled] == ["Case_01.PNG", "Case_02.jpg"]

    # Two masks that differ only in the case of the suffix: neither is picked silently.
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "Case_01.png", format="PNG")
    with pytest.raises(DataError, match=r"Case_01.JPG: 2 masks .* differ only in the case") as err:
        load_records(root)
    assert "Case_01.PNG, Case_01.png" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Splits and label selection
# ----------------------------------------------------------------------------------------------


def _csv_dataset(tmp_path: Path, n_patients: int = 12, per_patient: int = 2) -> Path:
    lines = ["image,label,patient_id"]
    for p in range(n_patients):
        for s in range(per_patient):
            image = _touch(tmp_path / "d" / f"p{p}_s{s}.nii.gz")
            label = _touch(tmp_path / "d" / f"p{p}_s{s}_seg.nii.gz")
            lines.append(f"{image},{label},P{p}")
    table = tmp_path / "all.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def test_labeled_count_by_patient_reproducible_and_nested(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path)
    cfg = SegmentationData(path=str(table), val_fraction=0.25, test_fraction=0.0, labeled_count=6)
    dl = build_datalist(cfg, seed=3)
    assert len(dl.train) == 6
    assert all(r["label"] for r in dl.train)
    assert all(r["label"] is None for r in dl.unlabeled)
    assert len(dl.train) + len(dl.unlabeled) + len(dl.val) == 24
    assert dl.demoted == len(dl.unlabeled)  # the table has no unlabelled cases of its own
    # Whole patients: 6 cases of 2-case patients are 3 complete patients.
    train_patients = {r["patient_id"] for r in dl.train}
    assert len(train_patients) == 3
    assert not train_patients & {r["patient_id"] for r in dl.unlabeled}
    assert not ({r["patient_id"] for r in dl.train + dl.unlabeled} & {r["patient_id"] for r in dl.val})
    assert dl.classes == ["background", "lesion"]

    again = build_datalist(cfg, seed=3)
    assert again.to_dict() == dl.to_dict()
    smaller = build_datalist(cfg.model_copy(update={"labeled_count": 2}), seed=3)
    assert {r["id"] for r in smaller.train} < {r["id"] for r in dl.train}
    assert smaller.val == dl.val  # the split does not depend on the label budget
    other = build_datalist(cfg, seed=4)
    assert {r["id"] for r in other.train} != {r["id"] for r in dl.train} or other.val != dl.val

    with pytest.raises(ConfigError, match="labeled_count=40"):
        build_datalist(cfg.model_copy(update={"labeled_count": 40}), seed=3)


def test_labelled_selection_does_not_depend_on_the_order_of_the_records() -> None:
    from fewlabel.data.segmentation import _select_labeled

    # "P1" and "P01" sort as equals by natural order; the pick must not depend on which comes first.
    records = [{"id": f"{p}-{i}", "patient_id": p} for p in ("P1", "P01", "P2", "P3") for i in range(2)]
    for seed in range(6):
        picks = [
            sorted(
                r["id"] for r in _select_labeled(rows, labeled_count=2, labeled_fraction=1.0, seed=seed)[0]
            )
            for rows in (records, records[2:4] + records[:2] + records[4:])
        ]
        assert picks[0] == picks[1], seed


def test_labeled_fraction_counts_patients(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path, n_patients=10, per_patient=3)
    cfg = SegmentationData(path=str(table), val_fraction=0.2, test_fraction=0.2, labeled_fraction=0.5)
    dl = build_datalist(cfg, seed=0)
    assert len({r["patient_id"] for r in dl.val}) == 2 and len({r["patient_id"] for r in dl.test}) == 2
    assert len({r["patient_id"] for r in dl.train}) == 3  # half of the 6 training patients
    assert len(dl.train) == 9 and len(dl.unlabeled) == 9


def test_test_path_and_unlabeled_path(tmp_path: Path) -> None:
    train = _slices2d(tmp_path / "train", [str(i) for i in range(6)])
    test = _slices2d(tmp_path / "test", ["t1", "t2"])
    unl = _slices2d(tmp_path / "unl", ["Data-1_x_1", "Data-1_x_2", "Data-1_y_1"], masks=False)
    cfg = SegmentationData(
        path=str(train),
        test_path=str(test),
        unlabeled_path=str(unl),
        val_fraction=0.2,
        test_fraction=0.3,
        classes=["background", "ggo", "consolidation"],
    )
    dl = build_datalist(cfg, seed=0)
    assert dl.classes == ["background", "ggo", "consolidation"]
    assert [r["id"] for r in dl.test] == ["t1", "t2"]
    assert len(dl.val) == 1 and len(dl.train) == 5
    assert sorted(r["id"] for r in dl.unlabeled) == ["Data-1_x_1", "Data-1_x_2", "Data-1_y_1"]
    saved = json.loads(dl.save(tmp_path / "out" / "datalist.json").read_text())
    assert saved["test"] == dl.test


def test_a_test_patient_among_the_training_cases_is_warned_about(tmp_path: Path, caplog) -> None:
    train = _slices2d(tmp_path / "train", [str(i) for i in range(6)])
    test = _slices2d(tmp_path / "test", ["3", "t2"])  # "3" names a training slice too
    cfg = SegmentationData(path=str(train), test_path=str(test), val_fraction=0.2, classes=["bg", "lesion"])
    with caplog.at_level("WARNING"):
        dl = build_datalist(cfg, seed=0)
    assert "1 patient id(s) of the test set also label training or validation cases (3)" in caplog.text
    assert len(dl.train) + len(dl.val) == 6  # warned, not removed: names can coincide by chance


def test_unlabelled_studies_of_held_out_patients_are_dropped(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path, n_patients=5, per_patient=1)
    rows = table.read_text().splitlines()
    extra = [f"{_touch(tmp_path / 'd' / f'p{p}_extra.nii.gz')},,P{p}" for p in range(5)]
    table.write_text("\n".join(rows + extra) + "\n")
    dl = build_datalist(SegmentationData(path=str(table), val_fraction=0.4), seed=1)
    held_out = {r["patient_id"] for r in dl.val}
    assert held_out and not held_out & {r["patient_id"] for r in dl.unlabeled}
    assert len(dl.unlabeled) == 5 - len(held_out)


# ----------------------------------------------------------------------------------------------
# Synthetic CT
# ----------------------------------------------------------------------------------------------


def test_make_synthetic_ct(tmp_path: Path) -> None:
    root = make_synthetic_ct(
        tmp_path / "syn", n_labeled=2, n_unlabeled=1, shape=(24, 24, 8), num_lesion_classes=2
    )
    labelled, unlabelled, classes = load_records(root)
    assert classes == ["background", "ggo", "consolidation"]
    assert len(labelled) == 2 and len(unlabelled) == 1
    image = read_study(labelled[0]["image"])
    label = read_label(labelled[0]["label"], classes)
    assert nib.load(labelled[0]["image"]).get_data_dtype() == np.int16
    assert image.array.shape == (24, 24, 8)
    np.testing.assert_allclose(image.spacing, (0.8, 0.8, 2.5), atol=1e-5)
    assert not np.allclose(image.affine, np.eye(4))
    assert image.array[0, 0, 0] < -900  # air in the corner
    assert label.array.max() >= 1
    lesion_hu = image.array[label.array > 0]
    assert lesion_hu.mean() > -650  # lesions are denser than the lung around them
    assert np.median(image.array[image.array < -700]) < -840  # lung and air
    before = (root / "imagesTr" / "synct_000.nii.gz").read_bytes()
    again = make_synthetic_ct(
        tmp_path / "syn2", n_labeled=2, n_unlabeled=1, shape=(24, 24, 8), num_lesion_classes=2
    )
    assert (again / "imagesTr" / "synct_000.nii.gz").read_bytes() == before
    with pytest.raises(DataError, match="already holds"):
        make_synthetic_ct(root)


# ----------------------------------------------------------------------------------------------
# Preprocessing and augmentation
# ----------------------------------------------------------------------------------------------


def _pair(tmp_path: Path, affine: np.ndarray, image: np.ndarray, label: np.ndarray) -> dict:
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "lab.nii.gz"))
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz"), "id": "case"}


def test_preprocessing_is_invertible_to_source_geometry(tmp_path: Path) -> None:
    # Non-RAS (axes along -Y, +Z, -X) with 2 mm voxels; preprocessing resamples to 1 mm RAS.
    affine = np.array(
        [[0.0, -2.0, 0.0, 10.0], [0.0, 0.0, 2.0, -20.0], [-2.0, 0.0, 0.0, 30.0], [0, 0, 0, 1.0]]
    )
    rng = np.random.default_rng(0)
    image = np.full((10, 8, 6), -1000, np.int16)
    image[1:9, 1:7, 1:5] = rng.integers(-900, 300, size=(8, 6, 4))
    label = np.zeros((10, 8, 6), np.uint8)
    label[2:6, 2:5, 1:4] = 1
    label[7:9, 5:7, 3:5] = 2
    record = _pair(tmp_path, affine, image, label)
    pre = Preprocess(modality="ct", orientation="RAS", spacing=(1.0, 1.0, 1.0), crop_foreground=True)
    transform = build_preprocessing(pre, with_label=True, spatial_dims=3, num_classes=3)
    out = transform(record)
    assert out["label"].dtype == torch.long
    assert out["image"].shape == out["label"].shape and out["image"].shape[0] == 1
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    ras = out["image"].affine.numpy()
    np.testing.assert_allclose(np.abs(np.diag(ras)[:3]), [1.0, 1.0, 1.0], atol=1e-6)
    assert np.all(np.diag(ras)[:3] > 0)  # RAS: axes point right, anterior, superior

    out["pred"] = out["label"].clone()
    back = Invertd("pred", transform=transform, orig_keys="label", nearest_interp=True)(out)["pred"]
    assert tuple(back.shape) == (1, 10, 8, 6)
    np.testing.assert_array_equal(back[0].numpy().round().astype(np.uint8), label)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-5)
    inv_image = Invertd("image", transform=transform, orig_keys="image", nearest_interp=True)(dict(out))[
        "image"
    ]
    expected = np.clip((image.astype(np.float32) + 1000.0) / 1400.0, 0.0, 1.0)
    np.testing.assert_allclose(inv_image[0].numpy(), expected, atol=1e-5)


def test_preprocessing_surfaces_data_errors(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = np.zeros((6, 6, 4), np.float32)
    image[2, 2, 2] = np.nan
    record = _pair(tmp_path, affine, image, np.zeros((6, 6, 4), np.uint8))
    transform = build_preprocessing(Preprocess(), with_label=True, spatial_dims=3, num_classes=2)
    with pytest.raises(DataError, match="NaN/inf voxels"):
        transform(record)

    record = _pair(tmp_path, affine, np.zeros((6, 6, 4), np.int16), np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(DataError, match=r"\(6, 6, 3\).*\(6, 6, 4\)") as err:
        transform(record)
    assert "lab.nii.gz" in str(err.value) and "img.nii.gz" in str(err.value)

    label = np.zeros((6, 6, 4), np.uint8)
    label[0, 0, 0] = 5
    record = _pair(tmp_path, affine, np.zeros((6, 6, 4), np.int16), label)
    with pytest.raises(DataError, match=r"label values \[5\]"):
        transform(record)


def test_2d_preprocessing_scales_images(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 255], [51, 102]], np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8)).save(tmp_path / "m.png")
    transform = build_preprocessing(Preprocess(modality="image"), with_label=True, spatial_dims=2)
    out = transform({"image": str(tmp_path / "s.png"), "label": str(tmp_path / "m.png")})
    np.testing.assert_allclose(out["image"][0].numpy(), [[0.0, 1.0], [0.2, 0.4]], atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy(), [[0, 1], [2, 0]])


def test_train_augmentation_moves_image_and_label_together() -> None:
    aug = build_train_augmentation(
        SegmentationAugment(rotate90=True, flip=True, intensity=False), spatial_dims=2
    )
    base = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8)
    seen = set()
    for seed in range(12):
        aug.set_random_state(seed=seed)
        out = aug({"image": base.clone(), "label": base.clone().long()})
        np.testing.assert_array_equal(out["image"].numpy(), out["label"].numpy())
        seen.add(tuple(out["image"].flatten()[:3].tolist()))
    assert len(seen) > 2  # it does change the samples
    aug3d = build_train_augmentation(SegmentationAugment(), spatial_dims=3, axis=2)
    vol = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    for seed in range(6):
        aug3d.set_random_state(seed=seed)
        out = aug3d({"image": vol.clone()})["image"]
        # In-plane only: the set of values in each through-plane slice is unchanged.
        for z in range(3):
            assert sorted(out[..., z].flatten().tolist()) == sorted(vol[..., z].flatten().tolist())


def test_zoom_and_rotation_move_image_and_label_together() -> None:
    aug = build_train_augmentation(
        SegmentationAugment(rotate90=False, flip=False, scale=0.2, rotate_degrees=20), spatial_dims=2
    )
    image = torch.zeros(1, 16, 20)  # not square: small-angle rotation keeps the slice size
    image[:, 4:12, 5:15] = 1.0
    label = (image > 0).to(torch.uint8)
    changed = 0
    for seed in range(16):
        aug.set_random_state(seed=seed)
        out = aug({"image": image.clone(), "label": label.clone()})
        assert out["image"].shape == image.shape and out["label"].dtype == torch.uint8
        assert set(torch.unique(out["label"]).tolist()) <= {0, 1}
        # Bilinear image and nearest label may differ only along the rectangle's edge.
        assert ((out["image"] > 0.5).to(torch.uint8) != out["label"]).sum() <= 4
        changed += int(not torch.equal(out["label"], label))
    assert 3 <= changed <= 13  # applied to about half the samples
    assert set(aug({"image": image.clone()})) == {"image"}  # unlabelled samples pass


def test_zoom_keeps_round_things_round_and_stays_in_its_range() -> None:
    aug = build_train_augmentation(SegmentationAugment(rotate90=False, flip=False, scale=0.3), spatial_dims=2)
    yy, xx = np.mgrid[:96, :96]
    disk = torch.tensor((((yy - 48) ** 2 + (xx - 48) ** 2) <= 20**2)[None].astype(np.float32))
    sizes = []
    for seed in range(40):
        aug.set_random_state(seed=seed)
        mask = aug({"image": disk.clone()})["image"][0].numpy() > 0.5
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert abs(height - width) <= 1  # one magnification for both axes: no stretching
        sizes.append(height / 41)
    # Magnified by 0.7-1.3 as documented (MONAI's own scale would give 1 / 1.3 to 1 / 0.7).
    assert 0.68 <= min(sizes) < 0.95 and 1.05 < max(sizes) <= 1.32


def test_zoom_and_rotation_stay_in_plane_in_3d() -> None:
    aug = build_train_augmentation(
        SegmentationAugment(rotate90=False, flip=False, scale=0.2, rotate_degrees=30), spatial_dims=3, axis=2
    )
    vol = torch.zeros(1, 12, 12, 5)
    for z in range(5):
        vol[..., z] = z + 1.0  # each through-plane slice has its own value
    moved = 0
    for seed in range(8):
        aug.set_random_state(seed=seed)
        out = aug({"image": vol.clone()})["image"]
        # Nothing crosses between slices: the middle of each slice keeps its value.
        np.testing.assert_allclose(out[0, 4:8, 4:8, :].numpy(), vol[0, 4:8, 4:8, :].numpy(), atol=1e-5)
        moved += int(not torch.equal(out, vol))
    assert moved > 0


def test_zoom_and_rotation_are_off_by_default() -> None:
    assert not build_train_augmentation(
        SegmentationAugment(rotate90=False, flip=False), spatial_dims=2
    ).transforms


# ----------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# ----------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_covid_semiseg_and_lidc_layouts(shared_data: Path) -> None:
    covid = shared_data / "covid_semiseg"
    labelled, unlabelled, _ = load_records(covid / "train")
    assert len(labelled) == 50 and unlabelled == []
    label = read_label(labelled[0]["label"], ["background", "ggo", "consolidation"])
    assert label.array.shape == read_study(labelled[0]["image"]).array.shape
    _, unl, _ = load_records(covid / "unlabeled")
    assert len(unl) == 1600
    assert len({r["patient_id"] for r in unl}) == 20  # Data-1_<case>_<slice>: 20 CT volumes

    image = shared_data / "lidc_voi" / "images" / "LIDC-IDRI-0001_R_1.nii.gz"
    study = read_study(image)
    mask = read_label(shared_data / "lidc_voi" / "masks" / image.name, ["background", "nodule"])
    np.testing.assert_array_equal(mask.affine, study.affine)
    assert study.array.min() < -500 and mask.array.max() == 1  # HU values and a nodule


def test_folds_validate_on_each_patient_once_and_keep_the_test_patients(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path, n_patients=10, per_patient=3)
    cfg = SegmentationData(path=str(table), val_fraction=0.2, test_fraction=0.2, folds=4, labeled_count=3)
    lists = [build_datalist(cfg.model_copy(update={"fold": f}), seed=1) for f in range(4)]
    test = {r["id"] for r in lists[0].test}
    assert len({r["patient_id"] for r in lists[0].test}) == 2
    validated = []
    for dl in lists:
        assert {r["id"] for r in dl.test} == test
        val_patients = {r["patient_id"] for r in dl.val}
        assert val_patients and not val_patients & {r["patient_id"] for r in dl.train + dl.unlabeled}
        # val_fraction is not used: the 8 non-test patients are cut into 4 folds of 2.
        assert len(val_patients) == 2
        assert len(dl.train) == 3 and dl.demoted == len(dl.unlabeled) == 18 - 3
        validated += [r["id"] for r in dl.val]
    assert len(validated) == len(set(validated)) == 24


def test_fold_settings_are_checked() -> None:
    for fields, message in (
        ({"folds": 1}, "folds=1 is no cross-validation"),
        ({"fold": 2}, "fold=2 needs folds"),
        ({"folds": 3, "fold": 3}, "fold=3 must be one of 0 to 2"),
    ):
        with pytest.raises(ValueError, match=message):
            SegmentationData(path="x", **fields)


def test_a_long_list_of_labelled_cases_is_cut_short_in_the_log(tmp_path: Path, caplog) -> None:
    table = _csv_dataset(tmp_path, n_patients=15, per_patient=2)
    cfg = SegmentationData(path=str(table), val_fraction=0.2, test_fraction=0.0)
    with caplog.at_level("DEBUG", logger="fewlabel.data.segmentation"):
        dl = build_datalist(cfg, seed=0)
    listed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("labelled training cases")]
    assert len(dl.train) == 24
    assert listed == [listed[0]] and listed[0].endswith("and 4 more (all of them with fewlabel -v train ...)")
    full = [
        r.getMessage() for r in caplog.records if r.levelname == "DEBUG" and "all labelled" in r.getMessage()
    ]
    assert full and all(r["id"] in full[0] for r in dl.train)
