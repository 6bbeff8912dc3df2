"""DICOM series: slice order, Hounsfield units, geometry, series choice, missing slices, privacy."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fewlabel.data.readers import FewLabelReader, convert_dicom_to_nifti, read_dicom_series, read_study
from fewlabel.errors import DataError

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-7731-XQ"
SIZE = 16
ROW_SPACING, COL_SPACING, SLICE_GAP = 0.7, 0.8, 2.5


def _raw_slice(k: int) -> np.ndarray:
    return (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) + 100 * k).astype(np.int16)


def write_series(
    folder: Path,
    n: int = 5,
    skip: tuple[int, ...] = (),
    description: str = "chest 1mm",
    series_uid: str | None = None,
    slope: float = 2.0,
    intercept: float = -1024.0,
) -> str:
    """Write a CT series of ``n`` 16x16 slices in shuffled order, named so that file order lies."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    study_uid = generate_uid()
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
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = "19610203"
        ds.Modality = "CT"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid
        ds.SeriesDescription = description
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [-10.0, -20.0, 30.0 + SLICE_GAP * int(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        ds.SliceThickness = SLICE_GAP
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = _raw_slice(int(k)).tobytes()
        ds.save_as(folder / f"IM{int(name_index):04d}.dcm", enforce_file_format=True)
    return uid


def _expected_hu(n: int = 5) -> np.ndarray:
    # DICOM pixel rows run along Y and columns along X; the Study is indexed (X, Y, Z).
    stack = np.stack([_raw_slice(k) for k in range(n)]).astype(np.float32) * 2.0 - 1024.0  # (Z, Y, X)
    return np.transpose(stack, (2, 1, 0))


def _assert_no_identifiers(text: str) -> None:
    for secret in (PATIENT_NAME, "Doe", "Jane", PATIENT_ID, "19610203"):
        assert secret not in text


def test_series_in_hounsfield_units_with_geometry(tmp_path: Path) -> None:
    uid = write_series(tmp_path / "ct")
    (tmp_path / "ct" / "README.txt").write_text("not a DICOM file")  # ignored
    study = read_dicom_series(tmp_path / "ct")
    np.testing.assert_array_equal(study.array, _expected_hu())
    assert study.array.dtype == np.float32
    np.testing.assert_allclose(study.spacing, (COL_SPACING, ROW_SPACING, SLICE_GAP), atol=1e-6)
    # ITK's LPS origin (-10, -20, 30) becomes RAS (10, 20, 30); x and y axes flip sign.
    expected = np.array(
        [[-COL_SPACING, 0, 0, 10.0], [0, -ROW_SPACING, 0, 20.0], [0, 0, SLICE_GAP, 30.0], [0, 0, 0, 1]]
    )
    np.testing.assert_allclose(study.affine, expected, atol=1e-6)
    assert study.meta["series_uid"] == uid and study.meta["num_slices"] == 5
    assert read_study(tmp_path / "ct").array.shape == (SIZE, SIZE, 5)


def test_several_series_need_a_choice(tmp_path: Path) -> None:
    uid_a = write_series(tmp_path / "mixed", description="lung kernel")
    uid_b = write_series(tmp_path / "mixed" / "sub", n=3, description="soft tissue")
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path / "mixed")
    msg = str(err.value)
    assert uid_a in msg and uid_b in msg
    assert "series_uid" in msg and "lung kernel" in msg and "3 files" in msg
    _assert_no_identifiers(msg)
    assert read_dicom_series(tmp_path / "mixed", series_uid=uid_b).array.shape == (SIZE, SIZE, 3)
    assert read_dicom_series(tmp_path / "mixed", series_uid=uid_a).array.shape == (SIZE, SIZE, 5)
    with pytest.raises(DataError, match="no series with SeriesInstanceUID 1.2.3"):
        read_dicom_series(tmp_path / "mixed", series_uid="1.2.3")


def test_missing_slice_is_an_error(tmp_path: Path) -> None:
    write_series(tmp_path / "gap", n=6, skip=(3,))
    with pytest.raises(DataError, match="missing slice") as err:
        read_dicom_series(tmp_path / "gap")
    msg = str(err.value)
    assert str(tmp_path / "gap") in msg
    assert "between slice 2" in msg and "5.000 mm" in msg  # positions 35 and 40 along the normal
    _assert_no_identifiers(msg)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(tmp_path / "empty")


def test_identifiers_stay_out_unless_requested(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "ct")
    caplog.set_level(logging.DEBUG)
    study = read_dicom_series(tmp_path / "ct")
    _assert_no_identifiers(repr(study.meta) + repr(study) + caplog.text)
    reader = FewLabelReader()
    _, meta = reader.get_data(reader.read(str(tmp_path / "ct")))
    _assert_no_identifiers(repr(meta))
    out = convert_dicom_to_nifti(tmp_path / "ct", tmp_path / "out" / "ct.nii.gz")
    _assert_no_identifiers(out.name + caplog.text + repr(dict(nib.load(str(out)).header)))

    opted = read_dicom_series(tmp_path / "ct", include_identifiers=True)
    assert opted.meta["patient"]["PatientID"] == PATIENT_ID
    assert opted.meta["patient"]["PatientName"] == PATIENT_NAME


def test_convert_to_nifti_writes_readable_file_and_refuses_overwrite(tmp_path: Path) -> None:
    write_series(tmp_path / "ct")
    out = convert_dicom_to_nifti(tmp_path / "ct", tmp_path / "nifti" / "ct.nii.gz")
    study = read_study(out)
    source = read_dicom_series(tmp_path / "ct")
    np.testing.assert_array_equal(study.array, source.array)
    np.testing.assert_allclose(study.affine, source.affine, atol=1e-4)
    assert nib.load(str(out)).get_data_dtype() == np.int16  # integral HU stored compactly
    before = out.read_bytes()
    with pytest.raises(DataError, match="exists already"):
        convert_dicom_to_nifti(tmp_path / "ct", out)
    assert out.read_bytes() == before
    convert_dicom_to_nifti(tmp_path / "ct", out, overwrite=True)
    with pytest.raises(DataError, match="inside the input folder"):
        convert_dicom_to_nifti(tmp_path / "ct", tmp_path / "ct" / "x.nii.gz")
