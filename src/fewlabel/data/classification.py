"""Labelled image collections for grading: class folders, CSV tables or MedMNIST ``.npz`` files.

Loading reads every label and checks every image up front (see
:func:`fewlabel.data.images.verify_image`), so that a missing file, a corrupt image or a
misspelt label is reported with its file name before any training starts, not hours later.

A record is a dict ``{"image": path or HxWxC uint8 array, "label": int, "id": str,
"patient_id": str | None}``; records from ``.npz`` files also carry ``"split"``, the official
split they came from.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewlabel.config.classification import ClassificationData
from fewlabel.data.images import is_image_file, verify_image
from fewlabel.data.splits import split_cases
from fewlabel.errors import ConfigError, DataError

__all__ = [
    "ClassificationDataset",
    "class_counts",
    "list_images",
    "load_classification_dataset",
    "load_records",
    "same_grades",
]

log = logging.getLogger(__name__)

_NPZ_SPLITS = ("train", "val", "test")


@dataclass
class ClassificationDataset:
    """Records of a classification experiment, split for training.

    Attributes:
        classes: class names; a record's ``label`` indexes this list (grade order).
        splits: ``"train"``, ``"val"`` and ``"test"`` lists of records.
        channels: channels of every image (1 or 3) as decoded, before conversion to RGB.
        source: the folder, CSV or ``.npz`` file the records came from.
    """

    classes: list[str]
    splits: dict[str, list[dict]]
    channels: int
    source: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def class_counts(records: Sequence[dict], num_classes: int) -> list[int]:
    """Number of records of each class.

    Args:
        records: records with an integer ``label``.
        num_classes: length of the result.

    Returns:
        ``counts[c]`` = number of records labelled ``c``.
    """
    counts = Counter(int(r["label"]) for r in records)
    return [counts.get(c, 0) for c in range(num_classes)]


def _infer_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".npz":
        return "npz"
    raise DataError(
        path, "cannot infer the data format: expected a folder, a .csv or a .npz file (set data.format)"
    )


def load_records(
    path: str | Path,
    fmt: str = "auto",
    classes: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    min_classes: int = 2,
) -> tuple[list[dict], list[str]]:
    """Read all labelled records of a data source, without splitting them.

    Args:
        path: class folder root, CSV file or ``.npz`` file.
        fmt: ``"folder"``, ``"csv"``, ``"npz"`` or ``"auto"`` (from ``path``).
        classes: class names in grade order; ``None`` takes the sorted subfolder names, or for
            CSV/npz the integer grades ``"0".."max"`` (when all labels are integers) or the
            sorted label names.
        image_root: folder relative CSV image paths are relative to (default: the CSV's folder).
        min_classes: fewest classes accepted: 2 to train; 1 for a test set of a single grade.

    Returns:
        ``(records, classes)``.

    Raises:
        DataError: naming the file or folder, if the source is missing or malformed, an image
            is unreadable, a label is unknown, channel counts are mixed, or there are fewer
            than ``min_classes`` classes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "data path not found")
    fmt = _infer_format(path, fmt)
    classes = list(classes) if classes is not None else None
    if fmt == "folder":
        records, classes = _load_folder(path, classes)
    elif fmt == "csv":
        records, classes = _load_csv(path, classes, Path(image_root) if image_root else None)
    elif fmt == "npz":
        records, classes = _load_npz(path, classes)
    else:
        raise DataError(path, f"unknown data format {fmt!r} (expected folder, csv, npz or auto)")
    if len(classes) < min_classes:
        raise DataError(path, f"found {len(classes)} class(es) {classes}; classification needs at least 2")
    if not records:
        raise DataError(path, "no labelled images found")
    return records, classes


def _check_channels(records: list[dict], channels: list[int], source: Path) -> int:
    kinds: dict[int, str] = {}
    for rec, ch in zip(records, channels, strict=True):
        kinds.setdefault(ch, str(rec["image"]) if not isinstance(rec["image"], np.ndarray) else rec["id"])
    if len(kinds) > 1:
        examples = "; ".join(f"{ch}-channel: {name}" for ch, name in sorted(kinds.items()))
        raise DataError(
            source, f"images have mixed channel counts ({examples}); convert them all to grey or RGB"
        )
    return next(iter(kinds)) if kinds else 3


