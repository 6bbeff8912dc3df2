"""Copy-paste between labelled and unlabelled segmentation batches.

After bidirectional copy-paste (Bai et al., "Bidirectional Copy-Paste for Semi-Supervised
Medical Image Segmentation", CVPR 2023): a rectangle of a labelled image is pasted into an
unlabelled one, or a rectangle of the unlabelled image into the labelled one, and the mixed
image is supervised by the true labels where the labelled image shows and by the teacher's
hard prediction elsewhere. Labelled context then surrounds unlabelled anatomy and the
reverse, so that what the network learns from the few labels reaches the unlabelled images.

Written here rather than taken from :class:`monai.transforms.CutMix`: MONAI's mixer pairs
samples of one batch, mixes the labels by area instead of pixel by pixel, and draws from its
own NumPy ``RandomState``, which the checkpoints do not save. This version draws from the
generator that a TCSM checkpoint saves, so a resumed run pastes as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["copy_paste_batch", "paste_masks"]


def paste_masks(
    n: int, height: int, width: int, size: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw one rectangle per sample, and which side of it shows the labelled image.

    Args:
        n: number of samples.
        height: in-plane height ``H``.
        width: in-plane width ``W``.
        size: side of the rectangle relative to ``H`` and ``W``, in (0, 1).
        generator: CPU random generator (``None`` uses torch's global one).

    Returns:
        ``inside``, a boolean ``(n, H, W)`` tensor, True inside each sample's rectangle (placed
        uniformly at random, wholly within the slice), and ``labeled_inside``, a boolean
        ``(n,)`` tensor: True where the rectangle shows the labelled image (pasted into the
        unlabelled one), False where it shows the unlabelled image (pasted into the labelled one).

    Raises:
        ValueError: if ``n``, ``height`` or ``width`` is not positive, or ``size`` is outside (0, 1).
    """
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"n, height and width must be positive, got {n}, {height}, {width}")
    if not 0.0 < size < 1.0:
        raise ValueError(f"size must lie in (0, 1), got {size}")
    rh, rw = max(1, round(height * size)), max(1, round(width * size))
    top = torch.randint(0, height - rh + 1, (n,), generator=generator)
    left = torch.randint(0, width - rw + 1, (n,), generator=generator)
    labeled_inside = torch.randint(0, 2, (n,), generator=generator).bool()
    rows = torch.arange(height)
    cols = torch.arange(width)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + rh)
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + rw)
    return in_rows[:, :, None] & in_cols[:, None, :], labeled_inside


def copy_paste_batch(
    labeled: Tensor,
    label: Tensor,
    unlabeled: Tensor,
    pseudo_label: Tensor,
    size: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Mix labelled sample ``i`` with unlabelled sample ``i`` through a random rectangle.

    Each pair gives one mixed sample; half of them (at random) show the labelled image
    inside the rectangle, the others outside it. The rectangle acts on the in-plane axes
    (2, 3); a depth axis, when present, is mixed alike on every plane.

    Args:
        labeled: labelled images ``(N, C, H, W[, D])``.
        label: their integer labels ``(N, 1, H, W[, D])``.
        unlabeled: unlabelled images of the same shape as ``labeled``.
        pseudo_label: integer labels for ``unlabeled`` (e.g. the teacher's argmax), shaped like ``label``.
        size: side of the rectangle relative to ``H`` and ``W``, in (0, 1).
        generator: CPU random generator.

    Returns:
        The mixed images (shape and dtype of ``labeled``) and their labels (shape and dtype of
        ``label``).

    Raises:
        ValueError: if the shapes do not match.
    """
    if labeled.shape != unlabeled.shape:
        raise ValueError(
            f"copy-paste needs labelled and unlabelled images of one shape, got "
            f"{tuple(labeled.shape)} and {tuple(unlabeled.shape)}"
        )
    if (
        label.shape != pseudo_label.shape
        or label.shape[0] != labeled.shape[0]
        or label.shape[2:] != labeled.shape[2:]
    ):
        raise ValueError(
            f"labels {tuple(label.shape)} and pseudo-labels {tuple(pseudo_label.shape)} must both be "
            f"(N, 1, *spatial) for images {tuple(labeled.shape)}"
        )
    inside, labeled_inside = paste_masks(
        labeled.shape[0], labeled.shape[2], labeled.shape[3], size, generator
    )
    shows_labeled = inside == labeled_inside[:, None, None]
    mask = shows_labeled[:, None].to(labeled.device)
    if labeled.ndim == 5:
        mask = mask[..., None]
    image = torch.where(mask, labeled, unlabeled)
    target = torch.where(mask, label, pseudo_label.to(label.dtype))
    return image, target
