"""Tests for the connected-component post-processing of predicted label maps."""

from __future__ import annotations

import numpy as np
import pytest

from fewlabel.errors import ConfigError
from fewlabel.inference.postprocessing import (
    keep_largest_component,
    postprocess_labels,
    remove_small_components,
)


def _volume() -> np.ndarray:
    labels = np.zeros((12, 10, 6), dtype=np.uint8)
    labels[1:4, 1:4, 1:3] = 1  # 18 voxels of class 1
    labels[8, 8, 4] = 1  # a speck of class 1...
    labels[9, 9, 5] = 1  # ...touching it through a corner only: one component of 2 voxels
    labels[6:8, 1:3, 1] = 2  # 4 voxels of class 2
    return labels


def test_small_components_are_measured_in_the_units_of_the_spacing():
    labels = _volume()
    # Voxels of 2 mm³: the speck is 4 mm³, the class-2 block 8 mm³, the class-1 block 36 mm³.
    cleaned = remove_small_components(labels, 5.0, (2.0, 1.0, 1.0), classes=[1, 2])
    assert cleaned[8, 8, 4] == 0 and cleaned[9, 9, 5] == 0
    assert (cleaned == 1).sum() == 18 and (cleaned == 2).sum() == 4
    cleaned = remove_small_components(labels, 10.0, (2.0, 1.0, 1.0), classes=[1, 2])
    assert (cleaned == 2).sum() == 0 and (cleaned == 1).sum() == 18
    # Only the classes given are cleaned, and the input is left as it was.
    assert (remove_small_components(labels, 10.0, (2.0, 1.0, 1.0), classes=[1]) == 2).sum() == 4
    assert (labels == 1).sum() == 20


def test_keep_largest_keeps_one_component_per_class_named():
    labels = _volume()
    labels[6, 6, 4] = 2  # a second, smaller class-2 component
    kept = keep_largest_component(labels, classes=[2])
    assert (kept == 2).sum() == 4 and kept[6, 6, 4] == 0
    assert (kept == 1).sum() == 20  # class 1 not named


def test_postprocess_labels_applies_the_eval_rules_and_checks_the_class_names():
    labels = _volume()
    classes = ["background", "ggo", "consolidation"]
    assert postprocess_labels(labels, classes, (1.0, 1.0, 1.0)) is labels
    out = postprocess_labels(labels, classes, (1.0, 1.0, 1.0), min_component_size=3, keep_largest=["ggo"])
    assert (out == 1).sum() == 18 and (out == 2).sum() == 4
    # 2D images: sizes in pixels.
    image = np.zeros((8, 8), dtype=np.uint8)
    image[0, 0] = 1
    image[3:6, 3:6] = 1
    assert (postprocess_labels(image, classes, (1.0, 1.0), min_component_size=2) == 1).sum() == 9
    with pytest.raises(ConfigError, match="eval.keep_largest names 'tumour'.*'ggo', 'consolidation'"):
        postprocess_labels(labels, classes, (1.0, 1.0, 1.0), keep_largest=["tumour"])
    with pytest.raises(ConfigError, match="'background'"):
        postprocess_labels(labels, classes, (1.0, 1.0, 1.0), keep_largest=["background"])