def _unique_ids(paths: list[Path], root: Path) -> list[str]:
    def relative(p: Path) -> Path:
        try:
            return p.relative_to(root)
        except ValueError:
            return p

    stems = Counter(p.stem for p in paths)
    # Same file name in two folders: the relative path keeps ids unique; the same name with two
    # suffixes in one folder (img0.png, img0.jpg) also needs its suffix.
    without_suffix = Counter(relative(p).with_suffix("").as_posix() for p in paths)
    ids = []
    for p in paths:
        if stems[p.stem] == 1:
            ids.append(p.stem)
        elif without_suffix[relative(p).with_suffix("").as_posix()] == 1:
            ids.append(relative(p).with_suffix("").as_posix())
        else:
            ids.append(relative(p).as_posix())
    return ids


def _load_folder(root: Path, classes: list[str] | None) -> tuple[list[dict], list[str]]:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise DataError(root, "no class subfolders found (expected <root>/<class>/*.png|jpg)")
    if classes is None:
        classes = subdirs
    else:
        missing = [c for c in classes if c not in subdirs]
        if missing:
            raise DataError(root, f"class folder(s) {missing} not found; subfolders are {subdirs}")
        extra = [d for d in subdirs if d not in classes]
        if extra:
            raise DataError(root, f"subfolder(s) {extra} are not in the class list {classes}")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        files = _images_under(root / name)
        if not files:
            raise DataError(
                root / name, f"class folder '{name}' contains no images ({', '.join(_suffix_list())})"
            )
        paths.extend(files)
        labels.extend([idx] * len(files))
    channels = [verify_image(p)[2] for p in paths]
    records = [
        {"image": str(p), "label": lab, "id": rid, "patient_id": None}
        for p, lab, rid in zip(paths, labels, _unique_ids(paths, root), strict=True)
    ]
    _check_channels(records, channels, root)
    return records, classes


def _suffix_list() -> list[str]:
    return ["png", "jpg", "jpeg", "bmp", "tif", "tiff"]


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def same_grades(classes: Sequence[str], other: Sequence[str]) -> bool:
    """Whether two class lists are the same integer grades in the same order, however spelt.

    Releases before integer grades were read by value named a float column's grades ``0.0``,
    ``1.0``...; their checkpoints still fit data now read as ``0``, ``1``...

    Args:
        classes: one class list.
        other: the other.

    Returns:
        True when both are integer grades, equal value by value.
    """
    grades = [_parse_grade(str(c)) for c in classes]
    return (
        len(classes) == len(other) and None not in grades and grades == [_parse_grade(str(c)) for c in other]
    )


def _parse_grade(text: str) -> int | None:
    """An integer label however it is spelt (``2``, ``02``, ``2.0``: a float column's export)."""
    if (value := _parse_int(text)) is not None:
        return value
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _load_csv(
    csv_path: Path, classes: list[str] | None, image_root: Path | None
) -> tuple[list[dict], list[str]]:
    if not csv_path.is_file():
        raise DataError(csv_path, "is not a file")
    base = image_root if image_root is not None else csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            for col in ("image", "label"):
                if col not in header:
                    raise DataError(csv_path, f"missing required column '{col}' (columns found: {header})")
            rows = []
            for row in reader:
                row = {
                    (k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()
                }
                if not any(row.values()):
                    continue
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as err:
        raise DataError(csv_path, f"not a UTF-8 text CSV: {err}") from err
    except csv.Error as err:
        raise DataError(csv_path, f"malformed CSV: {err}") from err
    if not rows:
        raise DataError(csv_path, "CSV has no data rows")

    for line, row in rows:
        # An empty cell (a float column's NaN, a missing grade) would otherwise become a class.
        if not row["label"]:
            raise DataError(csv_path, f"row {line}: empty label")
    raw_labels = [row["label"] for _, row in rows]
    if classes is None:
        grades = [_parse_grade(lab) for lab in raw_labels]
        if all(g is not None and g >= 0 for g in grades):
            # Integer grades: class index = grade, so ordinal metrics see the true distances.
            classes = [str(g) for g in range(max(grades) + 1)]
        elif all(g is not None for g in grades):
            classes = [str(g) for g in sorted(set(grades))]  # -1 "ungradable": numeric order
        else:
            classes = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(classes)}
    # Labels may be class indices, unless the class names are numbers themselves: with classes
    # ["1", "2", "3"] a label "0" is an error, not the first class.
    by_position = not any(_parse_int(name) is not None for name in classes)
    # Numbered classes match a label by value, so "2.0" and "02" are grade "2".
    by_grade = {g: i for i, name in enumerate(classes) if (g := _parse_int(name)) is not None}

    records: list[dict] = []
    channels: list[int] = []
    listed: dict[Path, int] = {}
    has_patient = "patient_id" in rows[0][1]
    if not has_patient:
        _warn_about_patient_column(csv_path, header)
    for line, row in rows:
        lab = row["label"]
        if lab in index:
            label = index[lab]
        elif (g := _parse_grade(lab)) is not None and g in by_grade:
            label = by_grade[g]
        elif by_position and (i := _parse_int(lab)) is not None and 0 <= i < len(classes):
            label = i
        else:
            raise DataError(csv_path, f"row {line}: label '{lab}' is not in the class list {classes}")
        if not row["image"]:
            raise DataError(csv_path, f"row {line}: empty image path")
        img_path = Path(row["image"]).expanduser()
        if not img_path.is_absolute():
            img_path = base / img_path
        if not img_path.is_file():
            raise DataError(img_path, f"image file not found (listed in {csv_path}, row {line})")
        # Twice listed, an image could be split into training and test, or carry two grades.
        # By path, not by link target: git-annex and DVC link identical images to one file.
        key = Path(os.path.abspath(img_path))
        if key in listed:
            raise DataError(
                csv_path, f"rows {listed[key]} and {line} both list {row['image']}; list each image once"
            )
        listed[key] = line
        channels.append(verify_image(img_path)[2])
        patient = row.get("patient_id") if has_patient else None
        records.append({"image": str(img_path), "label": label, "id": "", "patient_id": patient or None})
    ids = _unique_ids([Path(r["image"]) for r in records], base)
    for rec, rid in zip(records, ids, strict=True):
        rec["id"] = rid
    _check_channels(records, channels, csv_path)
    return records, classes


