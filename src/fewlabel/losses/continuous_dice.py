"""Continuous Dice coefficient (Shamir et al., 2019) and a training loss built on it.

For a binary ground truth ``a`` and a predicted probability map ``b`` in [0, 1]::

    cDC = 2·Σ(a·b) / (c·Σa + Σb),   c = Σ(a·b) / Σ(a·sign(b))

``c`` is the mean of ``b`` where both ``a`` and ``b`` are positive (``c = 1`` when they do
not overlap). cDC equals the Dice coefficient when ``b`` is binary, but unlike the soft
Dice it measures overlap rather than confidence: ``b = 0.6`` exactly on the true region
gives soft Dice 0.75 and cDC 1.0.

MONAI has no continuous Dice (its ``DiceLoss`` is the soft Dice), so it is written here.
The loss follows the conventions of ``monai.losses.DiceLoss`` (``include_background``,
``softmax``, ``batch``, ``reduction``) so that the two can be swapped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import Tensor, nn

__all__ = ["ContinuousDiceLoss", "continuous_dice"]


def continuous_dice(a: Tensor, b: Tensor, dims: int | Sequence[int], eps: float = 1e-6) -> Tensor:
    """Continuous Dice coefficient between a binary mask and a probability map.

    ``eps`` is added to numerator and denominator, so a class that is empty in both the
    ground truth and the prediction scores 1 (nothing to find, nothing found) with finite
    gradients, while an empty ground truth with a non-zero prediction scores close to 0.
    Softmax probabilities are never exactly 0, so on a sample without the class the
    coefficient stays near 0 however small the prediction, and its gradient vanishes: such
    samples need another term (cross-entropy, or ``batch`` pooling) to penalise false
    positives.

    Args:
        a: binary ground truth (0/1 values, any float or integer dtype).
        b: predicted probabilities in [0, 1], same shape as ``a``.
        dims: dimensions summed over (e.g. the spatial dimensions); the others are kept.
        eps: smoothing term; 0 gives the exact coefficient (NaN when both are empty).

    Returns:
        cDC with the ``dims`` dimensions reduced.

    Raises:
        ValueError: if ``a`` and ``b`` differ in shape.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"ground truth shape {tuple(a.shape)} differs from prediction shape {tuple(b.shape)}"
        )
    if isinstance(dims, int):
        dims = (dims,)
    dims = tuple(dims)
    a = a.to(b.dtype)
    intersection = torch.sum(a * b, dim=dims)
    with torch.no_grad():
        # c is held constant (no gradient): sign(b) has zero gradient anyway, and c only rescales Σa.
        # Differentiating through the Σ(a·b) in c's numerator would subtract from the gradient that
        # pulls b up on the true region, weakening exactly the overlap signal the loss is for.
        overlap_support = torch.sum(a * torch.sign(b), dim=dims)
        c = torch.where(
            overlap_support > 0,
            intersection / overlap_support.clamp_min(1e-12),
            torch.ones_like(intersection),
        )
    denominator = c * torch.sum(a, dim=dims) + torch.sum(b, dim=dims)
    return (2.0 * intersection + eps) / (denominator + eps)


