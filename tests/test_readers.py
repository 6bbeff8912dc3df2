"""NIfTI and 2D readers: geometry round trips, MONAI integration, and rejection of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged
from PIL import Image

from fewlabel.data.readers import (
    FewLabelReader,
    Study,
    check_pair,
    read_label,
    read_study,
    write_mask,
)
from fewlabel.errors import DataError

# Oblique-free but non-RAS: voxel axes run along -Y, +Z and -X of the world, with anisotropic spacing.
NON_RAS_AFFINE = np.array(
    [
        [0.0, -0.8, 0.0, 12.5],
        [0.0, 0.0, 2.5, -40.0],
        [-0.7, 0.0, 0.0, 33.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray = NON_RAS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, size=(10, 9, 6)).astype(np.int16)
    return _save_nifti(tmp_path / "ct.nii.gz", array), array


def test_nifti_geometry_round_trip_through_write_mask(tmp_path: Path, volume) -> None:
    path, array = volume
    study = read_study(path)
    assert study.array.dtype == np.float32
    np.testing.assert_array_equal(study.array, array.astype(np.float32))
    np.testing.assert_allclose(study.affine, NON_RAS_AFFINE, atol=1e-5)
    np.testing.assert_allclose(study.spacing, (0.7, 0.8, 2.5), atol=1e-5)

    mask = (array > 0).astype(np.uint8) + (array > 200).astype(np.uint8)
    out = write_mask(mask, study, tmp_path / "out" / "mask.nii.gz")
    reopened = read_label(out, ["background", "a", "b"])
    np.testing.assert_array_equal(reopened.array, mask)
    np.testing.assert_allclose(reopened.affine, study.affine, atol=1e-5)
    # Voxel for voxel: the same world point maps to the same index in both files.
    raw = nib.load(str(out))
    np.testing.assert_allclose(raw.affine, nib.load(str(path)).affine, atol=1e-6)
    assert raw.get_data_dtype() == np.uint8
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_write_mask_drops_intensity_scaling_of_reference(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii"))
    study = read_study(tmp_path / "scaled.nii")
    assert float(study.array.min()) == -1024.0
    mask = np.ones((4, 4, 3), np.uint8)
    out = write_mask(mask, study, tmp_path / "m.nii")
    np.testing.assert_array_equal(read_label(out, ["bg", "fg"]).array, mask)


def test_write_mask_rejects_wrong_shape(tmp_path: Path, volume) -> None:
    study = read_study(volume[0])
    with pytest.raises(ValueError, match="shape"):
        write_mask(np.zeros((3, 3, 3), np.uint8), study, tmp_path / "m.nii.gz")


def test_2d_png_round_trip(tmp_path: Path) -> None:
    grey = (np.arange(12 * 20).reshape(12, 20) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "slice.png")
    study = read_study(tmp_path / "slice.png")
    assert study.array.shape == (12, 20) and study.is_2d
    np.testing.assert_array_equal(study.array, grey)
    assert study.spacing == (1.0, 1.0)
    mask = np.zeros((12, 20), np.uint8)
    mask[2:5, 10:18] = 2
    out = write_mask(mask, study, tmp_path / "pred.png")
    np.testing.assert_array_equal(read_label(out, ["bg", "a", "b"]).array, mask)


def test_a_black_and_white_mask_gets_advice_for_binary_masks(tmp_path: Path) -> None:
    mask = np.zeros((6, 5), np.uint8)
    mask[2:4, 1:3] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    with pytest.raises(
        DataError, match="label values \\[255\\] .* binary mask saved as 0/255 pixels; save the lesion as 1"
    ):
        read_label(tmp_path / "m.png", ["background", "lesion"])
    with pytest.raises(DataError, match="set data.classes"):  # three classes: 255 may be a real value
        read_label(tmp_path / "m.png", ["background", "ggo", "consolidation"])


def test_palette_mask_reads_indices(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3] = 1
    mask[5:7, 5:7] = 2
    img = Image.fromarray(mask, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_label(tmp_path / "m.png", ["bg", "ggo", "cons"]).array, mask)


def test_one_bit_mask_reads_zero_and_one(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    Image.fromarray(mask).save(tmp_path / "m.png")  # Pillow writes a bool array as a 1-bit PNG
    assert Image.open(tmp_path / "m.png").mode == "1"
    np.testing.assert_array_equal(
        read_label(tmp_path / "m.png", ["bg", "lesion"]).array, mask.astype(np.uint8)
    )


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI probes an optional GPU codec
def test_monai_loadimaged_with_fewlabel_reader(tmp_path: Path, volume) -> None:
    path, array = volume
    out = LoadImaged("image", reader=FewLabelReader(), image_only=True)({"image": str(path)})
    image = out["image"]
    assert tuple(image.shape) == array.shape
    np.testing.assert_allclose(image.affine.numpy(), NON_RAS_AFFINE, atol=1e-5)
    np.testing.assert_allclose(image.meta["original_affine"], NON_RAS_AFFINE, atol=1e-5)
    assert image.meta["filename_or_obj"] == str(path)
    assert list(image.meta["spatial_shape"]) == list(array.shape)


def test_reader_stacks_files_as_channels(tmp_path: Path, volume) -> None:
    path, array = volume
    second = _save_nifti(tmp_path / "t2.nii.gz", (array // 2).astype(np.int16))
    reader = FewLabelReader()
    data, meta = reader.get_data(reader.read([path, second]))
    assert data.shape == (2, *array.shape)
    assert meta["original_channel_dim"] == 0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_colour_nifti_is_a_data_error(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    from fewlabel.data.readers import check_study_opens

    for read in (read_study, lambda p: read_label(p, ["background", "lesion"]), check_study_opens):
        with pytest.raises(DataError, match=r"rgb.nii.gz: holds .* voxels \(colour or complex values\)"):
            read(tmp_path / "rgb.nii.gz")


def test_a_label_value_beyond_int32_is_refused_not_wrapped(tmp_path: Path) -> None:
    from fewlabel.data.readers import _as_label_array

    huge = np.zeros((2, 2, 2), np.int64)
    huge[0, 0, 0] = 2**33  # would become 0 in int32
    with pytest.raises(DataError, match="label value 8589934592 is too large"):
        _as_label_array(tmp_path / "m.nii.gz", huge, None)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        read_study(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value)


def test_zero_size_file(tmp_path: Path) -> None:
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty file \(0 bytes\)") as err:
        read_study(tmp_path / "empty.nii.gz")
    assert "empty.nii.gz" in str(err.value)


def test_truncated_nifti_gz(tmp_path: Path, volume) -> None:
    path, _ = volume
    data = path.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt NIfTI") as err:
        read_study(bad)
    assert "truncated.nii.gz" in str(err.value)


def test_wrong_magic_bytes_not_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "fake.nii.gz"
    bad.write_text("this is a text file, not an image")
    with pytest.raises(DataError, match="not gzip-compressed") as err:
        read_study(bad)
    assert "fake.nii.gz" in str(err.value)


def test_wrong_magic_bytes_gzip_but_not_nifti(tmp_path: Path) -> None:
    bad = tmp_path / "fake.nii.gz"
    bad.write_bytes(gzip.compress(b"PK\x03\x04" + b"\x00" * 400))
    with pytest.raises(DataError, match="not a NIfTI file"):
        read_study(bad)


def test_nan_voxels(tmp_path: Path) -> None:
    array = np.zeros((5, 5, 4), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    path = _save_nifti(tmp_path / "nan.nii.gz", array)
    with pytest.raises(DataError, match="2 NaN/inf voxels") as err:
        read_study(path)
    assert "nan.nii.gz" in str(err.value)


def test_empty_volume(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "flat.nii.gz", np.zeros((5, 0, 4), np.int16))
    with pytest.raises(DataError, match=r"empty volume \(shape \(5, 0, 4\)\)"):
        read_study(path)


def test_label_values_outside_classes(tmp_path: Path) -> None:
    label = np.zeros((5, 5, 4), np.uint8)
    label[1, 1, 1] = 3
    label[2, 2, 2] = 7
    path = _save_nifti(tmp_path / "lab.nii.gz", label)
    with pytest.raises(DataError, match=r"label values \[3, 7\] are outside the classes 0\.\.1") as err:
        read_label(path, ["background", "lesion"])
    assert "lab.nii.gz" in str(err.value) and "set data.classes" in str(err.value)
    with pytest.raises(DataError, match="outside the classes.*; use other labels$"):
        read_label(path, ["background", "lesion"], fix="use other labels")
    assert read_label(path, [str(i) for i in range(8)]).array.max() == 7


def test_non_integer_label_values(tmp_path: Path) -> None:
    label = np.zeros((5, 5, 4), np.float32)
    label[1, 1, 1] = 0.5
    path = _save_nifti(tmp_path / "soft.nii.gz", label)
    with pytest.raises(DataError, match="non-integer label values"):
        read_label(path, ["background", "lesion"])
    # A value a hair off a class index is shown as it is, not rounded to a valid-looking 1.
    label[1, 1, 1] = np.float32(1.0000001)
    path = _save_nifti(tmp_path / "almost.nii.gz", label)
    with pytest.raises(DataError, match=r"e\.g\. 1\.0000001\)"):
        read_label(path, ["background", "lesion"])


def test_shape_mismatch_names_both_files_shapes_and_spacings(tmp_path: Path) -> None:
    image = Study(np.zeros((10, 9, 6), np.float32), NON_RAS_AFFINE, tmp_path / "img.nii.gz")
    label = Study(np.zeros((10, 9, 5), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0]), tmp_path / "lab.nii.gz")
    with pytest.raises(DataError) as err:
        check_pair(image, label)
    msg = str(err.value)
    for part in ("img.nii.gz", "lab.nii.gz", "(10, 9, 6)", "(10, 9, 5)", "0.7x0.8x2.5", "1x1x3"):
        assert part in msg


def test_affine_mismatch_names_both_files(tmp_path: Path) -> None:
    shifted = NON_RAS_AFFINE.copy()
    shifted[0, 3] += 5.0
    image = Study(np.zeros((4, 4, 4), np.float32), NON_RAS_AFFINE, tmp_path / "img.nii.gz")
    label = Study(np.zeros((4, 4, 4), np.uint8), shifted, tmp_path / "lab.nii.gz")
    with pytest.raises(DataError, match="affine differs") as err:
        check_pair(image, label)
    assert "img.nii.gz" in str(err.value) and "lab.nii.gz" in str(err.value)
    tiny = NON_RAS_AFFINE.copy()
    tiny[0, 3] += 1e-5
    check_pair(image, Study(label.array, tiny, label.path))  # within tolerance: no error


def test_unsupported_type_and_single_dicom_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_study(tmp_path / "notes.txt")
    (tmp_path / "IM0001.dcm").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="pass the folder"):
        read_study(tmp_path / "IM0001.dcm")


def test_an_exif_orientation_is_reported_once_and_the_stored_pixels_kept(tmp_path, caplog, monkeypatch):
    from fewlabel.data import images

    monkeypatch.setattr(images, "_exif_reported", False)
    stored = np.zeros((8, 16), dtype=np.uint8)
    stored[:4] = 255  # a bright top half, in the stored orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to display"
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(stored).save(tmp_path / name, quality=100, exif=exif)
    with caplog.at_level("WARNING", logger="fewlabel.data.images"):
        first = images.read_image(tmp_path / "a.jpg")
        images.read_image(tmp_path / "b.jpg")
    assert first.shape == (8, 16) and first[0].min() > 200 and first[-1].max() < 50
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "a.jpg: has EXIF orientation 6" in warnings[0]


def test_a_mask_with_swapped_sides_is_refused_with_a_hint(tmp_path):
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((6, 4), dtype=np.uint8)).save(tmp_path / "mask.png")
    image = read_study(tmp_path / "image.png")
    with pytest.raises(DataError, match="mask.png.*the sides are swapped"):
        check_pair(image, read_label(tmp_path / "mask.png", ["background", "lesion"]))


def test_a_jpeg_mask_named_png_is_reported_as_lossy(tmp_path, caplog):
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:10, 3:12] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png", format="JPEG")
    Image.fromarray(mask).save(tmp_path / "true.png")
    with caplog.at_level("WARNING", logger="fewlabel.data.images"):
        read_label(tmp_path / "true.png", ["background", "lesion"])
        assert not caplog.records
        read_label(tmp_path / "mask.png", ["background", "lesion"])
    assert "mask.png: JPEG masks are lossy" in caplog.records[0].getMessage()
