"""fewlabel: medical-imaging models from few annotations.

Two pipelines share one framework: diabetic-retinopathy grading by GoogLeNet transfer
learning, and semi-supervised CT segmentation with a transformation-consistent
mean teacher (TCSM).
"""

from __future__ import annotations

__version__ = "0.1.0"
