"""Tests for loading classification data (folder, CSV, npz), its checks, and synthetic fundus data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewlabel.config.classification import ClassificationData
from fewlabel.data.classification import list_images, load_classification_dataset, load_records
from fewlabel.data.images import read_image, verify_image
from fewlabel.data.synthetic_fundus import make_synthetic_fundus
from fewlabel.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _png(path: Path, channels: int = 3, size: int = 16, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if channels == 1 else (size, size, 3)
    arr = (np.arange(np.prod(shape)).reshape(shape) + value) % 256
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def _folder(root: Path, per_class: int = 3) -> Path:
    for c in ("healthy", "mild", "severe"):
        for i in range(per_class):
            _png(root / c / f"{c}_{i}.png", value=i)
    return root


# ---------------------------------------------------------------- images


def test_read_image_modes(tmp_path):
    rgb = _png(tmp_path / "rgb.png")
    grey = _png(tmp_path / "grey.png", channels=1)
    assert read_image(rgb).shape == (16, 16, 3) and read_image(rgb).dtype == np.uint8
    assert read_image(grey).shape == (16, 16)
    assert read_image(grey, mode="RGB").shape == (16, 16, 3)
    assert read_image(rgb, mode="L").shape == (16, 16)
    assert verify_image(rgb) == (16, 16, 3) and verify_image(grey) == (16, 16, 1)
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "mask.png")
    assert read_image(tmp_path / "mask.png", mode="P").tolist() == [[0, 1], [2, 1]]
    assert read_image(tmp_path / "mask.png").shape == (2, 2, 3)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_and_empty_images_name_the_file(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(full)
    half = tmp_path / f"half{suffix}"
    data = full.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    for fn in (read_image, verify_image):
        with pytest.raises(DataError, match=f"half{suffix}"):
            fn(half)
    empty = tmp_path / f"empty{suffix}"
    empty.touch()
    with pytest.raises(DataError, match="empty"):
        verify_image(empty)
    text = tmp_path / f"text{suffix}"
    text.write_text("not an image")
    with pytest.raises(DataError, match=f"text{suffix}"):
        read_image(text)
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")


# ---------------------------------------------------------------- folder


def test_folder_layout_and_split(tmp_path):
    root = _folder(tmp_path / "data", per_class=10)
    ds = load_classification_dataset(
        ClassificationData(path=str(root), val_fraction=0.2, test_fraction=0.2), seed=0
    )
    assert ds.classes == ["healthy", "mild", "severe"]
    assert ds.channels == 3
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    ids = [r["id"] for split in ds.splits.values() for r in split]
    assert len(set(ids)) == 30
    for split in ds.splits.values():
        for rec in split:
            assert Path(rec["image"]).parent.name == ds.classes[rec["label"]]
            assert rec["patient_id"] is None


def test_image_ids_stay_unique_across_folders_and_suffixes(tmp_path):
    root = tmp_path / "data"
    for name in ("healthy/eye.png", "healthy/eye.jpg", "mild/eye.png", "mild/other.png"):
        _png(root / name)
    records, _ = load_records(root)
    assert sorted(r["id"] for r in records) == ["healthy/eye.jpg", "healthy/eye.png", "mild/eye", "other"]


def test_folder_with_explicit_class_order(tmp_path):
    root = _folder(tmp_path / "data")
    records, classes = load_records(root, classes=["severe", "mild", "healthy"])
    assert classes == ["severe", "mild", "healthy"]
    assert {r["label"] for r in records if "severe" in r["id"]} == {0}
    with pytest.raises(DataError, match="moderate"):
        load_records(root, classes=["healthy", "moderate"])


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_records(tmp_path / "nowhere", fmt="folder")


def test_folder_without_class_subfolders(tmp_path):
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_records(tmp_path / "flat")


def test_empty_class_folder_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "proliferative").mkdir()
    (root / "proliferative" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="proliferative"):
        load_records(root)


def test_truncated_image_in_folder_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    bad = root / "mild" / "broken.png"
    data = _png(tmp_path / "whole.png", size=64).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="broken.png"):
        load_records(root)


def test_mixed_channel_counts_name_both_kinds(tmp_path):
    root = _folder(tmp_path / "data")
    _png(root / "mild" / "grey_one.png", channels=1)
    with pytest.raises(DataError, match="mixed channel") as info:
        load_records(root)
    assert "grey_one.png" in str(info.value)
    assert "healthy_0.png" in str(info.value)


def test_single_class_is_refused(tmp_path):
    _png(tmp_path / "data" / "only" / "a.png")
    with pytest.raises(DataError, match="at least 2"):
        load_records(tmp_path / "data")


# ---------------------------------------------------------------- csv


def _csv(tmp_path: Path, text: str) -> Path:
    for name in ("a", "b", "c", "d"):
        _png(tmp_path / "img" / f"{name}.png")
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_csv_names_and_integer_labels(tmp_path):
    path = _csv(
        tmp_path, "image,label,patient_id\nimg/a.png,0,p1\nimg/b.png,2,p1\nimg/c.png,1,p2\nimg/d.png,2,\n"
    )
    records, classes = load_records(path)
    assert classes == ["0", "1", "2"]
    assert [r["label"] for r in records] == [0, 2, 1, 2]
    assert [r["patient_id"] for r in records] == ["p1", "p1", "p2", None]
    assert records[0]["id"] == "a" and Path(records[0]["image"]).is_file()

    named = _csv(tmp_path, "image,label\nimg/a.png,mild\nimg/b.png,severe\nimg/c.png,2\n")
    records, classes = load_records(named, classes=["none", "mild", "severe"])
    assert [r["label"] for r in records] == [1, 2, 2]

    # Numbered classes are names, not positions: "0" is not the first of ["1", "2", "3"].
    numbered = _csv(tmp_path, "image,label\nimg/a.png,1\nimg/b.png,3\nimg/c.png,0\n")
    with pytest.raises(DataError, match="row 4: label '0' is not in the class list"):
        load_records(numbered, classes=["1", "2", "3"])


def test_csv_integer_grades_however_spelt_are_one_class(tmp_path):
    # A float column exported by pandas writes 2.0; a hand-edited table may write 02.
    path = _csv(tmp_path, "image,label\nimg/a.png,0.0\nimg/b.png,2\nimg/c.png,02\nimg/d.png,1.0\n")
    records, classes = load_records(path)
    assert classes == ["0", "1", "2"]
    assert [r["label"] for r in records] == [0, 2, 2, 1]
    records, _ = load_records(path, classes=["0", "1", "2"])
    assert [r["label"] for r in records] == [0, 2, 2, 1]
    # A negative code among integer grades sorts by value, not as text ("10" before "2").
    rows = "".join(f"img/{n}.png,{g}\n" for n, g in zip("abcd", (-1, 0, 2, 10), strict=True))
    _, classes = load_records(_csv(tmp_path, "image,label\n" + rows))
    assert classes == ["-1", "0", "2", "10"]


def test_grades_spelt_as_floats_by_earlier_releases_are_the_same_grades():
    from fewlabel.data.classification import same_grades

    assert same_grades(["0.0", "1.0", "2.0"], ["0", "1", "2"])
    assert not same_grades(["0.0", "1.0", "10.0", "2.0"], ["0", "1", "2", "10"])  # another order
    assert not same_grades(["mild", "severe"], ["mild", "severe"]) and not same_grades(["0"], ["0", "1"])


def test_csv_empty_label_is_refused_not_made_a_class(tmp_path):
    path = _csv(tmp_path, "image,label\nimg/a.png,0.0\nimg/b.png,\nimg/c.png,1.0\n")
    with pytest.raises(DataError, match="labels.csv: row 3: empty label"):
        load_records(path)


def test_csv_image_listed_twice_is_refused(tmp_path):
    path = _csv(tmp_path, "image,label\nimg/a.png,0\nimg/b.png,1\n./img/a.png,1\n")
    with pytest.raises(DataError, match=r"rows 2 and 4 both list ./img/a.png; list each image once"):
        load_records(path)


def test_two_images_linked_to_one_file_are_not_a_repeated_row(tmp_path):
    # git-annex and DVC keep identical images as links to one stored file.
    store = _png(tmp_path / ".store" / "blank.png")
    for name in ("left.png", "right.png"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).symlink_to(store)
    table = tmp_path / "t.csv"
    table.write_text("image,label\nimg/left.png,0\nimg/right.png,1\n")
    records, _ = load_records(table)
    assert [Path(r["image"]).name for r in records] == ["left.png", "right.png"]


def test_a_patient_column_under_another_name_is_pointed_out(tmp_path, caplog):
    path = _csv(tmp_path, "image,label,PatientID\nimg/a.png,0,p1\nimg/b.png,1,p1\n")
    with caplog.at_level("WARNING"):
        records, _ = load_records(path)
    assert all(r["patient_id"] is None for r in records)
    assert (
        "column 'PatientID' is not read as patient ids (the column must be named patient_id)" in caplog.text
    )


def test_wide_grey_image_outside_8_bits_is_found_by_the_up_front_check(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((8, 8), 3000, np.uint16)).save(wide)
    narrow = tmp_path / "narrow.png"
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(narrow)
    assert Image.open(wide).mode.startswith("I")
    with pytest.raises(DataError, match=r"wide.png: .*values outside 0..255 integers \(range 3000..3000\)"):
        verify_image(wide)
    assert verify_image(narrow) == (8, 8, 1) and read_image(narrow).max() == 200


def test_csv_image_root(tmp_path):
    _png(tmp_path / "images" / "x.png")
    _png(tmp_path / "images" / "y.png")
    (tmp_path / "tables").mkdir()
    path = tmp_path / "tables" / "t.csv"
    path.write_text("image,label\nx.png,a\ny.png,b\n")
    records, classes = load_records(path, image_root=tmp_path / "images")
    assert classes == ["a", "b"] and len(records) == 2


def test_csv_unknown_label_names_file_row_and_label(tmp_path):
    path = _csv(tmp_path, "image,label\nimg/a.png,mild\nimg/b.png,sevre\n")
    with pytest.raises(DataError, match="labels.csv") as info:
        load_records(path, classes=["none", "mild", "severe"])
    assert "row 3" in str(info.value) and "sevre" in str(info.value)


def test_csv_missing_column_is_named(tmp_path):
    path = _csv(tmp_path, "path,label\nimg/a.png,0\n")
    with pytest.raises(DataError, match="labels.csv") as info:
        load_records(path)
    assert "'image'" in str(info.value)


def test_csv_missing_image_is_named(tmp_path):
    path = _csv(tmp_path, "image,label\nimg/a.png,0\nimg/zzz.png,1\n")
    with pytest.raises(DataError, match="zzz.png"):
        load_records(path)


def test_csv_split_keeps_patients_together(tmp_path):
    csv_path = make_synthetic_fundus(tmp_path / "syn", n_per_class=8, num_classes=3, size=32, layout="csv")
    ds = load_classification_dataset(ClassificationData(path=str(csv_path)), seed=0)
    patients = {s: {r["patient_id"] for r in recs} for s, recs in ds.splits.items()}
    assert all(patients[s] for s in patients)
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(v) for v in ds.splits.values()) == 24


# ---------------------------------------------------------------- npz


def _npz(path: Path, grey: bool = False) -> Path:
    rng = np.random.default_rng(0)
    shape = (28, 28) if grey else (28, 28, 3)
    arrays = {}
    for split, n in (("train", 20), ("val", 5), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(path, **arrays)
    return path


def test_npz_official_and_pooled_split(tmp_path):
    path = _npz(tmp_path / "mnist.npz")
    ds = load_classification_dataset(ClassificationData(path=str(path)), seed=0)
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [20, 5, 6]
    assert ds.classes == ["0", "1", "2"] and ds.channels == 3
    assert ds.splits["val"][0]["id"] == "val_0"
    assert ds.splits["train"][0]["image"].shape == (28, 28, 3)
    pooled = load_classification_dataset(
        ClassificationData(path=str(path), use_official_split=False, val_fraction=0.2, test_fraction=0.2),
        seed=0,
    )
    assert sum(len(v) for v in pooled.splits.values()) == 31
    assert len(pooled.splits["val"]) == 6

    grey = load_classification_dataset(
        ClassificationData(path=str(_npz(tmp_path / "grey.npz", grey=True))), seed=0
    )
    assert grey.channels == 1 and grey.splits["train"][0]["image"].shape == (28, 28, 1)


def test_folds_cross_validate_pooled_images_but_not_a_stored_split(tmp_path):
    path = _npz(tmp_path / "mnist.npz")
    with pytest.raises(
        ConfigError, match="has a stored train/val/test split; set data.use_official_split=false"
    ):
        load_classification_dataset(ClassificationData(path=str(path), folds=3), seed=0)
    cfg = ClassificationData(path=str(path), use_official_split=False, test_fraction=0.2, folds=3)
    splits = [
        load_classification_dataset(cfg.model_copy(update={"fold": f}), seed=0).splits for f in range(3)
    ]
    test = [r["id"] for r in splits[0]["test"]]
    assert len(test) == 6 and all([r["id"] for r in s["test"]] == test for s in splits)
    validated = [r["id"] for s in splits for r in s["val"]]
    assert len(validated) == len(set(validated)) == 31 - 6
    assert all(len(s["train"]) + len(s["val"]) == 25 for s in splits)


def test_npz_missing_keys_are_named(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="train_labels"):
        load_records(path)


# ---------------------------------------------------------------- predict inputs


def test_list_images(tmp_path):
    root = _folder(tmp_path / "data")
    single = _png(tmp_path / "single.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# images to grade\nsingle.png\n\ndata/mild/mild_0.png\n")
    found = list_images([root, single, listing])
    assert len(found) == 10  # 9 in the folder + single; the listed folder image is not repeated
    assert found[:3] == sorted(found[:3])
    listing.write_text("gone.png\n")
    with pytest.raises(DataError, match=r"list.txt.*gone.png"):
        list_images([listing])
    with pytest.raises(DataError, match="nothing.png"):
        list_images([tmp_path / "nothing.png"])


# ---------------------------------------------------------------- synthetic data


def test_synthetic_fundus_is_deterministic_and_graded(tmp_path):
    a = make_synthetic_fundus(tmp_path / "a", n_per_class=2, num_classes=3, size=32, seed=5)
    b = make_synthetic_fundus(tmp_path / "b", n_per_class=2, num_classes=3, size=32, seed=5)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files_a) == 6
    for rel in files_a:
        assert np.array_equal(read_image(a / rel), read_image(b / rel))
    _, classes = load_records(a)
    assert classes == ["grade_0", "grade_1", "grade_2"]
    with pytest.raises(DataError, match="already exists"):
        make_synthetic_fundus(tmp_path / "a", n_per_class=1, num_classes=3, size=32)


def test_synthetic_lesions_grow_with_grade(tmp_path):
    root = make_synthetic_fundus(tmp_path / "s", n_per_class=4, num_classes=5, size=64, seed=0)

    def lesion_pixels(grade: int) -> float:
        total = 0
        for p in (root / f"grade_{grade}").glob("*.png"):
            img = read_image(p).astype(int)
            dark_red = (img[..., 0] < 120) & (img[..., 0] > 40) & (img[..., 1] < 40)
            yellow = (img[..., 0] > 180) & (img[..., 1] > 180) & (img[..., 2] < 140)
            total += int(dark_red.sum() + yellow.sum())
        return total

    counts = [lesion_pixels(g) for g in range(5)]
    assert counts[0] < counts[2] < counts[4], counts


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_retinamnist_official_split():
    path = SHARED_DATA / "retinamnist" / "retinamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    ds = load_classification_dataset(ClassificationData(path=str(path)), seed=0)
    assert ds.classes == ["0", "1", "2", "3", "4"]
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [1080, 120, 400]
    assert ds.channels == 3
