"""Segmentation datalists: which studies are labelled training, unlabelled, validation and test cases.

Three dataset layouts are read (:func:`load_records`):

- ``msd``: Medical Segmentation Decathlon / nnU-Net folders: ``dataset.json`` (``labels``
  map in MSD style ``{"0": "background", "1": "tumour"}`` or nnU-Net v2 style
  ``{"background": 0, "tumour": 1}``), ``imagesTr/`` + ``labelsTr/`` listed in ``training`` or
  named ``<case>_0000.nii.gz`` / ``<case>.nii.gz`` (nnU-Net v2), an optional ``unlabeled`` list;
- ``csv``: a table with columns ``image,label,patient_id`` (empty label = unlabelled);
- ``slices2d``: ``images/`` + ``masks/`` folders with masks named like their images
  (e.g. ``covid_semiseg/train``); NIfTI pairs in the same layout are read too.

:func:`build_datalist` splits the labelled cases by patient into train/validation/test, then
keeps labels on a seeded, patient-wise subset of the training cases (``labeled_count`` or
``labeled_fraction``) and moves the rest to the unlabelled pool used by TCSM.

A record is ``{"image": str, "label": str | None, "id": str, "patient_id": str}``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewlabel.config.segmentation import SegmentationData
from fewlabel.data.images import is_image_file
from fewlabel.data.readers import is_nifti_file, study_name
from fewlabel.data.splits import split_cases
from fewlabel.errors import ConfigError, DataError
from fewlabel.utils.files import atomic_write_text
from fewlabel.utils.text import short_list

__all__ = [
    "DEFAULT_CLASSES",
    "SegmentationDatalist",
    "build_datalist",
    "detect_format",
    "list_studies",
    "load_records",
    "msd_test_records",
    "patient_id_from_name",
]

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ["background", "lesion"]
_LISTED_CASES = 20  # labelled training cases named in the log at INFO level

# File names that encode a patient (case) and a slice or lesion number; the patient part groups
# the files so that one patient never lands in two splits.
_PATIENT_PATTERNS = [
    re.compile(r"^Data-\d+_(?P<case>.+)_(?P<slice>\d+)$"),  # COVID-SemiSeg: Data-1_<case>_<slice>
    re.compile(r"^(?P<case>LIDC-IDRI-\d+)(?:_.*)?$"),  # LIDC-IDRI-0001_R_1 (nodule crops)
]


@dataclass
class SegmentationDatalist:
    """The cases of a segmentation experiment.

    Attributes:
        classes: class names, index = label value.
        train: labelled training records.
        unlabeled: unlabelled training records (``label`` is ``None``).
        val: validation records (labelled).
        test: test records (labelled).
        demoted: how many of the first ``unlabeled`` records are training cases whose labels
            were set aside by ``labeled_count`` / ``labeled_fraction`` (the rest came unlabelled).
    """

    classes: list[str]
    train: list[dict] = field(default_factory=list)
    unlabeled: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    demoted: int = 0

    def summary(self) -> dict[str, int]:
        """Number of records per split.

        Returns:
            ``{"train": ..., "unlabeled": ..., "val": ..., "test": ...}``.
        """
        return {k: len(getattr(self, k)) for k in ("train", "unlabeled", "val", "test")}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy.

        Returns:
            The datalist as plain lists and dicts.
        """
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the datalist as JSON (atomically), e.g. into the run folder for reproducibility.

        Args:
            path: destination file.

        Returns:
            The destination path.
        """
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def patient_id_from_name(name: str) -> str:
    """Patient (case) id encoded in a file name, or the name itself.

    Recognises ``Data-1_<case>_<slice>`` (COVID-SemiSeg unlabelled slices) and
    ``LIDC-IDRI-<n>_...`` (LIDC nodule crops).

    Args:
        name: file stem (no suffix).

    Returns:
        The patient id.
    """
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group("case")
    return name


def _natural_key(text: str) -> list:
    # "2" sorts before "10", so listings follow slice and case numbers.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _is_study_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and (is_nifti_file(path) or is_image_file(path))


def _record(
    image: Path, label: Path | None, patient_id: str | None = None, case_id: str | None = None
) -> dict:
    case = case_id or study_name(image)
    return {
        "image": str(image),
        "label": None if label is None else str(label),
        "id": case,
        "patient_id": patient_id or patient_id_from_name(case),
    }


def detect_format(path: str | Path) -> str:
    """Guess the dataset layout of a path.

    Args:
        path: dataset folder or CSV file.

    Returns:
        ``msd``, ``csv`` or ``slices2d``.

    Raises:
        DataError: if the path is missing or matches no known layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "dataset path not found")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DataError(path, "a dataset file must be a .csv table (image,label,patient_id)")
    if (path / "dataset.json").is_file() or (path / "imagesTr").is_dir():
        return "msd"
    if (path / "images").is_dir():
        return "slices2d"
    raise DataError(
        path,
        "unknown dataset layout: expected dataset.json + imagesTr/ labelsTr/ (msd), "
        "images/ + masks/ (slices2d), or a .csv file",
    )


