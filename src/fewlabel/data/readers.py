"""Reading and writing image volumes with their geometry: NIfTI, DICOM series and 2D slices.

Every reader returns a :class:`Study`: a ``float32`` array with its voxel-to-world affine (RAS+
millimetres, the nibabel convention). 3D arrays are indexed ``(X, Y, Z)`` like nibabel's; 2D
slices are ``(H, W)`` (row, column, as the image is displayed) with an identity affine.

Inputs are checked on the way in and every problem becomes a :class:`~fewlabel.errors.DataError`
naming the file and what is wrong with it (truncated or mislabelled NIfTI, NaN voxels, empty
volumes, label values outside the classes, image/label mismatches, missing DICOM slices...).

DICOM headers hold patient identifiers. Nothing about the patient is read into a
:class:`Study`, an error message or a log line unless the caller asks for it with
``include_identifiers=True``.

:class:`FewLabelReader` wraps all of this as a MONAI ``ImageReader`` so that
``LoadImaged`` produces ``MetaTensor`` objects with MONAI's ``affine``/``original_affine``
metadata, which ``Invertd`` and ``SaveImage`` rely on.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from fewlabel.data.images import is_image_file, read_image, verify_image
from fewlabel.errors import DataError
from fewlabel.utils.files import atomic_write

__all__ = [
    "AFFINE_TOLERANCE",
    "FewLabelReader",
    "Study",
    "array_axis_along",
    "check_grid",
    "check_pair",
    "check_study_opens",
    "convert_dicom_to_nifti",
    "is_nifti_file",
    "is_volume_path",
    "looks_like_dicom",
    "read_dicom_series",
    "read_label",
    "read_study",
    "refuse_dicom_file",
    "write_mask",
    "write_study",
]

log = logging.getLogger(__name__)

#: Largest difference (mm) between the affines of an image and its label that is still
#: considered the same grid; float32 headers round world coordinates to ~1e-5 mm.
AFFINE_TOLERANCE = 1e-3

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Files with these suffixes are DICOM slices: if they cannot be read, the series is incomplete.
_DICOM_SUFFIXES = (".dcm", ".ima")
# MediaStorageSOPClassUID of a DICOMDIR (a directory of the media, not an image).
_MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
# A missing DICOM slice shows as a gap this many times the median slice distance.
_GAP_FACTOR = 1.5
# The volume's affine assumes slices on one straight line along the normal, equally spaced
# (SimpleITK's series reader spreads them evenly between the first and the last). Slices off
# that grid by more than these tolerances would be misplaced in world space.
_SPACING_TOLERANCE = 0.1  # fraction of the slice spacing
_SHEAR_TOLERANCE_MM = 0.1
# DICOM tags read to group and sort slices; none of them identifies the patient.
_GEOMETRY_TAGS = [
    "SOPClassUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "PixelSpacing",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
]
# Read only with include_identifiers=True.
_IDENTIFYING_TAGS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyInstanceUID",
    "AccessionNumber",
    "InstitutionName",
]


@dataclass
class Study:
    """One image (or label) volume with its geometry.

    Attributes:
        array: ``(X, Y, Z)`` for volumes, ``(H, W)`` for 2D slices; no channel axis. ``float32``
            for images, an integer type for labels.
        affine: 4x4 voxel-to-world matrix (RAS+ mm, nibabel convention); identity for 2D slices.
        path: the file (or DICOM series folder) it was read from.
        meta: non-identifying facts about the source (``format``, DICOM ``series_uid`` and
            ``modality``...); patient identifiers only when explicitly requested.
        header: the NIfTI header of the source, reused when writing masks on its grid.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    header: Any = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along each array axis (mm for volumes, 1.0 per pixel for 2D slices)."""
        nd = self.array.ndim
        cols = self.affine[:nd, :nd] if nd == 2 else self.affine[:3, :3]
        return tuple(float(v) for v in np.sqrt((cols**2).sum(axis=0)))

    @property
    def is_2d(self) -> bool:
        """Whether this is a 2D slice (no affine beyond pixel indices)."""
        return self.array.ndim == 2


# ---------------------------------------------------------------------------------------------
# Path helpers
# ---------------------------------------------------------------------------------------------


def study_name(path: str | Path) -> str:
    """The name of a study: its file name without ``.nii.gz``/``.nii`` or image suffix.

    A DICOM series folder keeps its whole name: folders are often named by series UID, whose
    dots are no suffix.

    Args:
        path: a study path.

    Returns:
        The name.
    """
    path = Path(path)
    name = path.name
    if path.is_dir():
        return name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_nifti_file(path: str | Path) -> bool:
    """Whether a path is named like a NIfTI file (``.nii`` or ``.nii.gz``, any case).

    Args:
        path: a file path.

    Returns:
        True for NIfTI names.
    """
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def is_volume_path(path: str | Path) -> bool:
    """Whether a path names a 3D study: a NIfTI file or a (DICOM series) folder.

    Args:
        path: a file or folder path.

    Returns:
        True for NIfTI files and existing folders; False for 2D image files.
    """
    return is_nifti_file(path) or Path(path).is_dir()


def _case_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_study(path: str | Path, include_identifiers: bool = False) -> Study:
    """Read an image: a NIfTI file, a DICOM series folder or a 2D image file.

    Args:
        path: ``.nii``/``.nii.gz`` file, folder holding one DICOM series, or PNG/JPEG/BMP/TIFF.
        include_identifiers: for DICOM, also put patient identifiers into ``meta["patient"]``.

    Returns:
        The study, with a ``float32`` array (2D images are converted to grey).

    Raises:
        DataError: if the path is missing, unreadable, of an unknown type, or holds NaN/inf or
            an empty volume.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        return read_dicom_series(path, include_identifiers=include_identifiers)
    if is_nifti_file(path):
        array, affine, header = _read_nifti(path, as_label=False)
        return Study(array.astype(np.float32, copy=False), affine, path, {"format": "nifti"}, header)
    if is_image_file(path):
        array = read_image(path, mode="L").astype(np.float32)
        _check_not_empty(path, array.shape)
        return Study(array, np.eye(4), path, {"format": "image"})
    if path.suffix.lower() in _DICOM_SUFFIXES or path.suffix == "":
        raise DataError(path, "looks like a single DICOM file; pass the folder that holds the whole series")
    raise DataError(
        path,
        "unsupported file type; expected .nii/.nii.gz, a DICOM series folder or a PNG/JPEG/BMP/TIFF image",
    )


