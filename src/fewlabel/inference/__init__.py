"""Inference: whole-study prediction from a trained segmentation network, its post-processing
(connected components) and its uncertainty."""

from __future__ import annotations

from fewlabel.inference.postprocessing import postprocess_labels
from fewlabel.inference.predictor import predict_volume
from fewlabel.inference.uncertainty import mask_uncertainty

__all__ = ["mask_uncertainty", "postprocess_labels", "predict_volume"]