def load_records(
    path: str | Path, fmt: str = "auto", image_root: str | Path | None = None
) -> tuple[list[dict], list[dict], list[str] | None]:
    """Read the cases of a dataset.

    Args:
        path: dataset folder (``msd``, ``slices2d``) or CSV file.
        fmt: ``auto``, ``msd``, ``csv`` or ``slices2d``.
        image_root: folder that relative CSV paths are relative to (default: the CSV's folder).

    Returns:
        ``(labelled records, unlabelled records, classes)``; classes come from
        ``dataset.json`` and are ``None`` for other layouts. MSD test images (``imagesTs``) are
        not included: see :func:`msd_test_records`.

    Raises:
        DataError: for a missing or malformed dataset (the message names the file): missing
            files, images without masks, malformed ``dataset.json`` or CSV, duplicate ids.
        ConfigError: for an unknown ``fmt``.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    elif not path.exists():
        raise DataError(path, "dataset path not found")
    elif fmt in ("msd", "slices2d") and path.is_file():
        # The shipped CT configs pin msd; a CSV datalist given to them must say so.
        raise DataError(
            path, f"is a file, but data.format is {fmt} (a dataset folder); set data.format: csv or auto"
        )
    if fmt == "msd":
        labelled, unlabelled, classes = _load_msd(path)
    elif fmt == "csv":
        labelled, unlabelled = _load_csv(path, image_root)
        classes = None
    elif fmt == "slices2d":
        labelled, unlabelled = _load_pairs(path)
        classes = None
    else:
        raise ConfigError(f"data.format must be auto, msd, csv or slices2d, not {fmt!r}")
    _check_unique_ids(path, labelled + unlabelled)
    return labelled, unlabelled, classes


def _check_unique_ids(path: Path, records: list[dict]) -> None:
    seen: dict[str, str] = {}
    for rec in records:
        if rec["id"] in seen:
            raise DataError(
                path,
                f"two cases share the id {rec['id']!r}: {seen[rec['id']]} and {rec['image']}; rename one",
            )
        seen[rec["id"]] = rec["image"]


# ---------------------------------------------------------------------------------------------
# MSD / nnU-Net
# ---------------------------------------------------------------------------------------------


def _read_dataset_json(root: Path) -> dict:
    file = root / "dataset.json"
    if not file.is_file():
        return {}
    try:
        # utf-8-sig: editors on Windows save JSON with a byte-order mark.
        meta = json.loads(file.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(file, f"not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(file, "must hold a JSON object")
    return meta


def _classes_from_labels(file: Path, labels: Any) -> list[str] | None:
    """Class names from an MSD (``{"0": "bg"}``) or nnU-Net v2 (``{"bg": 0}``) labels map."""
    if not labels:
        return None
    if not isinstance(labels, dict):
        raise DataError(file, f"'labels' must be a mapping, not {type(labels).__name__}")
    by_index: dict[int, str] = {}
    if all(str(k).strip().isdigit() for k in labels):
        by_index = {int(k): str(v) for k, v in labels.items()}
    else:
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                raise DataError(
                    file, f"label {name!r} maps to several values {value} (nnU-Net regions); not supported"
                )
            try:
                by_index[int(value)] = str(name)
            except (TypeError, ValueError) as err:
                raise DataError(file, f"label {name!r} has a non-integer value {value!r}") from err
    indices = sorted(by_index)
    if indices != list(range(len(indices))):
        raise DataError(file, f"label values must be 0..n-1 without gaps, found {indices}")
    if len(indices) < 2:
        raise DataError(file, "the labels map needs background and at least one foreground class")
    names = [by_index[i] for i in indices]
    if names[-1].lower() == "ignore":
        # nnU-Net v2's ignore label marks unannotated voxels; trained as a class, the model would
        # learn to predict "not annotated" and be scored on it.
        raise DataError(
            file,
            f"label {indices[-1]} is nnU-Net's 'ignore' label (unannotated voxels), which fewlabel does "
            "not support; annotate those voxels, or give them a class of their own under another name",
        )
    return names


def _resolve(root: Path, entry: Any, file: Path, what: str) -> Path:
    if isinstance(entry, (list, tuple)):
        raise DataError(file, f"{what} {entry} lists several files (multi-channel); not supported")
    if not isinstance(entry, str) or not entry:
        raise DataError(file, f"{what} entry must be a path string, not {entry!r}")
    p = Path(entry)
    p = p if p.is_absolute() else root / p
    if not p.exists():
        raise DataError(p, f"listed as {what} in {file} but missing")
    return p


def _load_msd(root: Path) -> tuple[list[dict], list[dict], list[str] | None]:
    file = root / "dataset.json"
    meta = _read_dataset_json(root)
    classes = _classes_from_labels(file, meta.get("labels"))
    labelled: list[dict] = []
    training = meta.get("training")
    if training:
        if not isinstance(training, list):
            raise DataError(file, "'training' must be a list of {image, label} entries")
        for entry in training:
            if not isinstance(entry, dict) or "image" not in entry:
                raise DataError(file, f"training entry {entry!r} needs 'image' and 'label'")
            image = _resolve(root, entry["image"], file, "training image")
            label = entry.get("label")
            if not label:
                raise DataError(file, f"training entry for {entry['image']} has no label")
            label_path = _resolve(root, label, file, "training label")
            # nnU-Net v2 lists images as <case>_0000 beside labels named <case>: the case is
            # the label's name, as when imagesTr/ is scanned. The patient id keeps the image's
            # name, on which the splits of runs made before this naming were drawn.
            nnunet = study_name(image) == f"{study_name(label_path)}_0000"
            case = study_name(label_path) if nnunet else None
            patient = patient_id_from_name(study_name(image))
            labelled.append(_record(image, label_path, patient_id=patient, case_id=case))
    else:
        labelled = _scan_nnunet(root)
    unlabelled = []
    for entry in meta.get("unlabeled") or meta.get("unlabelled") or []:
        image_entry = entry.get("image") if isinstance(entry, dict) else entry
        unlabelled.append(_record(_resolve(root, image_entry, file, "unlabeled image"), None))
    if not labelled:
        raise DataError(root, "no labelled training cases (empty 'training' list and no imagesTr/ files)")
    return labelled, unlabelled, classes


def _scan_nnunet(root: Path) -> list[dict]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(root, "no 'training' list in dataset.json and no imagesTr/ folder")
    files = sorted((p for p in images_dir.iterdir() if _is_study_file(p)), key=lambda p: _natural_key(p.name))
    records = []
    channel = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
    for image in files:
        stem = study_name(image)
        suffix = image.name[len(stem) :]
        if (labels_dir / f"{stem}{suffix}").is_file():
            # <case>.nii.gz with its label of the same name, whatever digits end the name
            # (patient_0001 is a case, not channel 1 of "patient").
            records.append(_record(image, labels_dir / f"{stem}{suffix}", case_id=stem))
            continue
        match = channel.match(stem)
        if match and match.group("ch") != "0000":
            raise DataError(
                image, "multi-channel cases (_0001, ...) are not supported; keep one channel (_0000)"
            )
        case = match.group("case") if match else stem
        label = labels_dir / f"{case}{suffix}"
        if not label.is_file():
            raise DataError(image, f"no label for this image (expected {labels_dir / (case + suffix)})")
        records.append(_record(image, label, case_id=case))
    return records


def msd_test_records(root: str | Path) -> list[dict]:
    """Unlabelled test images of an MSD/nnU-Net dataset (``test`` list or ``imagesTs/``).

    Kept apart from the unlabelled training pool: training on test images, even without their
    labels, would bias the test scores.

    Args:
        root: dataset folder.

    Returns:
        Records with ``label`` ``None``.

    Raises:
        DataError: if a listed file is missing.
    """
    root = Path(root)
    file = root / "dataset.json"
    meta = _read_dataset_json(root)
    entries = meta.get("test")
    if entries:
        paths = [
            _resolve(root, e.get("image") if isinstance(e, dict) else e, file, "test image") for e in entries
        ]
    else:
        paths = list_studies(root / "imagesTs") if (root / "imagesTs").is_dir() else []
    records = []
    for p in paths:
        match = re.match(r"^(?P<case>.+)_0000$", study_name(p))
        records.append(_record(p, None, case_id=match.group("case") if match else None))
    return records


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def _load_csv(path: Path, image_root: str | Path | None) -> tuple[list[dict], list[dict]]:
    root = Path(image_root) if image_root else path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot read the CSV file ({err})") from err
    if "image" not in header:
        raise DataError(
            path, f"CSV needs an 'image' column (and optionally label, patient_id); found {header}"
        )
    labelled, unlabelled = [], []
    for line, row in enumerate(rows, start=2):
        if None in row:  # csv.DictReader's place for cells beyond the header
            raise DataError(
                path,
                f"line {line} has {len(header) + len(row[None])} fields, the header {len(header)}; "
                'quote paths that contain commas ("a,b.nii.gz")',
            )
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        if not row.get("image"):
            raise DataError(path, f"line {line}: empty image path")
        image = _csv_path(root, row["image"], path, line)
        label = _csv_path(root, row["label"], path, line) if row.get("label") else None
        rec = _record(image, label, row.get("patient_id") or None)
        (labelled if label is not None else unlabelled).append(rec)
    if not labelled and not unlabelled:
        raise DataError(path, "CSV lists no cases")
    return labelled, unlabelled


def _refuse_shared_files(training: list[dict], test: list[dict], test_path: str | Path) -> None:
    """Refuse test studies that are the very files of ``data.path``: scored where they trained."""
    seen = {Path(r["image"]).resolve() for r in training}
    shared = [r["image"] for r in test if Path(r["image"]).resolve() in seen]
    if shared:
        raise DataError(
            test_path,
            f"{len(shared)} test studies are files of data.path too (e.g. {shared[0]}); "
            "point data.test_path at held-out studies, or leave it unset for a test_fraction split",
        )


def _warn_shared_patients(labelled: list[dict], test: list[dict], test_path: str | Path) -> None:
    # Patient ids derived from file names can coincide in two folders by chance, so this warns
    # instead of refusing; when they are the same patients the test scores are optimistic.
    shared = sorted({r["patient_id"] for r in labelled} & {r["patient_id"] for r in test})
    if shared:
        log.warning(
            "%s: %d patient id(s) of the test set also label training or validation cases (%s); if "
            "they are the same patients, the test scores are optimistic: keep each patient on one side",
            test_path,
            len(shared),
            short_list(shared),
        )


def _csv_path(root: Path, text: str, csv_file: Path, line: int) -> Path:
    p = Path(text).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.exists():
        raise DataError(p, f"listed in {csv_file} (line {line}) but missing")
    return p


# ---------------------------------------------------------------------------------------------
# images/ + masks/ folders
# ---------------------------------------------------------------------------------------------


def list_studies(folder: str | Path) -> list[Path]:
    """Image files and NIfTI volumes directly inside a folder, in natural order.

    Args:
        folder: the folder.

    Returns:
        Paths of ``.png/.jpg/.jpeg/.bmp/.tif(f)/.nii/.nii.gz`` files (hidden files skipped).

    Raises:
        DataError: if the folder is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "folder not found")
    return sorted((p for p in folder.iterdir() if _is_study_file(p)), key=lambda p: _natural_key(p.name))


