"""Patient identifiers in DICOM headers never reach an output, a file name, a message or a log.

DICOM series whose headers carry distinctive identifiers (patient name, ID, birth date, other
IDs, institution, referring physician) go through the command line as far as a user would
take them: ``convert`` to NIfTI, ``train`` a segmentation model on them (MSD dataset whose
images are the DICOM series folders, with a held-out test study evaluated into a report),
and ``predict`` a new series. Then every path written, every byte of every file written
(gzip and zip members unpacked), the NIfTI header text fields, stdout/stderr and the log
records are searched for the identifiers, and the DICOM inputs must be byte-identical
afterwards. Reading with ``include_identifiers=True`` is the one way to see them, and it works.
"""

from __future__ import annotations

import gzip
import json
import logging
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _factories import save_nifti, snapshot, tiny_segmentation_config, write_config, write_dicom_series
from fewlabel.cli import main
from fewlabel.data.readers import read_dicom_series, read_study

CASES = ("case_a", "case_b", "case_c")


def _identifiers(i: int) -> dict[str, str]:
    return {
        "PatientName": f"Quillfeather^Ysolde{'ABCD'[i]}",
        "PatientID": f"PID-5550{i}-ZQX",
        "PatientBirthDate": f"1947081{i}",
        "OtherPatientIDs": f"OTHERID-8812{i}-KQ",
        "InstitutionName": f"Saint Elsewhere Infirmary {'ABCD'[i]}",
        "ReferringPhysicianName": f"Ulfberht^Hrothgar{'ABCD'[i]}",
    }


def _secrets() -> list[str]:
    """Every identifier, its DICOM name components, and the birth dates as ISO dates."""
    out: set[str] = set()
    for i in range(len(CASES) + 1):
        for value in _identifiers(i).values():
            out.add(value)
            out.update(part for part in value.split("^") if len(part) > 3)
        date = _identifiers(i)["PatientBirthDate"]
        out.add(f"{date[:4]}-{date[4:6]}-{date[6:]}")
    out.update({"Quillfeather", "Elsewhere Infirmary", "Ulfberht", "Hrothgar"})
    return sorted(out)


SECRETS = _secrets()


def _leaks(data: bytes) -> list[str]:
    low = data.lower()
    return [s for s in SECRETS if s.lower().encode() in low]


def _file_leaks(path: Path) -> list[str]:
    """Identifiers found in a file's bytes, in gzip streams and in zip members (checkpoints)."""
    data = path.read_bytes()
    found = _leaks(data)
    if data[:2] == b"\x1f\x8b":
        found += _leaks(gzip.decompress(data))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                found += _leaks(name.encode()) + _leaks(zf.read(name))
    return sorted(set(found))


@pytest.fixture
def dicom_dataset(tmp_path: Path) -> Path:
    """An MSD dataset whose three training images are DICOM series folders with identifiers."""
    root = tmp_path / "in" / "msd"
    training = []
    for i, case in enumerate(CASES):
        folder = root / "imagesTr" / case
        write_dicom_series(folder, n=6, description="chest", identifiers=_identifiers(i))
        study = read_dicom_series(folder)
        label = np.zeros(study.array.shape, np.uint8)
        label[4 + i : 10 + i, 5:11, 1:5] = 1
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", label, study.affine)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "lesion"}, "training": training})
    )
    # A new patient's series to predict.
    write_dicom_series(tmp_path / "in" / "new_study", n=6, identifiers=_identifiers(3))
    return root


