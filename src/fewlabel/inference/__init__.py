"""Inference: whole-study prediction from a trained segmentation network."""

from __future__ import annotations

from fewlabel.inference.predictor import predict_volume

__all__ = ["predict_volume"]