def _warn_about_patient_column(csv_path: Path, header: list[str]) -> None:
    """Say so when a column looks like patient ids but is not named ``patient_id``.

    Without it images are split one by one, and one patient's two eyes may land in training
    and test: silently, unless the near miss is pointed out.
    """
    near = [h for h in header if "".join(ch for ch in h.lower() if ch.isalnum()) in _PATIENT_SPELLINGS]
    if near:
        log.warning(
            "%s: column %r is not read as patient ids (the column must be named patient_id); "
            "images are split one by one, so one patient's images may land in different splits",
            csv_path,
            near[0],
        )


_PATIENT_SPELLINGS = {"patient", "patientid", "patientname", "subject", "subjectid", "pid"}


def _load_npz(npz_path: Path, classes: list[str] | None) -> tuple[list[dict], list[str]]:
    try:
        data = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(npz_path, f"not a readable .npz file: {err}") from err
    with data:
        keys = set(data.files)
        present = [s for s in _NPZ_SPLITS if f"{s}_images" in keys or f"{s}_labels" in keys]
        if not present:
            raise DataError(
                npz_path, f"missing keys train_images/train_labels (MedMNIST layout); found {sorted(keys)}"
            )
        missing = [f"{s}_{k}" for s in present for k in ("images", "labels") if f"{s}_{k}" not in keys]
        if missing:
            raise DataError(npz_path, f"missing key(s) {missing}; found {sorted(keys)}")
        arrays = {}
        for s in present:
            try:
                images, labels = data[f"{s}_images"], data[f"{s}_labels"]
            except ValueError as err:
                raise DataError(npz_path, f"cannot read {s}_images/{s}_labels: {err}") from err
            arrays[s] = _check_npz_split(npz_path, s, images, labels)

    all_labels = np.concatenate([lab for _, lab in arrays.values()])
    if classes is None:
        if all_labels.min() < 0:
            raise DataError(npz_path, f"negative label {int(all_labels.min())}")
        classes = [str(i) for i in range(int(all_labels.max()) + 1)]
    for s, (_, labels) in arrays.items():
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if bad.size:
            raise DataError(
                npz_path, f"{s}_labels holds label {int(bad[0])}, not in the class list {classes}"
            )

    records: list[dict] = []
    channel_kinds: dict[int, str] = {}
    for s, (images, labels) in arrays.items():
        channel_kinds.setdefault(images.shape[-1], f"{s}_images")
        for i in range(len(images)):
            records.append(
                {
                    "image": images[i],
                    "label": int(labels[i]),
                    "id": f"{s}_{i}",
                    "patient_id": None,
                    "split": s,
                }
            )
    if len(channel_kinds) > 1:
        examples = "; ".join(f"{ch}-channel: {name}" for ch, name in sorted(channel_kinds.items()))
        raise DataError(npz_path, f"images have mixed channel counts ({examples})")
    return records, classes