def check_study_opens(path: str | Path) -> None:
    """Check that a study opens, without decoding its voxels.

    A cheap check for large pools of studies (e.g. the unlabelled studies of semi-supervised
    training) that are read in full only later: NIfTI files get the size, gzip and magic-byte
    checks of :func:`read_study` plus their header (shape, affine); DICOM folders the header
    checks of :func:`read_dicom_series` (every slice parses, one series, no missing or
    duplicated slices); 2D images :func:`~fewlabel.data.images.verify_image`. Damage inside
    the compressed voxel data of a NIfTI file, NaN voxels and undecodable DICOM pixel data are
    found only by :func:`read_study`.

    Args:
        path: a study as :func:`read_study` takes it.

    Raises:
        DataError: naming the file and the problem, as :func:`read_study` would.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        _series_slices(path, None)
    elif is_nifti_file(path):
        _check_nifti_bytes(path)
        try:
            img = nib.load(str(path))
            shape, affine = tuple(img.shape), np.asarray(img.affine, dtype=np.float64)
        except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
            raise DataError(path, f"truncated or corrupt NIfTI ({err})") from err
        _check_voxel_type(path, img)
        _check_not_empty(path, shape)
        # A broadcast scalar has the header's shape without allocating it.
        _check_not_empty(path, _squeeze_to_3d(path, np.broadcast_to(np.float32(0), shape)).shape)
        _check_affine(path, affine)
    elif is_image_file(path):
        verify_image(path)
    else:
        read_study(path)  # raises the same message as for any unsupported file


_CLASSES_FIX = "set data.classes to name every value in the masks"


def read_label(path: str | Path, classes: Sequence[str] | None, *, fix: str = _CLASSES_FIX) -> Study:
    """Read a label map and check that it holds class indices.

    Args:
        path: NIfTI file or PNG (palette or grey) mask.
        classes: class names, index = label value; ``None`` only checks that the values are
            non-negative integers.
        fix: what the message tells the user to do about values outside ``classes``
            (by default, to set ``data.classes``).

    Returns:
        The study with an integer array (``uint8`` when the values fit, else ``int32``).

    Raises:
        DataError: if the file is unreadable, values are not integers, or values fall outside
            ``range(len(classes))`` (the message lists the offending values).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "label file not found")
    if path.is_dir():
        raise DataError(path, "label must be a NIfTI or PNG file, not a folder")
    if is_nifti_file(path):
        array, affine, header = _read_nifti(path, as_label=True)
        meta = {"format": "nifti"}
    elif is_image_file(path):
        array = read_image(path, mode="P")
        _check_not_empty(path, array.shape)
        affine, header, meta = np.eye(4), None, {"format": "image"}
    else:
        raise DataError(path, "unsupported label file type; expected .nii/.nii.gz or .png")
    labels = _as_label_array(path, array, None if classes is None else len(classes), classes, fix)
    return Study(labels, affine, path, meta, header)


def _check_voxel_type(path: Path, img: Any) -> None:
    kind = img.get_data_dtype()
    if (
        kind.fields is not None
        or not np.issubdtype(kind, np.number)
        or np.issubdtype(kind, np.complexfloating)
    ):
        raise DataError(
            path, f"holds {kind} voxels (colour or complex values); expected one real value per voxel"
        )