class ContinuousDiceLoss(nn.Module):
    """``1 − cDC``, averaged over classes (and samples), optionally plus cross-entropy and soft Dice.

    cDC scores overlap, not confidence: with softmax outputs ``c`` is the mean probability
    on the true region, so ``cDC = 2I / (2I + FP)`` where ``I`` is the probability mass on
    the true region and ``FP`` the mass outside it. The term therefore pushes hard against
    false positives but only weakly against missed lesion. The optional soft-Dice term
    (``monai.losses.DiceLoss``) adds the missing pull towards full confidence on large,
    faint lesions such as ground-glass opacity; the cross-entropy does the same per voxel.

    Works for 2D ``(N, K, H, W)`` and 3D ``(N, K, H, W, D)`` inputs.

    Args:
        include_background: keep class 0 in the Dice term (the cross-entropy always uses every class).
        softmax: apply a softmax over the channel dimension to ``logits``; ``False`` means the
            input holds probabilities already.
        ce_weight: weight of the cross-entropy term added to the Dice term (0 disables it).
        soft_dice_weight: weight of a soft-Dice term (``monai.losses.DiceLoss`` over the same
            classes, per sample or pooled like ``batch``) added to the continuous Dice term
            (0 disables it).
        reduction: ``mean``, ``sum`` or ``none`` (per-sample, per-class values of ``1 − cDC``,
            shape ``(N, K)``, or ``(K,)`` with ``batch=True``; not combinable with ``ce_weight``).
        batch: pool the whole batch before computing cDC per class, as ``monai.losses.DiceLoss(batch=True)``;
            otherwise cDC is computed per sample and class, then averaged.
        eps: smoothing of :func:`continuous_dice`; an empty class in both ground truth and
            (binary) prediction gives cDC = 1, i.e. zero loss. Softmax outputs are never empty,
            so per sample a class absent from the ground truth gives a loss near 1 with almost
            no gradient; ``ce_weight`` or ``batch`` supplies the false-positive signal there.

    Raises:
        ValueError: on an unknown ``reduction``, negative ``ce_weight``, or ``reduction="none"``
            together with ``ce_weight > 0`` (a per-voxel cross-entropy has no per-class value).
    """

    def __init__(
        self,
        include_background: bool = False,
        softmax: bool = True,
        ce_weight: float = 0.0,
        soft_dice_weight: float = 0.0,
        reduction: str = "mean",
        batch: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
        if soft_dice_weight < 0:
            raise ValueError(f"soft_dice_weight must be >= 0, got {soft_dice_weight}")
        if reduction == "none" and (ce_weight > 0 or soft_dice_weight > 0):
            raise ValueError("reduction='none' cannot be combined with ce_weight > 0 or soft_dice_weight > 0")
        self.include_background = include_background
        self.softmax = softmax
        self.ce_weight = float(ce_weight)
        self.soft_dice_weight = float(soft_dice_weight)
        # The probabilities and one-hot target are prepared by forward(), background already removed.
        self._soft_dice = DiceLoss(include_background=True, softmax=False, batch=batch)
        self.reduction = reduction
        self.batch = batch
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: network output ``(N, K, *spatial)`` (probabilities when ``softmax=False``).
            target: integer labels ``(N, 1, *spatial)`` with values in ``[0, K)``, or a one-hot
                ``(N, K, *spatial)`` tensor.

        Returns:
            The loss (a scalar unless ``reduction="none"``).

        Raises:
            ValueError: if the shapes do not match, labels fall outside ``[0, K)``, or a
                softmax is asked of a single channel.
        """
        if logits.ndim < 3:
            raise ValueError(f"logits must be (N, K, *spatial), got shape {tuple(logits.shape)}")
        n_classes = logits.shape[1]
        if self.softmax and n_classes == 1:
            raise ValueError(
                "softmax over a single channel is always 1; give K >= 2 channels or softmax=False"
            )
        if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
            )
        if target.shape[1] == 1 and n_classes > 1:
            labels = target.long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
                raise ValueError(
                    f"target labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]"
                )
            onehot = one_hot(labels, num_classes=n_classes, dim=1).to(logits.dtype)
        elif target.shape[1] == n_classes:
            onehot = target.to(logits.dtype)
            labels = onehot.argmax(dim=1, keepdim=True) if n_classes > 1 else onehot.round().long()
        else:
            raise ValueError(f"target must have 1 or {n_classes} channels, got {target.shape[1]}")

        if logits.dtype in (torch.float16, torch.bfloat16):
            # Sums over a 3D patch exceed the float16 range (65504) and lose precision in bfloat16.
            logits = logits.float()
        probs = torch.softmax(logits, dim=1) if self.softmax else logits
        dice_probs, dice_target = probs, onehot
        if not self.include_background and n_classes > 1:
            dice_probs, dice_target = probs[:, 1:], onehot[:, 1:]
        spatial = tuple(range(2, logits.ndim))
        dims = (0, *spatial) if self.batch else spatial
        loss = 1.0 - continuous_dice(dice_target, dice_probs, dims=dims, eps=self.eps)

        if self.reduction == "none":
            return loss
        loss = loss.mean() if self.reduction == "mean" else loss.sum()
        if self.soft_dice_weight > 0:
            loss = loss + self.soft_dice_weight * self._soft_dice(dice_probs, dice_target)
        if self.ce_weight > 0:
            loss = loss + self.ce_weight * self._cross_entropy(logits, probs, labels, n_classes)
        return loss

    def _cross_entropy(self, logits: Tensor, probs: Tensor, labels: Tensor, n_classes: int) -> Tensor:
        if n_classes == 1:
            return F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), labels.to(probs.dtype))
        if self.softmax:
            return F.cross_entropy(logits, labels[:, 0])
        # Probabilities were given: take their log directly (clamped so that a hard 0 stays finite).
        return F.nll_loss(torch.log(probs.clamp_min(1e-7)), labels[:, 0])
