"""Mixup for classification batches: convex combinations of image pairs and of their labels.

Written here rather than taken from :class:`monai.transforms.MixUp` for two reasons: MONAI's
mixer mixes only image-shaped tensors (its ``apply`` rejects an ``N x K`` label matrix, which
is what a classifier's targets are), and it draws from its own NumPy ``RandomState``, which
is not part of the RNG state a checkpoint saves, so a resumed run would mix differently from
an uninterrupted one. This version draws from torch's global generator, which checkpoints
capture and restore.
"""

from __future__ import annotations

import torch

__all__ = ["mixup_batch"]


def mixup_batch(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with another of the batch, and its one-hot label likewise.

    Following Zhang et al. (mixup, ICLR 2018), each sample ``i`` becomes
    ``lam_i * x_i + (1 - lam_i) * x_p(i)`` with ``p`` a random permutation of the batch and
    ``lam_i ~ Beta(alpha, alpha)``; its target becomes the same combination of the two
    one-hot labels. One weight per sample (as MONAI's mixer does) rather than per batch: the
    batch then spans the whole range of mixtures at every step.

    Args:
        images: ``N x C x H x W`` (or any ``N x ...``) floating-point batch.
        labels: class indices, shape ``N``.
        num_classes: number of classes ``K``.
        alpha: Beta distribution parameter (> 0); small values (0.1-0.4) keep most samples
            close to one of the two originals.

    Returns:
        The mixed images (same shape and dtype as ``images``) and the ``N x K`` soft targets,
        each row summing to one.

    Raises:
        ValueError: if ``alpha`` is not positive, the batch sizes differ, or a label is
            outside ``[0, num_classes)``.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}")
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
    concentration = torch.tensor(float(alpha))
    lam = torch.distributions.Beta(concentration, concentration).sample((n,))
    perm = torch.randperm(n)
    lam_images = lam.to(device=images.device, dtype=images.dtype).view(n, *([1] * (images.dim() - 1)))
    perm_images = perm.to(images.device)
    mixed = lam_images * images + (1 - lam_images) * images[perm_images]
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    lam_labels = lam.to(labels.device).view(n, 1)
    targets = lam_labels * one_hot + (1 - lam_labels) * one_hot[perm.to(labels.device)]
    return mixed, targets
