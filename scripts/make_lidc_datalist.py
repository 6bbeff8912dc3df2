"""Write the CSV datalist (image,label,patient_id) of the LIDC-IDRI nodule crops.

The ``lidc_voi`` folder holds ``images/LIDC-IDRI-<patient>_R_<nodule>.nii.gz`` and masks of the
same names in ``masks/``, without a datalist. Several nodules share a patient, and splits
must keep a patient's nodules together, so the patient id (``LIDC-IDRI-<patient>``) goes into
the ``patient_id`` column, which ``data.format: csv`` splits by.

    python scripts/make_lidc_datalist.py ../shared/data/lidc_voi data/lidc_voi.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from pathlib import Path

from fewlabel.utils.files import atomic_write_text

_NAME = re.compile(r"^(?P<patient>LIDC-IDRI-\d+)_R_(?P<nodule>\d+)\.nii(\.gz)?$")


def build_rows(root: Path) -> tuple[list[dict[str, str]], list[str]]:
    """One row per crop.

    A crop without a mask gets an empty ``label``: the CSV format reads it as unlabelled
    (used by TCSM, ignored by supervised training).

    Args:
        root: the ``lidc_voi`` folder.

    Returns:
        Rows with absolute ``image`` and ``label`` paths and the ``patient_id``, and the names
        of the crops without a mask.

    Raises:
        SystemExit: if the folder layout is not the expected one.
    """
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise SystemExit(f"{root}: expected images/ and masks/ folders")
    rows, missing = [], []
    for image in sorted(images.iterdir()):
        match = _NAME.match(image.name)
        if not match:
            continue
        mask = masks / image.name
        if not mask.is_file():
            missing.append(image.name)
        label = str(mask.resolve()) if mask.is_file() else ""
        rows.append({"image": str(image.resolve()), "label": label, "patient_id": match["patient"]})
    if not rows:
        raise SystemExit(f"{images}: no files named LIDC-IDRI-<patient>_R_<nodule>.nii.gz")
    return rows, missing


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the lidc_voi folder (images/, masks/)")
    parser.add_argument("output", type=Path, help="CSV to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    args = parser.parse_args(argv)
    if args.output.resolve().is_relative_to(args.root.resolve()):
        raise SystemExit(f"{args.output}: refusing to write into the data folder {args.root}")
    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"{args.output}: exists already; pass --overwrite to replace it")
    rows, missing = build_rows(args.root)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "label", "patient_id"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.output, buffer.getvalue())
    patients = len({r["patient_id"] for r in rows})
    print(f"wrote {args.output}: {len(rows)} crops from {patients} patients")
    if missing:
        print(f"{len(missing)} crop(s) have no mask and are listed as unlabelled: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
