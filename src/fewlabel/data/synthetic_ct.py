"""Small synthetic chest CT: an MSD-layout dataset and DICOM series, for tests, demos and smoke runs.

Each case is an ``int16`` volume in Hounsfield units: air outside the body (-1000 HU), an
elliptic body (~40 HU), two lungs (~-850 HU) and a few lesion blobs inside the lungs
(ground-glass opacity ~-500 HU as class 1; consolidation ~0 HU as class 2 when
``num_lesion_classes=2``), plus Gaussian noise. Volumes carry a non-identity, anisotropic
affine (0.8 x 0.8 x 2.5 mm, like a clinical chest CT) so that geometry handling is exercised.
:func:`make_synthetic_dicom` writes such a case as a DICOM CT series, as a scanner would
export it (one file per slice, unsigned pixels with a rescale to HU), to try ``convert``
and ``predict`` on DICOM without a real study.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from fewlabel.errors import DataError
from fewlabel.utils.files import atomic_write, atomic_write_text

__all__ = ["SYNTHETIC_SPACING", "make_synthetic_ct", "make_synthetic_dicom"]

SYNTHETIC_SPACING = (0.8, 0.8, 2.5)

_HU_AIR, _HU_BODY, _HU_LUNG, _HU_GGO, _HU_CONSOLIDATION = -1000.0, 40.0, -850.0, -500.0, 0.0


def _affine(shape: tuple[int, int, int]) -> np.ndarray:
    affine = np.diag([*SYNTHETIC_SPACING, 1.0])
    # Centre the volume on the world origin, as scanners roughly do.
    affine[:3, 3] = -0.5 * np.asarray(SYNTHETIC_SPACING) * (np.asarray(shape) - 1)
    return affine


def _case(
    rng: np.random.Generator, shape: tuple[int, int, int], num_lesion_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    nx, ny, nz = shape
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), np.linspace(-1, 1, nz), indexing="ij"
    )
    image = np.full(shape, _HU_AIR, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = (x / rng.uniform(0.8, 0.92)) ** 2 + (y / rng.uniform(0.6, 0.75)) ** 2 <= 1.0
    image[body] = _HU_BODY
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        cx = side * rng.uniform(0.35, 0.45)
        rx, ry, rz = rng.uniform(0.22, 0.3), rng.uniform(0.35, 0.45), rng.uniform(0.8, 1.0)
        lungs |= ((x - cx) / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2 <= 1.0
    lungs &= body
    image[lungs] = _HU_LUNG
    lung_voxels = np.argwhere(lungs)
    n_lesions = int(rng.integers(1, 4))
    for _ in range(n_lesions):
        if not len(lung_voxels):
            break
        cx, cy, cz = lung_voxels[rng.integers(len(lung_voxels))]
        radius = rng.uniform(4.0, 8.0)  # voxels in-plane
        d2 = ((np.arange(nx)[:, None, None] - cx) ** 2 + (np.arange(ny)[None, :, None] - cy) ** 2) / radius**2
        d2 = (
            d2
            + ((np.arange(nz)[None, None, :] - cz) * SYNTHETIC_SPACING[2] / SYNTHETIC_SPACING[0]) ** 2
            / radius**2
        )
        blob = (d2 <= 1.0) & lungs
        cls = 1 if num_lesion_classes == 1 else int(rng.integers(1, 3))
        image[blob] = _HU_GGO if cls == 1 else _HU_CONSOLIDATION
        label[blob] = cls
    image += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # mtime=0 keeps the gzip bytes a pure function of the seed.
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    atomic_write(path, lambda p: p.write_bytes(data))


def make_synthetic_ct(
    root: str | Path,
    n_labeled: int = 6,
    n_unlabeled: int = 4,
    shape: tuple[int, int, int] = (48, 48, 16),
    seed: int = 0,
    num_lesion_classes: int = 1,
) -> Path:
    """Write a synthetic chest CT dataset in the Medical Segmentation Decathlon layout.

    Args:
        root: destination folder (created; must not already hold a ``dataset.json``).
        n_labeled: cases with masks (``imagesTr/`` + ``labelsTr/``, listed in ``training``).
        n_unlabeled: cases without masks (``imagesUnl/``, listed in ``unlabeled``).
        shape: volume shape ``(X, Y, Z)``.
        seed: random seed; the same seed writes the same bytes.
        num_lesion_classes: 1 (lesion) or 2 (ground-glass opacity, consolidation).

    Returns:
        ``root``.

    Raises:
        ValueError: for invalid counts, shapes or class numbers.
        DataError: if ``root`` already holds a dataset.
    """
    root = Path(root)
    if num_lesion_classes not in (1, 2):
        raise ValueError("num_lesion_classes must be 1 or 2")
    if n_labeled < 1 or n_unlabeled < 0:
        raise ValueError("need n_labeled >= 1 and n_unlabeled >= 0")
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, not {shape}")
    if (root / "dataset.json").exists():
        raise DataError(root, "already holds a dataset.json; choose an empty folder")
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    affine = _affine(shape)
    training, unlabeled = [], []
    for i in range(n_labeled + n_unlabeled):
        image, label = _case(rng, shape, num_lesion_classes)
        case = f"synct_{i:03d}"
        if i < n_labeled:
            _save(image, affine, root / "imagesTr" / f"{case}.nii.gz")
            _save(label, affine, root / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            _save(image, affine, root / "imagesUnl" / f"{case}.nii.gz")
            unlabeled.append(f"./imagesUnl/{case}.nii.gz")
    labels = (
        {"0": "background", "1": "lesion"}
        if num_lesion_classes == 1
        else {
            "0": "background",
            "1": "ggo",
            "2": "consolidation",
        }
    )
    meta = {
        "name": "SyntheticChestCT",
        "description": "Synthetic chest CT with lung lesions (fewlabel test data)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": n_labeled,
        "numTest": 0,
        "training": training,
        "unlabeled": unlabeled,
        "test": [],
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=1) + "\n")
    return root


def make_synthetic_dicom(
    folder: str | Path,
    shape: tuple[int, int, int] = (32, 32, 12),
    seed: int = 0,
    description: str = "chest 1mm",
) -> str:
    """Write one synthetic chest CT case as a DICOM CT series (one file per axial slice).

    The series is the image :func:`make_synthetic_ct` would write for the same shape and
    seed (its first case), on the same grid: converted back to NIfTI it has the same voxels
    and affine. Calling it twice on one folder with different seeds gives a folder holding
    two series, as exports that mix a scan and its scout do.

    Args:
        folder: destination (created).
        shape: volume shape ``(X, Y, Z)``; ``Z`` slices are written.
        seed: random seed of the case; also names the files (``S<seed>_IM<slice>.dcm``).
        description: SeriesDescription.

    Returns:
        The SeriesInstanceUID.

    Raises:
        ValueError: for an invalid shape.
        DataError: if a file of this series exists already in ``folder``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, not {shape}")
    shape = tuple(int(s) for s in shape)
    folder = Path(folder)
    names = [folder / f"S{seed}_IM{k:04d}.dcm" for k in range(shape[2])]
    existing = [p for p in names if p.exists()]
    if existing:
        raise DataError(existing[0], "exists already; choose another folder or seed")
    image, _ = _case(np.random.default_rng(seed), shape, 1)
    affine = _affine(shape)
    # Stored pixels are HU + 1024 (unsigned), as most scanners write them.
    stored = (image.astype(np.int32) + 1024).astype(np.uint16)
    # DICOM positions are in LPS. Rows run along -L (= +R) and columns along -P (= +A), so
    # pixel (row r, column c) of slice k is voxel (c, r, k) of the RAS volume.
    origin = np.array([-affine[0, 3], -affine[1, 3], affine[2, 3]])
    uids = {"series": generate_uid(), "study": generate_uid(), "frame": generate_uid()}
    folder.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(names):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = f"SYNTHETIC-{seed}"
        ds.Modality = "CT"
        ds.StudyInstanceUID = uids["study"]
        ds.SeriesInstanceUID = uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            float(origin[0]),
            float(origin[1]),
            float(origin[2] + SYNTHETIC_SPACING[2] * k),
        ]
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        ds.PixelSpacing = [SYNTHETIC_SPACING[1], SYNTHETIC_SPACING[0]]  # between rows, between columns
        ds.SliceThickness = SYNTHETIC_SPACING[2]
        ds.Rows, ds.Columns = shape[1], shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = 1.0
        ds.RescaleIntercept = -1024.0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        atomic_write(path, lambda p, ds=ds: ds.save_as(p, enforce_file_format=True))
    return str(uids["series"])
