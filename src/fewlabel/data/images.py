"""Decoding and checking 2D image files (PNG, JPEG, BMP, TIFF) with Pillow.

Every failure becomes a :class:`~fewlabel.errors.DataError` that names the file, so that one
bad file in a folder of thousands is easy to find. Images are decoded fully (Pillow decodes
lazily, and a truncated file would otherwise only fail deep inside a training epoch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fewlabel.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "image_size", "is_image_file", "read_image", "verify_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# EXIF tag 0x0112: how a camera says the stored pixels should be turned for display.
_EXIF_ORIENTATION = 0x0112
_exif_reported = False

# Pillow modes that hold one grey value per pixel.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def is_image_file(path: str | Path) -> bool:
    """Whether a path has one of the supported image suffixes (case-insensitive).

    Args:
        path: a file path.

    Returns:
        True for ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif`` and ``.tiff``.
    """
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _channels_of(mode: str) -> int:
    return 1 if mode in _GREY_MODES else 3


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise DataError(path, "image file not found")
    if not path.is_file():
        raise DataError(path, "is not a file")
    if path.stat().st_size == 0:
        raise DataError(path, "image file is empty (0 bytes)")
    try:
        return Image.open(path)
    except UnidentifiedImageError as err:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(path, f"cannot open image: {err}") from err


def read_image(path: str | Path, mode: str | None = None) -> np.ndarray:
    """Decode an image file into a ``uint8`` array.

    Args:
        path: a PNG, JPEG, BMP or TIFF file.
        mode: ``None`` keeps grey images grey (``HxW``) and returns everything else as RGB
            (``HxWx3``; alpha is dropped, palettes are expanded); ``"L"`` converts to grey
            ``HxW``; ``"RGB"`` converts to ``HxWx3``; ``"P"`` is for label maps: it returns the
            palette indices of a palette image (``HxW``) and the values of a grey one.

    Returns:
        ``HxW`` or ``HxWx3`` ``uint8`` array.

    Raises:
        DataError: if the file is missing, empty, truncated, not an image, holds values that do
            not fit 8 bits, or cannot be returned in ``mode``.
    """
    path = Path(path)
    if mode not in (None, "L", "RGB", "P"):
        raise ValueError(f"read_image mode must be None, 'L', 'RGB' or 'P', not {mode!r}")
    with _open(path) as img:
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(path, f"cannot decode image (truncated or corrupt?): {err}") from err
        _report_exif_orientation(path, img)
        src = img.mode
        if src in _WIDE_GREY:
            arr = _wide_grey_as_8_bits(path, img)
            return arr if mode != "RGB" else np.repeat(arr[..., None], 3, axis=-1)
        if mode == "P":
            # By content, not name: a JPEG saved as .png is as lossy, and its wrong pixels can
            # still hold valid class values.
            if img.format == "JPEG":
                log.warning("%s: JPEG masks are lossy; compression noise may add spurious label values", path)
            if src == "P":
                return np.asarray(img, dtype=np.uint8).copy()
            if src == "1":
                # A 1-bit mask is a binary label map: 0 and 1, not the 0 and 255 of its grey view.
                return np.asarray(img, dtype=np.uint8).copy()
            if src in ("L", "LA"):
                return np.asarray(img.convert("L"), dtype=np.uint8).copy()
            raise DataError(path, f"expected a label map (palette or grey image), found a {src} image")
        target = mode or ("L" if _channels_of(src) == 1 else "RGB")
        out = img if src == target else img.convert(target)
        return np.asarray(out, dtype=np.uint8).copy()


_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _wide_grey_as_8_bits(path: Path, img: Image.Image) -> np.ndarray:
    """A decoded 16-bit or float grey image as ``uint8``, refused unless its values fit.

    Such images cannot be squeezed into 8 bits without a windowing choice, so they are
    accepted only when their values are integers in 0..255 already.
    """
    arr = np.asarray(img)
    if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(np.equal(np.mod(arr, 1), 0))):
        raise DataError(
            path,
            f"{img.mode} image with values outside 0..255 integers (range {arr.min()}..{arr.max()}); "
            f"convert it to 8 bits with the intended intensity window",
        )
    return arr.astype(np.uint8)


def _report_exif_orientation(path: Path, img: Image.Image) -> None:
    """Warn, once a process, about an image that asks to be shown turned.

    The stored pixels are used as they are, as MONAI's readers and medical viewers do: turning
    images by their tag would move them off masks drawn on the stored grid. A photo viewer
    that applies the tag shows such an image turned, which is worth saying once.
    """
    global _exif_reported
    if _exif_reported:
        return
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        return
    if orientation not in (None, 1):
        _exif_reported = True
        log.warning(
            "%s: has EXIF orientation %s; fewlabel uses the pixels as stored, which a photo viewer "
            "may show turned or mirrored (masks must be on the stored grid). Other such images are "
            "not reported.",
            path,
            orientation,
        )


def image_size(path: str | Path) -> tuple[int, int]:
    """The size of an image from its header, without decoding its pixels.

    Args:
        path: the image file.

    Returns:
        ``(height, width)``, the shape :func:`read_image` gives it.

    Raises:
        DataError: if the file is missing, empty or not an image.
    """
    with _open(Path(path)) as img:
        width, height = img.size
    return height, width


def verify_image(path: str | Path) -> tuple[int, int, int]:
    """Check that an image file decodes, without keeping its pixels.

    PNG files are checked with Pillow's ``verify()`` (chunk checksums, fast); JPEG files are
    decoded at reduced scale (``draft``), which reads all the compressed data and so detects
    truncation at a fraction of the cost of a full decode; other formats, and 16-bit or float
    grey images of any format (whose values must fit 8 bits, as :func:`read_image` requires),
    are decoded fully.

    Args:
        path: the image file.

    Returns:
        ``(height, width, channels)`` where ``channels`` is what :func:`read_image` with
        ``mode=None`` returns: 1 for grey images, 3 otherwise.

    Raises:
        DataError: if the file is missing, empty, truncated, not an image, or a wide grey
            image with values that do not fit 8 bits.
    """
    path = Path(path)
    with _open(path) as img:
        width, height = img.size
        channels = _channels_of(img.mode)
        fmt = img.format
        wide = img.mode in _WIDE_GREY
        try:
            if fmt == "PNG" and not wide:
                img.verify()
            else:
                if fmt == "JPEG":
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(path, f"cannot decode image (truncated or corrupt?): {err}") from err
        if wide:
            _wide_grey_as_8_bits(path, img)
    if width == 0 or height == 0:
        raise DataError(path, f"image has zero size ({width}x{height})")
    return height, width, channels
