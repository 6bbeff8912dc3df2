"""DICOM series: slice order, Hounsfield units, geometry, series choice, missing slices, privacy."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _factories import DICOM_COL_SPACING as COL_SPACING
from _factories import DICOM_IDENTIFIERS
from _factories import DICOM_ROW_SPACING as ROW_SPACING
from _factories import DICOM_SIZE as SIZE
from _factories import DICOM_SLICE_GAP as SLICE_GAP
from _factories import dicom_pixels as _raw_slice
from _factories import write_dicom_series as write_series
from fewlabel.data.readers import (
    FewLabelReader,
    convert_dicom_to_nifti,
    looks_like_dicom,
    read_dicom_series,
    read_study,
)
from fewlabel.errors import DataError

PATIENT_NAME = DICOM_IDENTIFIERS["PatientName"]
PATIENT_ID = DICOM_IDENTIFIERS["PatientID"]


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


def test_each_slice_keeps_its_own_rescale_slope(tmp_path: Path) -> None:
    import pydicom

    write_series(tmp_path / "ct", slope=1.0)
    slopes = {0: 1.0, 1: 0.5, 2: 2.5, 3: 1.0, 4: 1.0}
    for path in (tmp_path / "ct").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = slopes[int(ds.InstanceNumber) - 1]
        ds.save_as(path, enforce_file_format=True)
    study = read_dicom_series(tmp_path / "ct")
    for k, slope in slopes.items():
        np.testing.assert_array_equal(study.array[:, :, k], _raw_slice(k).T * slope - 1024.0)


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


def test_dicom_files_are_told_by_suffix_or_magic(tmp_path: Path) -> None:
    write_series(tmp_path / "series", n=2)
    slice_file = sorted((tmp_path / "series").iterdir())[0]
    unnamed = tmp_path / "IM0001"  # scanners often write slices without a suffix
    unnamed.write_bytes(slice_file.read_bytes())
    (tmp_path / "notes.txt").write_text("x" * 200)
    (tmp_path / "empty.dcm").write_bytes(b"")  # claims to be DICOM by its name

    assert looks_like_dicom(slice_file) and looks_like_dicom(unnamed)
    assert looks_like_dicom(tmp_path / "empty.dcm")
    assert not looks_like_dicom(tmp_path / "notes.txt")
    assert not looks_like_dicom(tmp_path / "missing")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(DataError, match="notes.txt: is a file, not a DICOM series folder"):
        read_dicom_series(tmp_path / "empty" / "notes.txt")


def test_one_dicom_file_points_at_its_series_folder(tmp_path: Path) -> None:
    write_series(tmp_path / "series", n=3)
    one = sorted((tmp_path / "series").iterdir())[0]
    with pytest.raises(DataError, match=r"IM0000.dcm: is one DICOM file; give the folder .* \(.*series\)"):
        read_dicom_series(one)


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


def test_a_mask_of_a_series_has_the_geometry_fields_of_the_converted_series(tmp_path: Path) -> None:
    from fewlabel.data.readers import write_mask

    write_series(tmp_path / "ct")
    converted = nib.load(convert_dicom_to_nifti(tmp_path / "ct", tmp_path / "ct.nii.gz")).header
    source = read_dicom_series(tmp_path / "ct")
    mask = write_mask(np.zeros(source.array.shape, np.uint8), source, tmp_path / "mask.nii.gz")
    written = nib.load(mask).header
    for field in ("pixdim", "xyzt_units", "qform_code", "sform_code", "srow_x", "srow_y", "srow_z"):
        np.testing.assert_allclose(written[field], converted[field], atol=1e-5, err_msg=field)
    assert written.get_xyzt_units()[0] == "mm"


def test_synthetic_dicom_series_is_the_synthetic_nifti_case(tmp_path: Path) -> None:
    from fewlabel.data.synthetic_ct import make_synthetic_ct, make_synthetic_dicom

    make_synthetic_ct(tmp_path / "msd", n_labeled=1, n_unlabeled=0, shape=(20, 14, 6), seed=3)
    make_synthetic_dicom(tmp_path / "dicom", shape=(20, 14, 6), seed=3)
    nifti = read_study(tmp_path / "msd" / "imagesTr" / "synct_000.nii.gz")
    dicom = read_study(tmp_path / "dicom")
    np.testing.assert_array_equal(dicom.array, nifti.array)
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir())[0] == "S3_IM0000.dcm"

    # A second series beside the first makes the folder ambiguous, as mixed exports are.
    make_synthetic_dicom(tmp_path / "dicom", shape=(20, 14, 4), seed=4, description="scout")
    with pytest.raises(DataError, match="holds 2 DICOM series"):
        read_study(tmp_path / "dicom")
    with pytest.raises(DataError, match="S4_IM0000.dcm: exists already"):
        make_synthetic_dicom(tmp_path / "dicom", seed=4)


def test_contours_and_reports_beside_the_slices_are_skipped(tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    write_series(tmp_path / "ct")
    # An RTSTRUCT in a subfolder (its own series, no pixels) and a SEG in the series' own UID.
    for sub, modality, series_uid in (("rt", "RTSTRUCT", generate_uid()), (".", "SEG", None)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.Modality = modality
        ds.SeriesInstanceUID = (
            series_uid or pydicom.dcmread(next((tmp_path / "ct").glob("*.dcm"))).SeriesInstanceUID
        )
        if modality == "SEG":
            ds.Rows = ds.Columns = SIZE
        (tmp_path / "ct" / sub).mkdir(exist_ok=True)
        ds.save_as(tmp_path / "ct" / sub / f"{modality}.dcm", enforce_file_format=True)
    study = read_dicom_series(tmp_path / "ct")
    np.testing.assert_allclose(study.array, _expected_hu())


def test_a_multi_frame_file_is_refused_with_advice(tmp_path: Path) -> None:
    import pydicom

    write_series(tmp_path / "ct")
    first = sorted((tmp_path / "ct").glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.NumberOfFrames = 3
    ds.save_as(first)
    with pytest.raises(DataError, match=r"IM0000.dcm: is a multi-frame DICOM file \(3 frames.*dcm2niix"):
        read_dicom_series(tmp_path / "ct")


def test_a_series_folder_named_by_its_uid_keeps_the_whole_name(tmp_path: Path) -> None:
    from fewlabel.data.readers import study_name

    for name in ("1.3.6.1.4.1.9328.50.4.0001", "1.3.6.1.4.1.9328.50.4.0002"):
        write_series(tmp_path / name)
        assert study_name(tmp_path / name) == name
    assert study_name(tmp_path / "case.nii.gz") == "case"
    assert study_name(tmp_path / "slice.07.png") == "slice.07"


def test_an_inverted_grey_scale_series_is_refused_not_misread(tmp_path: Path) -> None:
    import pydicom

    write_series(tmp_path / "ct")
    for path in (tmp_path / "ct").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path)
    with pytest.raises(DataError, match=r"is stored as MONOCHROME1 .* wrong intensities"):
        read_dicom_series(tmp_path / "ct")


def _slice_at(folder: Path, k: int) -> Path:
    """The file of slice ``k`` (file names are shuffled against slice order)."""
    import pydicom

    for path in folder.glob("*.dcm"):
        if int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber) == k + 1:
            return path
    raise AssertionError(f"no slice {k} in {folder}")


def _set_raw_value(path: Path, group: int, element: int, value: bytes) -> None:
    """Replace the value of an explicit-VR little-endian text element by bytes pydicom would refuse."""
    data = path.read_bytes()
    start = data.index(struct.pack("<HH", group, element))
    length = int.from_bytes(data[start + 6 : start + 8], "little")
    value += b" " * (len(value) % 2)  # DICOM values have even length
    path.write_bytes(
        data[: start + 6] + len(value).to_bytes(2, "little") + value + data[start + 8 + length :]
    )


def test_a_slice_cut_inside_its_header_is_an_error_not_a_lost_slice(tmp_path: Path) -> None:
    from fewlabel.data.readers import check_study_opens

    write_series(tmp_path / "ct")
    top = _slice_at(tmp_path / "ct", 4)  # at the end of the series, where no gap shows it missing
    data = top.read_bytes()
    # Cut after ImageOrientationPatient (0020,0037): SeriesInstanceUID kept, Rows lost.
    start = data.index(struct.pack("<HH", 0x0020, 0x0037))
    top.write_bytes(data[: start + 8 + int.from_bytes(data[start + 6 : start + 8], "little")])
    pattern = rf"{top.name}: unreadable DICOM file \(truncated"
    with pytest.raises(DataError, match=pattern):
        read_dicom_series(tmp_path / "ct")
    with pytest.raises(DataError, match=pattern):
        check_study_opens(tmp_path / "ct")


def test_a_series_object_without_image_attributes_is_still_skipped(tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    write_series(tmp_path / "ct")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = pydicom.dcmread(next((tmp_path / "ct").glob("*.dcm"))).SeriesInstanceUID
    ds.save_as(tmp_path / "ct" / "report.dcm", enforce_file_format=True)
    np.testing.assert_allclose(read_dicom_series(tmp_path / "ct").array, _expected_hu())


@pytest.mark.parametrize(
    ("tag", "value", "problem"),
    [
        ((0x0020, 0x0032), b"-10\\-20x\\30", r"malformed ImagePositionPatient value '-10\\\\-20x\\\\30'"),
        (
            (0x0020, 0x0037),
            b"1\\0\\0\\0\\1",
            r"malformed ImageOrientationPatient value .*5 numbers, expected 6",
        ),
        ((0x0028, 0x0030), b"0.98765x\\0.8", r"malformed PixelSpacing value '0.98765x"),
        ((0x0028, 0x0008), b"na", r"malformed NumberOfFrames value 'na'"),
    ],
)
def test_a_malformed_geometry_value_names_the_file(
    tmp_path: Path, tag: tuple[int, int], value: bytes, problem: str
) -> None:
    import pydicom

    write_series(tmp_path / "ct")
    bad = _slice_at(tmp_path / "ct", 2)
    if tag == (0x0028, 0x0008):
        ds = pydicom.dcmread(bad)
        ds.NumberOfFrames = 1
        ds.save_as(bad)
    _set_raw_value(bad, *tag, value)
    with pytest.raises(DataError, match=rf"{bad.name}: {problem}") as err:
        read_dicom_series(tmp_path / "ct")
    assert err.value.path == bad


def test_a_malformed_instance_number_is_ignored_as_it_orders_nothing(tmp_path: Path) -> None:
    write_series(tmp_path / "ct")
    _set_raw_value(_slice_at(tmp_path / "ct", 2), 0x0020, 0x0013, b"A1")
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "ct").array, _expected_hu())


def test_undecodable_pixel_data_names_the_slice_file(tmp_path: Path) -> None:
    write_series(tmp_path / "ct")
    bad = _slice_at(tmp_path / "ct", 2)
    bad.write_bytes(bad.read_bytes()[:-100])  # cut inside the pixel data; the header parses
    with pytest.raises(DataError, match=r"cannot decode the DICOM pixel data .*slice 2 of 5") as err:
        read_dicom_series(tmp_path / "ct")
    assert err.value.path == bad


def test_slice_messages_give_the_path_inside_the_series_folder(tmp_path: Path) -> None:
    import shutil

    write_series(tmp_path / "ct" / "a", n=3)
    first = sorted((tmp_path / "ct" / "a").glob("*.dcm"))[0]
    (tmp_path / "ct" / "b").mkdir()
    shutil.copy(first, tmp_path / "ct" / "b" / first.name)  # the same name in another subfolder
    with pytest.raises(DataError, match=rf"e\.g\. a/{first.name} and b/{first.name} both at"):
        read_dicom_series(tmp_path / "ct")


@pytest.mark.parametrize("suffix", [".dcm", ""])
def test_slices_without_preamble_are_read(tmp_path: Path, suffix: str) -> None:
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    write_series(tmp_path / "src")
    (tmp_path / "raw").mkdir()
    for path in (tmp_path / "src").glob("*.dcm"):
        # A bare dataset in implicit VR, without preamble, DICM magic or file meta.
        ds = pydicom.dcmread(path)
        del ds.file_meta
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        (tmp_path / "raw" / (path.stem + suffix)).write_bytes(fp.getvalue())
    one = next((tmp_path / "raw").iterdir())
    assert looks_like_dicom(one) and one.read_bytes()[128:132] != b"DICM"
    study = read_dicom_series(tmp_path / "raw")
    np.testing.assert_array_equal(study.array, _expected_hu())
    np.testing.assert_allclose(study.affine, read_dicom_series(tmp_path / "src").affine)
    assert (
        read_dicom_series(tmp_path / "raw", include_identifiers=True).meta["patient"]["PatientID"]
        == PATIENT_ID
    )