#: Suffixes tried, in this order after the image's own, for the mask of an image.
_MASK_SUFFIXES = (".png", ".nii.gz", ".nii", ".bmp", ".tif")


def _suffix_key(name: str, stem: str) -> str:
    # Suffixes compare case-insensitively, as list_studies accepts them; stems keep their case.
    return stem + name[len(stem) :].lower()


def _index_masks(masks: list[Path]) -> dict[str, list[Path]]:
    """Mask files by name with the suffix in lower case (``Case_01.PNG`` under ``Case_01.png``)."""
    index: dict[str, list[Path]] = {}
    for mask in masks:
        index.setdefault(_suffix_key(mask.name, study_name(mask)), []).append(mask)
    return index


def _find_mask(masks_dir: Path, masks: dict[str, list[Path]], image: Path) -> Path | None:
    """The mask of an image: its name, or its stem with a mask suffix, any case of the suffix.

    Args:
        masks_dir: the masks folder (named in errors).
        masks: its mask files, from :func:`_index_masks`.
        image: the image file.

    Returns:
        The mask, or None when there is none.

    Raises:
        DataError: naming the image, if two masks differ only in the case of their suffix
            (``Case_01.png`` and ``Case_01.PNG``): picking one would be a silent guess.
    """
    stem = study_name(image)
    for key in (_suffix_key(image.name, stem), *(stem + suffix for suffix in _MASK_SUFFIXES)):
        found = masks.get(key, [])
        if len(found) > 1:
            names = ", ".join(sorted(p.name for p in found))
            raise DataError(
                image,
                f"{len(found)} masks in {masks_dir} differ only in the case of their suffix ({names}); "
                "keep the one that belongs to this image",
            )
        if found:
            return found[0]
    return None