def _check_npz_split(
    path: Path, split: str, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8:
        raise DataError(path, f"{split}_images has dtype {images.dtype}; expected uint8")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(path, f"{split}_images has shape {images.shape}; expected NxHxW or NxHxWx(1|3)")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            path, f"{split}_labels has shape {labels.shape}; expected N or Nx1 (one label per image)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(path, f"{split}_labels has dtype {labels.dtype}; expected integers")
    if len(labels) != len(images):
        raise DataError(
            path, f"{split}_images has {len(images)} images but {split}_labels has {len(labels)} labels"
        )
    return images, labels.astype(np.int64)


def load_classification_dataset(cfg: ClassificationData, seed: int) -> ClassificationDataset:
    """Load, check and split the data of a classification experiment.

    ``.npz`` files with ``use_official_split`` keep their stored split. Otherwise cases are
    split with :func:`fewlabel.data.splits.split_cases` (a fraction split, or with ``folds``
    a cross-validation fold): by patient when the data has patient ids (records without one
    count as their own patient), stratified by label.

    Args:
        cfg: the ``data`` section of the experiment.
        seed: seed of the split.

    Returns:
        The split dataset.

    Raises:
        DataError: as :func:`load_records`, or if an official split is requested from an
            ``.npz`` file that lacks one of ``train``/``val``/``test``.
    """
    path = Path(cfg.path)
    records, classes = load_records(path, cfg.format, cfg.classes, cfg.image_root)
    from_npz = "split" in records[0]
    if from_npz and cfg.use_official_split:
        if cfg.folds:
            raise ConfigError(
                f"data.folds={cfg.folds}: {path} has a stored train/val/test split; set "
                "data.use_official_split=false to cross-validate on its images instead"
            )
        stored = {r["split"] for r in records}
        missing = [s for s in _NPZ_SPLITS if s not in stored]
        if missing:
            raise DataError(path, f"use_official_split is set but the file has no {missing} split")
        splits = {s: [r for r in records if r["split"] == s] for s in _NPZ_SPLITS}
    else:
        patients = [r.get("patient_id") for r in records]
        groups = None
        if any(patients):
            groups = [p if p else f"\0record:{r['id']}" for p, r in zip(patients, records, strict=True)]
        idx = split_cases(
            [r["label"] for r in records],
            groups,
            {"val": cfg.val_fraction, "test": cfg.test_fraction},
            seed,
            cfg.folds,
            cfg.fold,
        )
        splits = {s: [records[i] for i in idx[s]] for s in ("train", "val", "test")}
    if not splits["train"]:
        raise DataError(path, "no images left for training after splitting")
    first = records[0]["image"]
    channels = first.shape[-1] if isinstance(first, np.ndarray) else verify_image(first)[2]
    return ClassificationDataset(classes=classes, splits=splits, channels=int(channels), source=str(path))


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Collect the image files to predict on.

    Args:
        inputs: image files, folders (searched recursively, hidden entries skipped) and
            ``.txt`` files listing one image path per line (relative to the list's folder;
            blank lines and lines starting with ``#`` are skipped).

    Returns:
        The image paths, folders' contents sorted, in the order given, without duplicates.

    Raises:
        DataError: if an input is missing, is neither an image nor a ``.txt`` list, a listed
            path is missing, or a folder holds no images.
    """
    out: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = _images_under(item)
            if not found:
                raise DataError(item, f"folder contains no images ({', '.join(_suffix_list())})")
            out.extend(found)
        elif not item.exists():
            raise DataError(item, "input not found")
        elif item.suffix.lower() == ".txt":
            out.extend(_read_list(item))
        elif is_image_file(item):
            out.append(item)
        else:
            raise DataError(item, "not an image (png/jpg/jpeg/bmp/tif) or a .txt list of image paths")
    return list(dict.fromkeys(out))


def _read_list(list_path: Path) -> list[Path]:
    out = []
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(list_path, f"not a UTF-8 text file: {err}") from err
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        p = Path(text).expanduser()
        if not p.is_absolute():
            p = list_path.parent / p
        if not p.is_file():
            raise DataError(list_path, f"line {n}: image '{text}' not found")
        out.append(p)
    return out