def test_identifiers_never_reach_outputs_names_messages_or_logs(
    tmp_path: Path, dicom_dataset: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    inp, out = tmp_path / "in", tmp_path / "out"
    out.mkdir()
    inputs_before = snapshot(inp)

    # convert
    assert (
        main(
            ["-v", "convert", str(dicom_dataset / "imagesTr" / "case_a"), str(out / "converted" / "a.nii.gz")]
        )
        == 0
    )

    # train (1 iteration) on the DICOM series; the held-out test study is evaluated into a report
    cfg = tiny_segmentation_config(
        dicom_dataset,
        out / "runs",
        data={"test_fraction": 0.34},
        model={"name": "unet", "features": [4, 8, 16]},  # 16x16 slices: two downsamplings
    )
    assert main(["-v", "train", str(write_config(inp / "exp.yaml", cfg))]) == 0
    run = out / "runs" / "run"
    assert (run / "eval" / "report.html").is_file()  # the report exists, so it was searched below

    # predict a new patient's series
    best = run / "checkpoints" / "best.pt"
    assert (
        main(
            [
                "-v",
                "predict",
                "--checkpoint",
                str(best),
                str(inp / "new_study"),
                "--output",
                str(out / "pred"),
            ]
        )
        == 0
    )
    assert (out / "pred" / "new_study.nii.gz").is_file()

    # The inputs are untouched (the config is the only file added to the input folder).
    inputs_after = snapshot(inp)
    assert inputs_after.pop("exp.yaml")
    assert inputs_after == inputs_before

    # The search finds identifiers where they are: in the DICOM inputs.
    source = next((dicom_dataset / "imagesTr" / "case_a").glob("*.dcm"))
    assert {"PID-55500-ZQX", "OTHERID-88120-KQ", "Saint Elsewhere Infirmary A"} <= set(_file_leaks(source))

    written = sorted(out.rglob("*"))
    assert len(written) > 10
    # file and folder names
    assert [p for p in written if _leaks(str(p.relative_to(out)).encode())] == []
    # contents of every file: text (json/csv/html/yaml/log), NIfTI, PNG, checkpoints
    assert {str(p.relative_to(out)): _file_leaks(p) for p in written if p.is_file() and _file_leaks(p)} == {}
    assert any(p.suffix in (".json", ".csv", ".html", ".yaml") for p in written)

    # NIfTI header text fields, named one by one
    niftis = [p for p in written if p.name.endswith(".nii.gz")]
    assert {"a.nii.gz", "new_study.nii.gz"} <= {p.name for p in niftis}
    for path in niftis:
        header = nib.load(str(path)).header
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            assert _leaks(bytes(header[field].tobytes())) == [], (path.name, field)
        assert all(
            _leaks(ext.get_content() if isinstance(ext.get_content(), bytes) else b"") == []
            for ext in header.extensions
        )

    # everything printed and logged
    captured = capsys.readouterr()
    assert _leaks(captured.out.encode()) == []
    assert _leaks(captured.err.encode()) == []
    assert any("converted DICOM series" in r.getMessage() for r in caplog.records)
    assert _leaks("\n".join(r.getMessage() for r in caplog.records).encode()) == []
    assert _leaks(caplog.text.encode()) == []


def test_identifiers_are_read_only_on_request(dicom_dataset: Path) -> None:
    folder = dicom_dataset / "imagesTr" / "case_b"
    plain = read_study(folder)
    assert "patient" not in plain.meta
    assert _leaks(repr(plain).encode() + repr(plain.meta).encode()) == []

    opted = read_study(folder, include_identifiers=True)
    patient = opted.meta["patient"]
    expected = _identifiers(1)
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
        assert patient[tag] == expected[tag]
    np.testing.assert_array_equal(opted.array, plain.array)


def test_text_fields_of_a_nifti_source_do_not_reach_its_mask(tmp_path: Path) -> None:
    from fewlabel.data.readers import write_mask

    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4))
    secrets = _identifiers(0)
    img.header["descrip"] = secrets["PatientName"].encode()
    img.header["aux_file"] = secrets["PatientID"].encode()
    img.header["intent_name"] = secrets["PatientBirthDate"].encode()
    img.header["db_name"] = b"Quillfeather"
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", secrets["InstitutionName"].encode()))
    nib.save(img, str(tmp_path / "source.nii.gz"))
    # What `predict` does with every NIfTI study: the mask is written on the source's grid and header.
    mask = write_mask(
        np.zeros((8, 8, 4), np.uint8), read_study(tmp_path / "source.nii.gz"), tmp_path / "m.nii.gz"
    )
    assert _file_leaks(tmp_path / "source.nii.gz")  # the search sees them in the source
    assert _file_leaks(mask) == []