def _load_pairs(root: Path) -> tuple[list[dict], list[dict]]:
    images_dir, masks_dir = root / "images", root / "masks"
    images = list_studies(images_dir)
    if not images:
        raise DataError(images_dir, "no images (.png/.jpg/.nii.gz...) found")
    if not masks_dir.is_dir():
        log.info("%s has no masks/ folder: its %d images are unlabelled", root, len(images))
        return [], [_record(p, None) for p in images]
    masks = list_studies(masks_dir)
    index = _index_masks(masks)
    labelled, used = [], set()
    for image in images:
        mask = _find_mask(masks_dir, index, image)
        if mask is None:
            expected = image.name if is_nifti_file(image) else f"{study_name(image)}.png"
            raise DataError(
                image,
                f"no mask for this image in {masks_dir} (expected {expected}); add the mask, move the image "
                "out, or list the cases in a CSV (data.format: csv) where an empty label means unlabelled",
            )
        used.add(mask.name)
        labelled.append(_record(image, mask))
    orphans = [p.name for p in masks if p.name not in used]
    if orphans:
        raise DataError(
            masks_dir,
            f"{len(orphans)} mask(s) without an image in {images_dir}, e.g. {orphans[:3]}; check the names",
        )
    return labelled, []


def _load_unlabeled_path(path: Path) -> list[dict]:
    """Every study under an extra unlabelled source: a dataset (any layout) or a plain folder."""
    if path.is_file() or (path / "dataset.json").is_file() or (path / "images").is_dir():
        labelled, unlabelled, _ = load_records(path)
        return unlabelled + [{**r, "label": None} for r in labelled]
    if (path / "imagesTr").is_dir():
        files = list_studies(path / "imagesTr")
    else:
        files = list_studies(path)
    if not files:
        raise DataError(path, "no images or volumes found for data.unlabeled_path")
    return [_record(p, None) for p in files]