def _read_nifti(path: Path, as_label: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read a NIfTI file, turning every failure into a DataError that says what is wrong."""
    _check_nifti_bytes(path)
    try:
        img = nib.load(str(path))
        _check_not_empty(path, tuple(img.shape))
        _check_voxel_type(path, img)
        if as_label:
            array = np.asanyarray(img.dataobj)
        else:
            array = img.get_fdata(dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
        header = img.header.copy()
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise DataError(path, f"truncated or corrupt NIfTI ({err})") from err
    array = _squeeze_to_3d(path, np.asarray(array))
    _check_not_empty(path, array.shape)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(path, f"{int(bad.sum())} NaN/inf voxels (first at index {first})")
    _check_affine(path, affine)
    return array, affine, header


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, f"invalid (singular or non-finite) affine in the NIfTI header:\n{affine}")


def _check_nifti_bytes(path: Path) -> None:
    """Check size and magic bytes so that misnamed or truncated files get a precise message."""
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes); expected a NIfTI image")
    with open(path, "rb") as fh:
        head = fh.read(4)
    compressed = path.name.lower().endswith(".gz")
    if compressed and head[:2] != b"\x1f\x8b":
        raise DataError(
            path,
            f"not gzip-compressed although named .nii.gz (first bytes {head.hex()}); wrong file or suffix",
        )
    try:
        if compressed:
            with gzip.open(path, "rb") as fh:
                head = fh.read(4)
        elif head[:2] == b"\x1f\x8b":
            raise DataError(path, "gzip-compressed although named .nii; rename it to .nii.gz")
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(path, f"truncated or corrupt NIfTI (gzip stream unreadable: {err})") from err
    if len(head) < 4:
        raise DataError(path, "truncated or corrupt NIfTI (shorter than a NIfTI header)")
    sizes = {struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]}
    if not sizes & {348, 540}:
        raise DataError(path, "not a NIfTI file (header size field is not 348 or 540: wrong magic bytes)")


def _squeeze_to_3d(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        # A single-slice NIfTI is still a volume: keep the slice axis so the affine applies.
        return array[..., None]
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(
            path,
            f"expected a 3D volume, found shape {array.shape}; multi-channel or time-series NIfTI "
            "files are not supported (store one channel per file)",
        )
    return array


def _check_not_empty(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) == 0 or min(shape) == 0:
        raise DataError(path, f"empty volume (shape {tuple(int(s) for s in shape)})")


def _as_label_array(
    path: Path,
    array: np.ndarray,
    num_classes: int | None,
    classes: Sequence[str] | None = None,
    fix: str = _CLASSES_FIX,
) -> np.ndarray:
    """Check that a label map holds class indices and return it with a compact integer type."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise DataError(path, "label map holds NaN/inf values")
        frac = array[array != np.round(array)]
        if frac.size:
            raise DataError(
                path,
                f"non-integer label values (e.g. {float(frac.flat[0]):.8g}); masks must hold class indices, "
                "resampled with nearest-neighbour interpolation",
            )
    values = np.unique(array)
    if values.size and values[0] < 0:
        raise DataError(path, f"negative label values {values[values < 0].astype(np.int64).tolist()[:10]}")
    if num_classes is not None:
        outside = values[values >= num_classes].astype(np.int64).tolist()
        if outside == [255] and num_classes <= 2:
            # An image editor's black-and-white mask, not a class numbered 255.
            fix = "this looks like a binary mask saved as 0/255 pixels; save the lesion as 1"
        if outside:
            names = f" ({', '.join(classes)})" if classes is not None else ""
            raise DataError(
                path,
                f"label values {outside[:10]} are outside the classes 0..{num_classes - 1}{names}; {fix}",
            )
    top = int(values[-1]) if values.size else 0
    if top > np.iinfo(np.int32).max:  # would wrap round in the int32 cast below
        raise DataError(path, f"label value {top} is too large to be a class index")
    return array.astype(np.uint8 if top <= 255 else np.int32)


def array_axis_along(affine: np.ndarray, world_axis: int) -> int | None:
    """The array axis that an affine maps closest to a world axis.

    Args:
        affine: voxel-to-world (RAS) matrix.
        world_axis: 0 (left-right), 1 (posterior-anterior) or 2 (inferior-superior).

    Returns:
        The array axis, or ``None`` when no axis is closest to it (a degenerate affine).
    """
    import nibabel as nib

    source = nib.orientations.io_orientation(affine)
    return next((a for a in range(len(source)) if int(source[a][0]) == world_axis), None)


def check_pair(image: Study, label: Study, atol: float = AFFINE_TOLERANCE) -> None:
    """Check that a label lies on the same voxel grid as its image.

    Args:
        image: the image study.
        label: its label map.
        atol: largest allowed difference between the affines, in mm.

    Raises:
        DataError: naming both files, with both shapes and spacings, if the shapes differ or the
            affines differ by more than ``atol``.
    """
    check_grid(image.path, image.array.shape, image.affine, label.path, label.array.shape, label.affine, atol)


def check_grid(
    image_path: Any,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_path: Any,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    atol: float = AFFINE_TOLERANCE,
) -> None:
    """Check that two voxel grids (shape and affine) are the same.

    Args:
        image_path: name of the image, for the message.
        image_shape: its spatial shape.
        image_affine: its 4x4 affine.
        label_path: name of the label, for the message.
        label_shape: its spatial shape.
        label_affine: its 4x4 affine.
        atol: largest allowed affine difference in mm.

    Raises:
        DataError: naming both files, shapes and spacings, on a mismatch.
    """
    image_shape = tuple(int(s) for s in image_shape)
    label_shape = tuple(int(s) for s in label_shape)
    image_affine = np.asarray(image_affine, dtype=np.float64)
    label_affine = np.asarray(label_affine, dtype=np.float64)

    def spacing(affine: np.ndarray, nd: int) -> str:
        cols = affine[:nd, :nd] if nd == 2 else affine[:3, :3]
        return "x".join(f"{v:.4g}" for v in np.sqrt((cols**2).sum(axis=0)))

    if image_shape != label_shape:
        # A 2D pair whose sides are swapped is the mark of an EXIF orientation tag applied by
        # the tool that saved one of the two files and not by the one that saved the other.
        transposed = len(image_shape) == 2 and label_shape == image_shape[::-1]
        raise DataError(
            label_path,
            f"label shape {label_shape} (spacing {spacing(label_affine, len(label_shape))} mm) does not match "
            f"image {image_path} shape {image_shape} (spacing {spacing(image_affine, len(image_shape))} mm)"
            + (
                "; the sides are swapped: if one of the files was saved by a tool that turned it by "
                "its EXIF orientation tag, save it again unturned"
                if transposed
                else ""
            ),
        )
    diff = float(np.abs(image_affine - label_affine).max())
    if diff > atol:
        raise DataError(
            label_path,
            f"label affine differs from that of image {image_path} by up to {diff:.4g} mm "
            f"(tolerance {atol:g} mm); the mask is not on the image's voxel grid\n"
            f"image affine:\n{np.array2string(image_affine, precision=4)}\n"
            f"label affine:\n{np.array2string(label_affine, precision=4)}",
        )


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


@dataclass
class _DicomSlice:
    path: Path
    series_uid: str
    description: str
    modality: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    instance: int | None
    # (Rows, Columns, row spacing, column spacing): one value for a whole volume.
    grid: tuple = ()


def looks_like_dicom(path: str | Path) -> bool:
    """Whether a file claims to be DICOM: a DICOM suffix, the ``DICM`` magic, or a raw dataset.

    Args:
        path: a file path.

    Returns:
        True for ``.dcm``/``.ima`` names, for files with the DICOM magic at offset 128 (scanners
        often write slices without a suffix) and for files that start like a DICOM dataset
        without the 128-byte preamble and magic (as older scanners and PACS exports write
        them); False otherwise, and for files that cannot be opened.
    """
    path = Path(path)
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or _starts_like_raw_dataset(head)


def _starts_like_raw_dataset(head: bytes) -> bool:
    """Whether bytes begin with a little-endian DICOM element of group 0002 or 0008.

    A dataset written without preamble starts with its lowest tag, which for any image lies in
    the file meta (0002) or identification (0008) group, as SOPClassUID (0008,0016) is
    mandatory. Text and image files do not start with these bytes.
    """
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR: a two-letter value representation
        return True
    # Implicit VR: a 4-byte length, short for the identification elements that come first.
    return struct.unpack("<I", head[4:8])[0] < 0x10000


def _read_dicom_header(path: Path, tags: list[str]) -> Any:
    """Read the given tags of a DICOM file's header, also from a file without preamble.

    Without the 128-byte preamble and ``DICM`` magic pydicom refuses a file unless forced. A
    forced read parses any bytes, so it is tried only on files that start like a dataset, and
    its result counts only if it is a plausible series object (a SeriesInstanceUID, and Rows or
    a non-image modality).

    Raises:
        Exception: whatever pydicom raises for the file read normally (``InvalidDicomError``
            when the forced read is not plausible either).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        ds = _read_raw_dataset(path, tags)
        if ds is None:
            raise
        return ds


def _read_raw_dataset(path: Path, tags: list[str]) -> Any | None:
    """A forced read of a file without preamble, or None unless it is a plausible series object."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            if not _starts_like_raw_dataset(fh.read(8)):
                return None
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=[*tags, "SeriesInstanceUID", "Rows", "Modality"],
            force=True,
        )
        plausible = bool(getattr(ds, "SeriesInstanceUID", "")) and (
            getattr(ds, "Rows", None) is not None
            or str(getattr(ds, "Modality", "") or "") in _NON_IMAGE_MODALITIES
        )
    except Exception:  # a forced read of arbitrary bytes may fail in any way
        return None
    return ds if plausible else None


