"""Consistency loss between the student's and the teacher's segmentation maps.

MONAI has no loss that compares two predicted probability maps with a detached target, so
this small module does; it follows the mean-teacher ``softmax_mse_loss`` / ``softmax_kl_loss``
but averages over every element, which keeps the loss scale independent of image size. The
``ce`` kind is FixMatch's confidence-masked pseudo-label loss (Sohn et al., NeurIPS 2020) with
the EMA teacher as the labeller; MONAI's losses take no per-voxel mask, hence it is here too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConsistencyLoss"]


class ConsistencyLoss(nn.Module):
    """Distance between student and teacher class-probability maps.

    The teacher side is a target: it is detached, so no gradient reaches the teacher.
    Outputs with one channel are binary logits and use a sigmoid instead of a softmax.

    Args:
        kind: ``"mse"``: mean over all elements of the squared difference of the probability
            maps; ``"kl"``: KL(teacher ‖ student), summed over classes and averaged over the
            batch and the voxels; ``"ce"``: cross-entropy of the student against the teacher's
            most probable class, counted only where the teacher's probability of that class
            reaches ``threshold`` and averaged over all voxels (so an unsure teacher weighs
            less, as in FixMatch).
        threshold: confidence the teacher needs for a voxel to count, ``ce`` only.

    Attributes:
        last_counted: with ``ce``, the share of voxels the last call counted (detached);
            ``None`` for the other kinds.

    Raises:
        ValueError: for an unknown ``kind`` or a threshold outside [0, 1).
    """

    def __init__(self, kind: Literal["mse", "kl", "ce"] = "mse", threshold: float = 0.95) -> None:
        super().__init__()
        if kind not in ("mse", "kl", "ce"):
            raise ValueError(f"consistency loss must be 'mse', 'kl' or 'ce', got {kind!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"consistency threshold must be in [0, 1), got {threshold}")
        self.kind = kind
        self.threshold = threshold
        self.last_counted: Tensor | None = None

    def forward(self, student_logits_transformed: Tensor, teacher_logits: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            student_logits_transformed: student logits ``(N, K, ...)``, already mapped by T.
            teacher_logits: teacher logits on the transformed input, same shape.

        Returns:
            A scalar tensor (float32 even under autocast).

        Raises:
            ValueError: if the shapes differ.
        """
        if student_logits_transformed.shape != teacher_logits.shape:
            raise ValueError(
                f"student {tuple(student_logits_transformed.shape)} and teacher "
                f"{tuple(teacher_logits.shape)} outputs differ in shape"
            )
        # Softmax and the reduction in float32: under autocast half-precision sums lose the signal.
        student = student_logits_transformed.float()
        teacher = teacher_logits.detach().float()
        if self.kind == "ce":
            return self._pseudo_label_ce(student, teacher)
        if student.shape[1] == 1:
            if self.kind == "mse":
                return F.mse_loss(student.sigmoid(), teacher.sigmoid())
            # Binary KL(teacher || student) from logits: BCE(teacher as target) minus teacher entropy.
            p = teacher.sigmoid()
            cross = F.binary_cross_entropy_with_logits(student, p, reduction="none")
            entropy = F.binary_cross_entropy_with_logits(teacher, p, reduction="none")
            return (cross - entropy).mean()
        if self.kind == "mse":
            return F.mse_loss(F.softmax(student, dim=1), F.softmax(teacher, dim=1))
        kl = F.kl_div(
            F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="none", log_target=True
        )
        return kl.sum(dim=1).mean()

    def _pseudo_label_ce(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape[1] == 1:
            p = teacher.sigmoid()
            confidence = torch.maximum(p, 1 - p)
            ce = F.binary_cross_entropy_with_logits(student, (p > 0.5).to(student.dtype), reduction="none")
        else:
            confidence, pseudo = F.softmax(teacher, dim=1).max(dim=1, keepdim=True)
            ce = F.cross_entropy(student, pseudo[:, 0], reduction="none").unsqueeze(1)
        counted = confidence >= self.threshold
        self.last_counted = counted.float().mean().detach()
        return (ce * counted).mean()