# ---------------------------------------------------------------------------------------------
# Splits and label selection
# ---------------------------------------------------------------------------------------------


def _select_labeled(
    train: list[dict], labeled_count: int | None, labeled_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Choose, by patient, which training cases keep their labels.

    Patients are shuffled with the seed and their cases taken in that order, so a smaller
    selection is always a subset of a larger one with the same seed (label-count experiments
    compare nested sets). ``labeled_count`` is met exactly; only the last patient taken may
    be split between labelled and unlabelled cases.
    """
    patients: dict[str, list[int]] = {}
    for i, rec in enumerate(train):
        patients.setdefault(rec["patient_id"], []).append(i)
    # The name itself breaks ties: "P1" and "P01" sort as equals, and input order would decide.
    names = sorted(patients, key=lambda name: (_natural_key(name), name))
    rng = np.random.default_rng([seed, 0x5E1EC7])
    names = [names[i] for i in rng.permutation(len(names))]
    order = [i for name in names for i in patients[name]]
    if labeled_count is not None:
        if labeled_count > len(train):
            raise ConfigError(
                f"data.labeled_count={labeled_count} but only {len(train)} labelled training cases remain "
                "after the validation/test split"
            )
        keep = set(order[:labeled_count])
    else:
        n_patients = max(1, round(labeled_fraction * len(names)))
        keep = {i for name in names[:n_patients] for i in patients[name]}
    kept = [rec for i, rec in enumerate(train) if i in keep]
    dropped = [{**rec, "label": None} for i, rec in enumerate(train) if i not in keep]
    return kept, dropped


def build_datalist(cfg: SegmentationData, seed: int) -> SegmentationDatalist:
    """Read the dataset(s) and split them into labelled/unlabelled training, validation and test.

    Labelled cases are split by patient (``fewlabel.data.splits.split_cases``) into train,
    ``val_fraction`` and, without ``test_path``, ``test_fraction``; with ``folds`` the
    validation patients are fold ``fold`` of the non-test ones instead. Of the training patients a
    seeded subset keeps its labels (``labeled_count`` cases or ``labeled_fraction`` of the
    patients); the rest join the unlabelled pool with the dataset's own unlabelled cases and
    those of ``unlabeled_path``. Unlabelled studies of validation or test patients are dropped,
    so that nothing of a held-out patient is trained on.

    Args:
        cfg: the ``data`` section of the experiment.
        seed: seed of the split and the label selection.

    Returns:
        The datalist.

    Raises:
        DataError: for missing or malformed datasets, or no labelled cases.
        ConfigError: for a ``labeled_count`` larger than the training set.
    """
    labelled, unlabelled, json_classes = load_records(cfg.path, cfg.format, cfg.image_root)
    if cfg.classes is not None:
        classes = list(cfg.classes)
        if json_classes is not None and len(json_classes) != len(classes):
            log.warning(
                "data.classes %s differs in length from dataset.json labels %s", classes, json_classes
            )
    else:
        classes = json_classes or list(DEFAULT_CLASSES)
    if not labelled:
        raise DataError(cfg.path, "no labelled cases found; supervised and TCSM training need some")

    fractions = {"val": cfg.val_fraction}
    test: list[dict] = []
    if cfg.test_path:
        test, test_unlabelled, test_classes = load_records(cfg.test_path, cfg.format, cfg.image_root)
        if test_unlabelled:
            log.warning("%s: %d test cases without labels are ignored", cfg.test_path, len(test_unlabelled))
        if not test:
            raise DataError(cfg.test_path, "test set has no labelled cases")
        if test_classes is not None and json_classes is not None and test_classes != json_classes:
            raise DataError(
                cfg.test_path, f"test labels {test_classes} differ from the training labels {json_classes}"
            )
        if cfg.test_fraction > 0:
            log.info("data.test_path is set: data.test_fraction=%s is not used", cfg.test_fraction)
    else:
        fractions["test"] = cfg.test_fraction
    if test:
        # Unlabelled studies that are test studies are dropped from the pool further on.
        _refuse_shared_files(labelled, test, cfg.test_path)
        _warn_shared_patients(labelled, test, cfg.test_path)
    parts = split_cases(None, [r["patient_id"] for r in labelled], fractions, seed, cfg.folds, cfg.fold)
    train = [labelled[i] for i in parts["train"]]
    val = [labelled[i] for i in parts.get("val", [])]
    if not cfg.test_path:
        test = [labelled[i] for i in parts.get("test", [])]
    if not train:
        raise DataError(cfg.path, f"no training cases left after the split ({len(labelled)} labelled cases)")

    kept, demoted = _select_labeled(train, cfg.labeled_count, cfg.labeled_fraction, seed)
    pool = list(unlabelled)
    if cfg.unlabeled_path:
        pool += _load_unlabeled_path(Path(cfg.unlabeled_path))
    held_out_images = {str(Path(r["image"]).resolve()) for r in val + test}
    held_out_patients = {r["patient_id"] for r in val + test}
    clean = [
        r
        for r in pool
        if str(Path(r["image"]).resolve()) not in held_out_images and r["patient_id"] not in held_out_patients
    ]
    if len(clean) < len(pool):
        log.warning(
            "dropped %d unlabelled studies that belong to validation/test images or patients",
            len(pool) - len(clean),
        )
    datalist = SegmentationDatalist(
        classes=classes, train=kept, unlabeled=demoted + clean, val=val, test=test, demoted=len(demoted)
    )
    n_patients = len({r["patient_id"] for r in kept})
    log.info(
        "datalist: %d labelled training cases (%d patients) of %d, %d unlabelled (%d demoted), %d val, %d test",
        len(kept),
        n_patients,
        len(train),
        len(datalist.unlabeled),
        len(demoted),
        len(val),
        len(test),
    )
    ids = [r["id"] for r in kept]
    # A fully labelled dataset of hundreds of cases would make this one line pages long.
    if len(ids) <= _LISTED_CASES:
        log.info("labelled training cases: %s", ", ".join(ids))
    else:
        log.info(
            "labelled training cases: %s and %d more (all of them with fewlabel -v train ...)",
            ", ".join(ids[:_LISTED_CASES]),
            len(ids) - _LISTED_CASES,
        )
        log.debug("all labelled training cases: %s", ", ".join(ids))
    return datalist
