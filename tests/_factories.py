"""Tiny input files for tests: DICOM series, NIfTI volumes, images, configs, and file snapshots.

Everything here writes into a folder the test owns (``tmp_path``); nothing is downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------

DICOM_SIZE = 16
DICOM_ROW_SPACING, DICOM_COL_SPACING, DICOM_SLICE_GAP = 0.7, 0.8, 2.5
#: Patient identifiers written into every slice unless a test passes its own.
DICOM_IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "PAT-7731-XQ", "PatientBirthDate": "19610203"}


def dicom_pixels(k: int) -> np.ndarray:
    """Stored (raw) pixel values of slice ``k`` of a series written by :func:`write_dicom_series`."""
    return (np.arange(DICOM_SIZE * DICOM_SIZE).reshape(DICOM_SIZE, DICOM_SIZE) + 100 * k).astype(np.int16)


def write_dicom_series(
    folder: Path,
    n: int = 5,
    skip: tuple[int, ...] = (),
    description: str = "chest 1mm",
    series_uid: str | None = None,
    slope: float = 2.0,
    intercept: float = -1024.0,
    identifiers: dict[str, Any] | None = None,
    position: Callable[[int], list[float]] | None = None,
) -> str:
    """Write a CT series of ``n`` 16x16 slices in shuffled order, named so that file order lies.

    Args:
        folder: destination (created).
        n: slices before ``skip`` is applied.
        skip: slice indices left out (a missing slice).
        description: SeriesDescription.
        series_uid: SeriesInstanceUID (generated when ``None``).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        identifiers: patient/institution tags written into every slice (default
            :data:`DICOM_IDENTIFIERS`).
        position: ImagePositionPatient of slice ``k`` (default: a straight stack along z,
            :data:`DICOM_SLICE_GAP` apart).

    Returns:
        The SeriesInstanceUID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    study_uid = generate_uid()
    tags = DICOM_IDENTIFIERS if identifiers is None else identifiers
    ks = [k for k in range(n) if k not in skip]
    rng = np.random.default_rng(len(ks))
    for name_index, k in zip(rng.permutation(len(ks)), rng.permutation(ks), strict=True):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        for tag, value in tags.items():
            setattr(ds, tag, value)
        ds.Modality = "CT"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid
        ds.SeriesDescription = description
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = (
            position(int(k)) if position is not None else [-10.0, -20.0, 30.0 + DICOM_SLICE_GAP * int(k)]
        )
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [DICOM_ROW_SPACING, DICOM_COL_SPACING]
        ds.SliceThickness = DICOM_SLICE_GAP
        ds.Rows = ds.Columns = DICOM_SIZE
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = dicom_pixels(int(k)).tobytes()
        ds.save_as(folder / f"IM{int(name_index):04d}.dcm", enforce_file_format=True)
    return uid


# ---------------------------------------------------------------------------------------------
# NIfTI and 2D images
# ---------------------------------------------------------------------------------------------


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` as NIfTI (identity affine unless given); parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def write_image(path: Path, channels: int = 3, size: int = 16, value: int = 0) -> Path:
    """Write a small PNG/JPEG (format from the suffix) with a deterministic gradient."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if channels == 1 else (size, size, 3)
    arr = (np.arange(np.prod(shape)).reshape(shape) + value) % 256
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in sections.items():
        out.setdefault(key, {}).update(value)
    return out


def tiny_classification_config(
    data_path: Path, output_dir: Path, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A classification experiment that trains GoogLeNet from scratch on 32 px images in seconds.

    Args:
        data_path: class-folder root (or CSV/npz).
        output_dir: ``run.output_dir``.
        sections: per-section updates, e.g. ``train={"max_epochs": 2}``.

    Returns:
        The raw config mapping (write it with :func:`write_config`).
    """
    base = {
        "task": "classification",
        "run": {"output_dir": str(output_dir), "name": "run", "device": "cpu", "num_threads": 1},
        "data": {"path": str(data_path), "val_fraction": 0.25, "test_fraction": 0.25, "cache": False},
        "model": {"weights": "none", "image_size": 32, "freeze": "none"},
        "train": {
            "max_epochs": 1,
            "batch_size": 4,
            "optimizer": "adam",
            "lr_head": 1e-3,
            "lr_backbone": 1e-3,
        },
        "eval": {"gallery_size": 2},
    }
    return _merge(base, sections)


def tiny_segmentation_config(data_path: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 2D segmentation experiment with a tiny BasicUNet for 32x32 in-plane volumes.

    Args:
        data_path: dataset folder (MSD layout) or CSV.
        output_dir: ``run.output_dir``.
        sections: per-section updates, e.g. ``tcsm={"enabled": True}``.

    Returns:
        The raw config mapping (write it with :func:`write_config`).
    """
    base = {
        "task": "segmentation",
        "run": {"output_dir": str(output_dir), "name": "run", "device": "cpu", "num_threads": 1},
        "data": {"path": str(data_path), "val_fraction": 0.0, "test_fraction": 0.0, "num_workers": 0},
        "preprocess": {"modality": "ct", "orientation": "RAS"},
        "input": {"mode": "2d"},
        "model": {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]},
        "train": {"max_epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "val_every": 1},
        "eval": {"overlays": 1},
    }
    return _merge(base, sections)


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write a config mapping as YAML; parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path (folders themselves are not listed)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def checkpoint_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint dict/list, by dotted path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(checkpoint_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def history_without_timing(history: bytes) -> list[dict]:
    """Rows of a history.csv without wall-clock columns, the one thing allowed to differ between runs."""
    rows = list(csv.DictReader(io.StringIO(history.decode())))
    return [{k: v for k, v in row.items() if k not in ("seconds", "time", "duration")} for row in rows]


# ---------------------------------------------------------------------------------------------
# Scripts
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py``, which is not part of the installed package, as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, so that dataclasses and pickling inside the script resolve it.
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
