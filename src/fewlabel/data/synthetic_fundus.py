"""Synthetic fundus photographs with retinopathy-like grades, for demos and tests.

Each image shows a dark background, an orange-red retina disc with radial shading, a bright
optic disc and dark vessels. Grade ``g`` adds dark-red haemorrhage dots and, from grade 2,
yellow exudate spots, more and larger as ``g`` grows, so that a small network learns the
grades from colour and lesion count in a few epochs. Nothing here resembles real pathology
closely enough for any clinical conclusion.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fewlabel.errors import DataError
from fewlabel.utils.files import atomic_write, atomic_write_text

__all__ = ["make_synthetic_fundus", "render_fundus"]


def render_fundus(grade: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one synthetic fundus image.

    Args:
        grade: severity in ``0 .. num_classes - 1``.
        num_classes: number of grades (lesion load scales with ``grade / (num_classes - 1)``).
        size: image height and width in pixels.
        rng: random generator (position, shading, vessels and lesions).

    Returns:
        ``size x size x 3`` ``uint8`` RGB image.
    """
    # Supersample then shrink: small lesions keep smooth edges and sub-pixel sizes at 64 px.
    scale = 4
    s = size * scale
    img = Image.new("RGB", (s, s), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s / 2 + rng.uniform(-0.03, 0.03) * s
    radius = s * rng.uniform(0.44, 0.48)
    base = np.array([200, 85, 40]) + rng.integers(-15, 16, size=3)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=tuple(int(c) for c in base))

    side = rng.choice([-1.0, 1.0])  # left or right eye
    od_x, od_y = cx + side * radius * 0.45, cy + rng.uniform(-0.08, 0.08) * radius
    for _ in range(7):
        # Vessels leave the optic disc as arcs of decreasing width.
        angle = rng.uniform(0, 2 * np.pi)
        length = radius * rng.uniform(0.5, 1.0)
        pts = []
        bend = rng.uniform(-0.6, 0.6)
        for t in np.linspace(0, 1, 12):
            a = angle + bend * t
            pts.append((od_x + np.cos(a) * length * t, od_y + np.sin(a) * length * t))
        draw.line(pts, fill=(110, 25, 20), width=max(1, int(scale * rng.uniform(0.6, 1.2))))
    od_r = radius * 0.14
    draw.ellipse((od_x - od_r, od_y - od_r, od_x + od_r, od_y + od_r), fill=(250, 215, 140))

    severity = grade / max(1, num_classes - 1)
    n_haem = round(16 * severity) + (int(rng.integers(0, 2)) if grade > 0 else 0)
    n_exud = round(16 * (severity - 0.25)) if severity > 0.3 else 0
    for count, colour, r_px in (
        (n_haem, (90, 10, 10), 1.2 + 1.5 * severity),
        (n_exud, (245, 230, 90), 1.0 + 1.2 * severity),
    ):
        for _ in range(count):
            rr = radius * 0.8 * np.sqrt(rng.uniform(0, 1))
            th = rng.uniform(0, 2 * np.pi)
            x, y = cx + rr * np.cos(th), cy + rr * np.sin(th)
            r = r_px * scale * rng.uniform(0.8, 1.2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    # Vessels and lesions stay inside the retina: blank everything outside the disc again.
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    img = Image.composite(img, Image.new("RGB", (s, s), (0, 0, 0)), mask)

    arr = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(xx - cx / scale, yy - cy / scale) / (radius / scale)
    # Vignetting: real fundus photographs darken towards the rim of the retina.
    arr *= np.clip(1.0 - 0.35 * dist**2, 0.3, 1.0)[..., None]
    arr += rng.normal(0.0, 3.0, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))


def make_synthetic_fundus(
    root: Path,
    n_per_class: int = 24,
    num_classes: int = 5,
    size: int = 64,
    seed: int = 0,
    layout: str = "folder",
) -> Path:
    """Write a synthetic retinopathy data set.

    Args:
        root: output folder (created); the files it will hold must not exist yet.
        n_per_class: images per grade.
        num_classes: number of grades (>= 2).
        size: image size in pixels (>= 16).
        seed: the images are a pure function of the arguments.
        layout: ``"folder"`` writes ``root/grade_<g>/<id>.png``; ``"csv"`` writes
            ``root/images/<id>.png`` and ``root/labels.csv`` with columns
            ``image,label,patient_id`` (integer grades, two images per patient).

    Returns:
        The path to give as ``data.path``: ``root`` for ``folder``, ``root/labels.csv`` for ``csv``.

    Raises:
        ValueError: for an unknown layout or out-of-range sizes.
        DataError: if an output folder or file of the data set already exists.
    """
    if layout not in ("folder", "csv"):
        raise ValueError(f"layout must be 'folder' or 'csv', not {layout!r}")
    if num_classes < 2 or n_per_class < 1 or size < 16:
        raise ValueError("need num_classes >= 2, n_per_class >= 1 and size >= 16")
    root = Path(root)
    targets = (
        [root / f"grade_{g}" for g in range(num_classes)]
        if layout == "folder"
        else [root / "images", root / "labels.csv"]
    )
    for t in targets:
        if t.exists():
            raise DataError(t, "already exists; choose an empty output folder")

    rng = np.random.default_rng(seed)
    rows = []
    patient = 0
    for g in range(num_classes):
        for i in range(n_per_class):
            if i % 2 == 0:
                patient += 1
            image_id = f"p{patient:04d}_{'left' if i % 2 == 0 else 'right'}"
            array = render_fundus(g, num_classes, size, rng)
            if layout == "folder":
                _write_png(root / f"grade_{g}" / f"{image_id}.png", array)
            else:
                _write_png(root / "images" / f"{image_id}.png", array)
                rows.append((f"images/{image_id}.png", g, f"p{patient:04d}"))
    if layout == "folder":
        return root
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "label", "patient_id"])
    writer.writerows(rows)
    return atomic_write_text(root / "labels.csv", buf.getvalue())
