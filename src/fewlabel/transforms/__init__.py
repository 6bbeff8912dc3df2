"""Tensor transforms used inside training steps (not data-loading transforms)."""

from __future__ import annotations

from fewlabel.transforms.consistency import InPlaneTransform, apply_per_sample, sample_transforms
from fewlabel.transforms.mixup import mixup_batch

__all__ = ["InPlaneTransform", "apply_per_sample", "mixup_batch", "sample_transforms"]