def refuse_dicom_file(path: str | Path) -> None:
    """Refuse one DICOM file given where its series is expected, pointing at its folder.

    One slice is not a volume, and a series is read from the folder that holds its slices.

    Args:
        path: a file given as a study.

    Raises:
        DataError: if ``path`` is a DICOM file (see :func:`looks_like_dicom`).
    """
    path = Path(path)
    if looks_like_dicom(path):
        raise DataError(
            path, f"is one DICOM file; give the folder that holds the series' slices ({path.parent})"
        )


#: DICOM modalities of objects that are not image slices of a study.
_NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "SR", "PR", "KO", "REG"}
)
#: Attributes only image objects carry at the top level; a file holding one is meant as a slice.
_IMAGE_PLANE_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
#: Longest piece of a malformed header value quoted in an error message.
_QUOTED_VALUE_CHARS = 40


def _is_image_object(ds: Any) -> bool:
    """Whether a DICOM dataset is meant as an image slice, judged without ``Rows`` or pixels.

    A header cut short keeps its first elements only, so this looks at what precedes
    ``Rows``: an image storage SOP class (CT, MR, PET, secondary capture...; their registered
    names all end in "Image Storage", those of contours, reports, segmentations and
    presentation states do not) or image plane attributes.
    """
    from pydicom.uid import UID

    for sop_class in (
        getattr(ds, "SOPClassUID", None),
        getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None),
    ):
        if sop_class and "Image Storage" in UID(str(sop_class)).name:
            return True
    # Presence only: the values are checked (and malformed ones reported) for slices that parse.
    return any(tag in ds for tag in _IMAGE_PLANE_TAGS)


def _malformed(path: Path, keyword: str, value: Any, why: str) -> DataError:
    text = str(value)
    if len(text) > _QUOTED_VALUE_CHARS:
        text = text[:_QUOTED_VALUE_CHARS] + "..."
    return DataError(
        path,
        f"malformed {keyword} value {text!r} ({why}); correct it in the file's header, or move the "
        "file out of the series folder",
    )


def _header_value(ds: Any, path: Path, keyword: str) -> Any:
    """A header attribute's value, ``None`` when absent or empty.

    Raises:
        DataError: naming the file, if pydicom cannot convert the stored value.
    """
    try:
        value = getattr(ds, keyword, None)
    except Exception as err:  # pydicom converts values on access and raises what the VR's class does
        raise DataError(path, f"malformed {keyword} value ({type(err).__name__})") from err
    return None if value is None or value == "" else value


def _numbers(ds: Any, path: Path, keyword: str, count: int) -> np.ndarray | None:
    """A header attribute of ``count`` finite numbers (None when absent).

    Raises:
        DataError: naming the file, if the value is no list of ``count`` finite numbers.
    """
    from pydicom.multival import MultiValue

    value = _header_value(ds, path, keyword)
    if value is None:
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    text = "\\".join(map(str, items))  # as the header stores a multi-valued attribute
    try:
        numbers = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise _malformed(path, keyword, text, "not a number") from err
    if numbers.size != count:
        raise _malformed(path, keyword, text, f"{numbers.size} numbers, expected {count}")
    if not np.all(np.isfinite(numbers)):
        raise _malformed(path, keyword, text, "not finite")
    return numbers


def _integer(ds: Any, path: Path, keyword: str) -> int | None:
    """An integer header attribute (None when absent).

    Raises:
        DataError: naming the file, if the value is no integer.
    """
    value = _header_value(ds, path, keyword)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise _malformed(path, keyword, value, "not a number") from err
    if not number.is_integer():
        raise _malformed(path, keyword, value, "not an integer")
    return int(number)


