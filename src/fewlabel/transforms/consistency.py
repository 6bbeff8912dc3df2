"""The random transformations T of transformation-consistent self-ensembling (TCSM).

TCSM asks the student's prediction, transformed by T, to match the teacher's prediction on the
transformed input: ``T(f(x)) ≈ g(T(x))``. T must therefore act identically on images and on
per-pixel network outputs, batched, on the GPU and inside autograd. MONAI's random transforms
work on single channel-first samples (usually on the CPU, in the data loader) and keep their
randomness in their own state, so they are a poor fit here; these few lines of tensor code
act on whole batches and take an explicit ``torch.Generator``.

A transform acts on the two in-plane axes, dims ``(2, 3)`` of ``(N, C, H, W)`` or
``(N, C, H, W, D)`` tensors, so the same code serves 2D, 2.5D (slices stacked as channels) and
3D inputs. It is applied in this order: ``k`` quarter turns (``torch.rot90`` from dim 2 towards
dim 3), a flip of dim 3, then a zoom about the centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["InPlaneTransform", "apply_per_sample", "sample_transforms"]

_IN_PLANE = (2, 3)


@dataclass(frozen=True)
class InPlaneTransform:
    """One transformation T of the two in-plane axes.

    Attributes:
        k: quarter turns, 0 to 3 (``torch.rot90`` over dims (2, 3)).
        flip: flip dim 3 after the rotation.
        scale: zoom factor about the centre (1.0 = none). Above 1 the zoomed tensor is
            centre-cropped back to its size; below 1 it is zero-padded back to its size.
            Zooming interpolates (bilinear in-plane, the depth axis untouched), so only
            rotation and flip are exactly invertible.
    """

    k: int
    flip: bool
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.k not in (0, 1, 2, 3):
            raise ValueError(f"k must be 0, 1, 2 or 3 quarter turns, got {self.k}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    @property
    def is_identity(self) -> bool:
        """Whether T leaves every tensor unchanged."""
        return self.k == 0 and not self.flip and self.scale == 1.0

    def __call__(self, x: Tensor) -> Tensor:
        """Apply T.

        Args:
            x: ``(N, C, H, W)`` or ``(N, C, H, W, D)`` tensor (images or network outputs).

        Returns:
            The transformed tensor; ``H`` and ``W`` are swapped when ``k`` is odd.
        """
        _check_rank(x)
        if self.k:
            x = torch.rot90(x, self.k, dims=_IN_PLANE)
        if self.flip:
            x = torch.flip(x, dims=(3,))
        if self.scale != 1.0:
            x = _zoom(x, self.scale)
        return x

    def inverse(self, x: Tensor) -> Tensor:
        """Undo T: exact for rotation and flip, approximate for the zoom.

        A zoom-in loses the border it cropped (the inverse pads it with zeros) and both
        directions interpolate.

        Args:
            x: a tensor produced by this transform.

        Returns:
            The tensor in the original orientation and size.
        """
        _check_rank(x)
        if self.scale != 1.0:
            x = _zoom(x, 1.0 / self.scale)
        if self.flip:
            x = torch.flip(x, dims=(3,))
        if self.k:
            x = torch.rot90(x, -self.k, dims=_IN_PLANE)
        return x


def sample_transforms(
    n: int,
    rotate90: bool,
    flip: bool,
    scale: float,
    generator: torch.Generator | None,
    shared: bool = False,
) -> list[InPlaneTransform]:
    """Draw random in-plane transformations, one per sample.

    Args:
        n: number of transforms (the batch size).
        rotate90: draw the number of quarter turns uniformly from 0 to 3 (else 0).
        flip: flip with probability 1/2 (else never).
        scale: maximum relative zoom; the factor is drawn uniformly from ``[1, 1 + scale]``.
            Only zooming in is drawn, so that no zero-padded border, whose prediction the
            student never made, enters the consistency loss. 0 disables zooming.
        generator: CPU random generator (``None`` uses torch's global one).
        shared: draw one transform and repeat it ``n`` times. Needed for non-square in-plane
            sizes when ``rotate90`` is on: an odd number of quarter turns swaps ``H`` and ``W``,
            and samples of different shapes cannot be stacked in one batch.

    Returns:
        ``n`` transforms.

    Raises:
        ValueError: if ``n`` is not positive or ``scale`` is negative.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    draws = 1 if shared else n
    ks = (
        torch.randint(0, 4, (draws,), generator=generator)
        if rotate90
        else torch.zeros(draws, dtype=torch.long)
    )
    flips = (
        torch.randint(0, 2, (draws,), generator=generator) if flip else torch.zeros(draws, dtype=torch.long)
    )
    if scale > 0:
        scales = 1.0 + scale * torch.rand(draws, generator=generator, dtype=torch.float64)
    else:
        scales = torch.ones(draws, dtype=torch.float64)
    transforms = [
        InPlaneTransform(k=int(k), flip=bool(f), scale=float(s))
        for k, f, s in zip(ks.tolist(), flips.tolist(), scales.tolist(), strict=True)
    ]
    return transforms * n if shared else transforms


def apply_per_sample(transforms: list[InPlaneTransform], x: Tensor, inverse: bool = False) -> Tensor:
    """Apply ``transforms[i]`` (or its inverse) to sample ``i`` of a batch.

    Samples that share a transform are transformed together, so a batch with one shared
    transform costs a single call. Works inside autograd.

    Args:
        transforms: one transform per sample.
        x: ``(N, C, H, W)`` or ``(N, C, H, W, D)`` batch.
        inverse: undo each transform instead (:meth:`InPlaneTransform.inverse`), e.g. to bring
            outputs on transformed images back to the original orientation.

    Returns:
        The transformed batch.

    Raises:
        ValueError: if the number of transforms differs from the batch size, or if the
            transformed samples differ in shape (odd and even quarter turns of a non-square
            batch; draw them with ``sample_transforms(..., shared=True)``).
    """
    _check_rank(x)
    if len(transforms) != x.shape[0]:
        raise ValueError(f"got {len(transforms)} transforms for a batch of {x.shape[0]} samples")
    groups: dict[InPlaneTransform, list[int]] = {}
    for i, t in enumerate(transforms):
        groups.setdefault(t, []).append(i)
    if len(groups) == 1:
        return transforms[0].inverse(x) if inverse else transforms[0](x)
    parts, order = [], []
    for t, idx in groups.items():
        parts.append(t.inverse(x[idx]) if inverse else t(x[idx]))
        order.extend(idx)
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ValueError(
            f"transformed samples differ in shape {sorted(shapes)}: rotating a non-square batch "
            f"(H={x.shape[2]}, W={x.shape[3]}) by odd and even quarter turns cannot be stacked; "
            "draw one shared transform for such batches"
        )
    # Put the samples back in batch order (an index on the concatenation keeps autograd intact).
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[position.to(x.device)]


def _check_rank(x: Tensor) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a (N, C, H, W) or (N, C, H, W, D) tensor, got shape {tuple(x.shape)}")


def _zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom the in-plane axes about the centre, then crop or zero-pad back to the input size."""
    h, w = x.shape[2], x.shape[3]
    zh, zw = max(1, round(h * factor)), max(1, round(w * factor))
    if (zh, zw) == (h, w):
        return x
    size = (zh, zw) if x.ndim == 4 else (zh, zw, x.shape[4])
    if x.is_floating_point():
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        zoomed = F.interpolate(x, size=size, mode=mode, align_corners=False)
    else:
        zoomed = F.interpolate(x.float(), size=size, mode="nearest-exact").to(x.dtype)
    # Crop (negative padding) or pad each in-plane axis symmetrically about the centre.
    top, left = (zh - h) // 2, (zw - w) // 2
    pad = [-left, -(zw - w - left), -top, -(zh - h - top)]
    if x.ndim == 5:
        pad = [0, 0, *pad]
    return F.pad(zoomed, pad)