def _scan_dicom_folder(folder: Path) -> dict[str, list[_DicomSlice]]:
    """Group the DICOM files under a folder by SeriesInstanceUID (headers only, no pixels).

    Files that do not claim to be DICOM (no ``.dcm``/``.ima`` suffix, no ``DICM`` magic) and
    do not parse are skipped: series folders often hold notes or thumbnails. A file that does
    claim to be DICOM but cannot be parsed, or parses without a SeriesInstanceUID (pydicom
    reads a file cut inside its header as a shorter dataset without complaint), is an error:
    skipping it would silently drop a slice, which the gap check cannot see at either end of
    the series. So is an image object (an image storage SOP class, or image plane attributes)
    without ``Rows``: its header was cut before them. Objects that are no image slices
    (contours, reports, segmentations and presentation states, or no image attributes at all)
    are skipped; multi-frame and MONOCHROME1 files, and malformed geometry values, are refused.

    Raises:
        DataError: naming the first unreadable, multi-frame, MONOCHROME1 or malformed DICOM file.
    """
    series: dict[str, list[_DicomSlice]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR" or path.name.startswith("."):
            continue
        claims_dicom = looks_like_dicom(path)
        try:
            ds = _read_dicom_header(path, _GEOMETRY_TAGS)
        except Exception as err:  # pydicom raises many types (struct.error, KeyError...) on damage
            if claims_dicom:
                # Only the exception type: pydicom messages may quote header bytes.
                raise DataError(
                    path,
                    f"unreadable DICOM file (truncated or corrupt: {type(err).__name__}); replace it with an "
                    "intact copy, or move it out of the series folder",
                ) from err
            log.debug("%s: skipped, not a DICOM file", path)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
            if claims_dicom and sop_class != _MEDIA_DIRECTORY_SOP_CLASS:
                raise DataError(
                    path,
                    "unreadable DICOM file (no SeriesInstanceUID: truncated or corrupt header); replace it "
                    "with an intact copy, or move it out of the series folder",
                )
            log.debug("%s: skipped, a DICOM file without a series (a directory record)", path)
            continue
        modality = str(getattr(ds, "Modality", "") or "")
        if modality in _NON_IMAGE_MODALITIES:
            # Contours, reports, segmentations and presentation states often sit beside the
            # images they belong to; they are no slices of a series.
            log.debug("%s: skipped, a DICOM %s object, not an image slice", path, modality)
            continue
        if getattr(ds, "Rows", None) is None:
            if _is_image_object(ds):
                # pydicom reads a header cut before Rows without complaint; skipping the file
                # would drop a slice unseen at either end of the series.
                raise DataError(
                    path,
                    "unreadable DICOM file (truncated or corrupt header: an image without Rows); replace it "
                    "with an intact copy, or move it out of the series folder",
                )
            log.debug("%s: skipped, a DICOM %s object, not an image slice", path, modality or "non-image")
            continue
        frames = _integer(ds, path, "NumberOfFrames")
        if frames is not None and frames > 1:
            raise DataError(
                path,
                f"is a multi-frame DICOM file ({frames} frames in one file, as enhanced CT/MR write "
                "them), which fewlabel does not read; convert it to NIfTI (e.g. with dcm2niix) and use that",
            )
        if str(getattr(ds, "PhotometricInterpretation", "") or "").upper() == "MONOCHROME1":
            # GDCM, under SimpleITK, inverts MONOCHROME1 pixels before the rescale, so a CT
            # series would come out in wrong Hounsfield units (air near -2300 instead of -1000).
            raise DataError(
                path,
                "is stored as MONOCHROME1 (inverted grey scale), which fewlabel's reader would turn into "
                "wrong intensities; convert the series to NIfTI with a converter that keeps the stored "
                "values (e.g. dcm2niix) and use that",
            )
        try:
            instance = _integer(ds, path, "InstanceNumber")
        except DataError:
            # Slices are ordered by position, never by InstanceNumber: a malformed one harms nothing.
            log.debug("%s: malformed InstanceNumber ignored", path)
            instance = None
        spacing = _numbers(ds, path, "PixelSpacing", 2)
        series.setdefault(uid, []).append(
            _DicomSlice(
                path=path,
                series_uid=uid,
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                modality=modality,
                position=_numbers(ds, path, "ImagePositionPatient", 3),
                orientation=_numbers(ds, path, "ImageOrientationPatient", 6),
                instance=instance,
                grid=(
                    getattr(ds, "Rows", None),
                    getattr(ds, "Columns", None),
                    *(() if spacing is None else (round(float(v), 6) for v in spacing)),
                ),
            )
        )
    return series


def _series_slices(folder: Path, series_uid: str | None) -> tuple[str, list[_DicomSlice]]:
    """Choose the series of a folder and return its UID and its slices, sorted and checked (headers only)."""
    series = _scan_dicom_folder(folder)
    if not series:
        raise DataError(folder, "no DICOM files with a SeriesInstanceUID found in this folder")
    if series_uid is None:
        if len(series) > 1:
            raise DataError(
                folder,
                f"holds {len(series)} DICOM series; convert the one you want with `fewlabel convert "
                f"FOLDER OUTPUT.nii.gz --series UID` (series_uid=... in Python) and use the NIfTI file, "
                f"or give each series its own folder:\n{_describe_series(series)}",
            )
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise DataError(
            folder, f"no series with SeriesInstanceUID {series_uid}; found:\n{_describe_series(series)}"
        )
    slices, _ = _sort_slices(folder, series[series_uid])
    return series_uid, slices


def _describe_series(series: dict[str, list[_DicomSlice]]) -> str:
    lines = []
    for uid, slices in sorted(series.items()):
        desc = slices[0].description or "no description"
        lines.append(f"  {uid}  ({slices[0].modality or '?'}, {desc!r}, {len(slices)} files)")
    return "\n".join(lines)


def _slice_name(folder: Path, path: Path) -> str:
    """A slice file's path relative to its series folder (its whole path if outside it)."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _sort_slices(folder: Path, slices: list[_DicomSlice]) -> tuple[list[_DicomSlice], float | None]:
    """Sort slices along the slice normal and reject duplicated or missing slices.

    Slices are named by their path inside ``folder``: a series read recursively may hold
    ``IM0001`` in several subfolders.

    Returns:
        The sorted slices and the median slice distance (None for a single slice).
    """

    def name(s: _DicomSlice) -> str:
        return _slice_name(folder, s.path)

    missing = [name(s) for s in slices if s.position is None or s.orientation is None]
    if missing:
        raise DataError(
            folder,
            f"{len(missing)} DICOM file(s) lack ImagePositionPatient/ImageOrientationPatient "
            f"(e.g. {missing[0]}); cannot order the slices",
        )
    ori = slices[0].orientation
    if any(np.abs(s.orientation - ori).max() > 1e-3 for s in slices):
        raise DataError(folder, "slices of the series have different ImageOrientationPatient; not one volume")
    odd = next((s for s in slices if s.grid != slices[0].grid), None)
    if odd is not None:
        raise DataError(
            folder,
            f"slices of the series differ in size or pixel spacing ({name(slices[0])}: rows, columns, "
            f"spacing {slices[0].grid}; {name(odd)}: {odd.grid}); not one volume",
        )
    normal = np.cross(ori[:3], ori[3:])
    dist = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    dist = dist[order]
    if len(slices) == 1:
        return slices, None
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-4)
    if dup.size:
        i = int(dup[0])
        raise DataError(
            folder,
            f"{dup.size} duplicated slice position(s) (e.g. {name(slices[i])} and {name(slices[i + 1])} "
            f"both at {dist[i]:.3f} mm along the slice normal); the series mixes acquisitions",
        )
    median = float(np.median(gaps))
    big = np.flatnonzero(gaps > _GAP_FACTOR * median)
    if big.size:
        i = int(big[0])
        raise DataError(
            folder,
            f"missing slice(s): gap of {gaps[i]:.3f} mm between slice {i} ({name(slices[i])}, "
            f"{dist[i]:.3f} mm) and slice {i + 1} ({name(slices[i + 1])}, {dist[i + 1]:.3f} mm) "
            f"along the slice normal, where the median spacing is {median:.3f} mm",
        )
    step = (dist[-1] - dist[0]) / (len(dist) - 1)
    off_grid = np.abs(dist - (dist[0] + step * np.arange(len(dist))))
    worst = int(np.argmax(off_grid))
    if off_grid[worst] > _SPACING_TOLERANCE * step:
        raise DataError(
            folder,
            f"irregular slice spacing: slice {worst} ({name(slices[worst])}) lies "
            f"{off_grid[worst]:.3f} mm from where an even spacing of {step:.3f} mm puts it (gaps from "
            f"{gaps.min():.3f} to {gaps.max():.3f} mm); one volume grid cannot hold it, so resample "
            "the series to even spacing first",
        )
    offsets = np.array([s.position - slices[0].position for s in slices])
    lateral = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    worst = int(np.argmax(lateral))
    if lateral[worst] > _SHEAR_TOLERANCE_MM:
        raise DataError(
            folder,
            f"the slices do not stack along their normal: slice {worst} ({name(slices[worst])}) is "
            f"shifted {lateral[worst]:.3f} mm within the slice plane from the first slice (a tilted "
            "gantry or a sheared series); its affine would misplace the voxels, so resample it first",
        )
    return slices, median


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None, include_identifiers: bool = False
) -> Study:
    """Read one DICOM series as a volume in Hounsfield units (for CT).

    Files are grouped by SeriesInstanceUID with pydicom (headers only), sorted by
    ImagePositionPatient along the slice normal, checked for missing or duplicated slices, and
    decoded with SimpleITK's ``ImageSeriesReader`` (which applies RescaleSlope/Intercept). The
    affine is built from ITK's direction, origin and spacing, converted from LPS to RAS.

    Args:
        folder: folder holding the series (searched recursively).
        series_uid: SeriesInstanceUID to read when the folder holds several series.
        include_identifiers: put patient identifiers (name, ID, birth date...) into
            ``meta["patient"]``; off by default so that they cannot leak into outputs or logs.

    Returns:
        The study: ``float32`` array ``(X, Y, Z)``, RAS affine, ``meta`` with ``format``,
        ``series_uid``, ``modality`` and ``num_slices``.

    Raises:
        DataError: if the folder has no DICOM series, several series and no ``series_uid`` (the
            message lists them), an unknown ``series_uid``, missing/duplicated slices, a file
            claiming to be DICOM (``.dcm``/``.ima`` suffix or ``DICM`` magic) that cannot be
            parsed, or pixel data SimpleITK cannot decode.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if folder.is_file():
        refuse_dicom_file(folder)
        raise DataError(folder, "is a file, not a DICOM series folder")
    if not folder.is_dir():
        raise DataError(folder, "DICOM series folder not found")
    series_uid, slices = _series_slices(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    # Float output: ITK otherwise picks the pixel type from the first slice, and a later
    # slice with a fractional RescaleSlope would be rounded to it.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        _raise_undecodable_slice(folder, series_uid, slices)
        # ITK messages quote file names and codec details only, never header values.
        raise DataError(folder, f"cannot decode the DICOM pixel data of series {series_uid}: {err}") from err
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
    if array.ndim == 4:
        raise DataError(folder, f"series {series_uid} holds colour/multi-component pixels; not supported")
    array = np.ascontiguousarray(np.transpose(array, (2, 1, 0))).astype(np.float32)
    _check_not_empty(folder, array.shape)
    if not np.all(np.isfinite(array)):
        raise DataError(folder, "NaN/inf voxel values after rescaling")
    affine = _itk_affine_ras(image)
    meta: dict[str, Any] = {
        "format": "dicom",
        "series_uid": series_uid,
        "modality": slices[0].modality,
        "num_slices": len(slices),
    }
    if include_identifiers:
        meta["patient"] = _read_identifiers(slices[0].path)
    return Study(array, affine, folder, meta)


def _raise_undecodable_slice(folder: Path, series_uid: str, slices: list[_DicomSlice]) -> None:
    """Name the first slice whose pixel data ITK cannot decode on its own, after the series failed.

    ITK's series reader names neither the file nor the slice that stopped it; reading the files
    one by one (only on this error path) finds the one to replace.

    Raises:
        DataError: naming the first slice file that fails to read alone; returns if all read.
    """
    import SimpleITK as sitk

    for index, s in enumerate(slices):
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")  # the IO of the series reader, so that both agree
        reader.SetFileName(str(s.path))
        try:
            reader.Execute()
        except RuntimeError as err:
            # ITK messages quote file names and codec details only, never header values.
            raise DataError(
                s.path,
                f"cannot decode the DICOM pixel data (truncated or corrupt; slice {index} of "
                f"{len(slices)} of series {series_uid} in {folder}); replace it with an intact copy: {err}",
            ) from err


def _itk_affine_ras(image: Any) -> np.ndarray:
    """Voxel-to-world affine of a SimpleITK image, in RAS (ITK works in LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_identifiers(path: Path) -> dict[str, str]:
    ds = _read_dicom_header(path, _IDENTIFYING_TAGS)
    return {tag: str(getattr(ds, tag, "") or "") for tag in _IDENTIFYING_TAGS}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _nifti_bytes(img: nib.Nifti1Image, path: Path) -> bytes:
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        # mtime=0: the same mask gives the same bytes, so outputs can be compared by checksum.
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return data


def write_mask(mask: np.ndarray, reference: Study, path: str | Path, dtype: Any = np.uint8) -> Path:
    """Write a mask on the voxel grid of the study it was predicted from (atomically).

    Volumes are written as NIfTI with the reference's affine (and, when the reference was NIfTI,
    its geometry fields: qform/sform with their codes, voxel sizes and units; none of its text
    fields or extensions); 2D references give a PNG. Reopened with
    :func:`read_label`, the mask overlays the source voxel for voxel.

    Args:
        mask: integer array with the reference's shape (``(X, Y, Z)`` or ``(H, W)``).
        reference: the study the mask belongs to.
        path: destination; ``.nii``/``.nii.gz`` for volumes, ``.png`` for 2D slices.
        dtype: integer type stored in the NIfTI file.

    Returns:
        The destination path.

    Raises:
        ValueError: if the shape differs from the reference, the suffix does not fit, or the
            values do not fit ``dtype`` (or 8 bits for PNG).
    """
    path = Path(path)
    mask = np.asarray(mask)
    if tuple(mask.shape) != tuple(reference.array.shape):
        raise ValueError(
            f"mask shape {mask.shape} differs from reference {reference.path} shape {reference.array.shape}"
        )
    if reference.is_2d:
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: masks of 2D images are written as .png")
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"{path}: PNG masks hold values 0..255, got {mask.min()}..{mask.max()}")
        from PIL import Image

        image = Image.fromarray(mask.astype(np.uint8), mode="L")
        return atomic_write(path, lambda p: image.save(p, format="PNG"))
    if not is_nifti_file(path):
        raise ValueError(f"{path}: masks of volumes are written as .nii or .nii.gz")
    info = np.iinfo(dtype)
    if mask.size and (mask.min() < info.min or mask.max() > info.max):
        raise ValueError(f"{path}: mask values {mask.min()}..{mask.max()} do not fit {np.dtype(dtype).name}")
    return write_on_grid(mask.astype(dtype), reference, path, "fewlabel mask")


def write_on_grid(array: np.ndarray, reference: Study, path: Path, description: str) -> Path:
    """Write ``array`` as NIfTI on the grid of a volume, with only its geometry (atomically).

    Masks and probability maps share this, so both carry the same qform, sform, codes, voxel
    sizes and units as the source (for a DICOM series, those of ``fewlabel convert``'s file).

    Args:
        array: ``(X, Y, Z)`` or ``(X, Y, Z, K)`` values, stored in their own dtype, unscaled.
        reference: the volume the array belongs to.
        path: destination, ``.nii`` or ``.nii.gz``.
        description: the header's ``descrip``.

    Returns:
        The destination path.
    """
    header = _geometry_header(reference.header)
    img = nib.Nifti1Image(array, reference.affine, header=header)
    img.set_data_dtype(array.dtype)
    hdr = img.header
    hdr.set_slope_inter(1.0, 0.0)  # stored as is, never rescaled
    hdr["descrip"] = description.encode()
    if header is None:  # a DICOM series: the geometry fields of `fewlabel convert`'s NIfTI file
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
        hdr.set_xyzt_units("mm")
    return atomic_write(path, lambda p: p.write_bytes(_nifti_bytes(img, path)))


# Header fields that place the voxels in space (with their codes and units); nothing else of a
# source header reaches a mask.
_GEOMETRY_FIELDS = (
    "pixdim",
    "xyzt_units",
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
)


def _geometry_header(source: Any) -> nib.Nifti1Header | None:
    """A fresh NIfTI-1 header carrying only the geometry of ``source`` (``None`` stays ``None``).

    Text fields (``descrip``, ``aux_file``, ``intent_name``, ``db_name``) and header extensions
    can hold anything the source's writer put there, identifiers included, so they are not
    copied; qform and sform are copied verbatim (with their codes) so that the mask's affine
    is the source's to the bit (for NIfTI-2 sources, to float32 precision: the mask is NIfTI-1).
    """
    if source is None:
        return None
    header = nib.Nifti1Header()
    for key in _GEOMETRY_FIELDS:
        header[key] = source[key]
    return header


def write_study(study: Study, path: str | Path, dtype: Any = None) -> Path:
    """Write an image study as NIfTI (atomically).

    Args:
        study: a 3D study.
        path: ``.nii`` or ``.nii.gz`` destination.
        dtype: stored type; ``None`` picks ``int16`` when every value is an integer that fits
            (CT in Hounsfield units), else ``float32``.

    Returns:
        The destination path.

    Raises:
        ValueError: for 2D studies or non-NIfTI destinations.
    """
    path = Path(path)
    if study.is_2d or not is_nifti_file(path):
        raise ValueError(f"{path}: write_study writes 3D studies to .nii/.nii.gz")
    array = study.array
    if dtype is None:
        integral = np.array_equal(array, np.round(array))
        fits = array.size == 0 or (array.min() >= -32768 and array.max() <= 32767)
        dtype = np.int16 if integral and fits else np.float32
    img = nib.Nifti1Image(array.astype(dtype), study.affine)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(study.affine, code=1)
    img.set_sform(study.affine, code=1)
    img.header.set_xyzt_units("mm")
    return atomic_write(path, lambda p: p.write_bytes(_nifti_bytes(img, path)))


def convert_dicom_to_nifti(
    dicom_dir: str | Path, output: str | Path, series_uid: str | None = None, overwrite: bool = False
) -> Path:
    """Convert one DICOM series to a NIfTI file without patient identifiers.

    Args:
        dicom_dir: folder holding the series.
        output: destination ``.nii``/``.nii.gz``; must lie outside ``dicom_dir``.
        series_uid: series to convert when the folder holds several.
        overwrite: replace an existing ``output``.

    Returns:
        The written path.

    Raises:
        DataError: if ``output`` exists (and not ``overwrite``), lies inside ``dicom_dir``, is
            not a NIfTI name, or the series cannot be read (see :func:`read_dicom_series`).
    """
    dicom_dir, output = Path(dicom_dir), Path(output)
    if not is_nifti_file(output):
        raise DataError(output, "output must be named .nii or .nii.gz")
    if output.resolve().is_relative_to(dicom_dir.resolve()):
        raise DataError(output, f"refusing to write inside the input folder {dicom_dir}")
    if output.exists() and not overwrite:
        raise DataError(output, "exists already; pass --overwrite (overwrite=True in Python) to replace it")
    study = read_dicom_series(dicom_dir, series_uid=series_uid)
    path = write_study(study, output)
    log.info(
        "converted DICOM series %s (%d slices) to %s",
        study.meta["series_uid"],
        study.meta["num_slices"],
        path,
    )
    return path


# ---------------------------------------------------------------------------------------------
# MONAI reader
# ---------------------------------------------------------------------------------------------


class FewLabelReader(ImageReader):
    """MONAI ``ImageReader`` for NIfTI files, DICOM series folders and 2D slices, with validation.

    Unlike MONAI's built-in readers it rejects corrupt files, NaN voxels, empty volumes and
    out-of-range label values with a :class:`~fewlabel.errors.DataError`, reads DICOM series with
    the checks of :func:`read_dicom_series`, and reads 2D images as ``(H, W)`` arrays, the
    orientation in which they are displayed (MONAI's ``PILReader`` transposes them).

    Metadata follows MONAI's conventions (``affine``, ``original_affine``, ``spatial_shape``,
    ``space`` = RAS, ``original_channel_dim`` = no channel) so that ``Orientationd``,
    ``Spacingd``, ``Invertd`` and ``SaveImage`` work. Several files given together are stacked
    as channels and must share a grid.

    Args:
        label: read label maps (palette indices for PNG, integer check) instead of images.
        num_classes: with ``label``, reject values ``>= num_classes``.
        series_uid: SeriesInstanceUID to read from DICOM folders holding several series.
    """

    def __init__(
        self, label: bool = False, num_classes: int | None = None, series_uid: str | None = None
    ) -> None:
        super().__init__()
        self.label = label
        self.num_classes = num_classes
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """Whether every given path is a NIfTI file, a 2D image or a folder (DICOM series).

        Args:
            filename: a path or a sequence of paths.

        Returns:
            True when this reader can read all of them.
        """
        return all(is_nifti_file(f) or is_image_file(f) or Path(f).is_dir() for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> Study | list[Study]:
        """Read one path, or several (later stacked as channels).

        Args:
            data: a path or a sequence of paths.
            kwargs: unused; accepted for MONAI's reader interface.

        Returns:
            A :class:`Study` or a list of them.

        Raises:
            DataError: for any unreadable or invalid input.
        """
        studies = [self._read_one(Path(f)) for f in ensure_tuple(data)]
        return studies if len(studies) > 1 else studies[0]

    def _read_one(self, path: Path) -> Study:
        if self.label:
            study = read_label(path, None)
            if self.num_classes is not None:
                _as_label_array(path, study.array, self.num_classes)
            return study
        if path.is_dir():
            return read_dicom_series(path, series_uid=self.series_uid)
        return read_study(path)

    def get_data(self, img: Study | Sequence[Study]) -> tuple[np.ndarray, dict]:
        """Return the array (channels first when several studies) and MONAI metadata.

        Args:
            img: what :meth:`read` returned.

        Returns:
            ``(array, meta)``; ``meta`` holds ``affine``, ``original_affine``,
            ``spatial_shape``, ``space`` and ``original_channel_dim``.

        Raises:
            DataError: if stacked studies are not on one grid.
        """
        studies = list(img) if isinstance(img, (list, tuple)) else [img]
        first = studies[0]
        for other in studies[1:]:
            check_pair(first, other)
        affine = np.asarray(first.affine, dtype=np.float64)
        meta: dict[str, Any] = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(first.array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(studies) == 1 else 0,
            "format": first.meta.get("format"),
        }
        for key in ("series_uid", "modality"):
            if key in first.meta:
                meta[key] = first.meta[key]
        if len(studies) == 1:
            return first.array, meta
        return np.stack([s.array for s in studies], axis=0), meta
