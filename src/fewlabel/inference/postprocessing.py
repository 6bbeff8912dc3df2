"""Post-processing of predicted label maps: connected components removed or kept per class.

Segmentation networks leave specks: a few voxels of a class far from any real lesion. Two
nnU-Net-style rules clean them on the study's own grid, after the arg-max:

- ``eval.min_component_size``: connected components of a foreground class smaller than this
  (mm³ for volumes, pixels for 2D images) become background;
- ``eval.keep_largest``: for the classes named, only the largest connected component stays
  (for structures that are one piece, e.g. one nodule per crop, an organ).

MONAI has both as transforms (``RemoveSmallObjects``, ``KeepLargestConnectedComponent``), but
they need scikit-image (or cuCIM) for the labelling; ``scipy.ndimage.label``, which fewlabel
already requires for its metrics, does the same labelling, so these functions use it instead
of adding a dependency. Components are connected through faces, edges and corners (full
connectivity): two lesion voxels that touch diagonally are one lesion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fewlabel.errors import ConfigError

__all__ = ["check_keep_largest", "keep_largest_component", "postprocess_labels", "remove_small_components"]


def remove_small_components(
    labels: np.ndarray, min_size: float, spacing: Sequence[float], classes: Sequence[int]
) -> np.ndarray:
    """Set the connected components smaller than ``min_size`` of each class to background.

    Args:
        labels: integer label map (2D or 3D).
        min_size: smallest component kept, in the units of ``spacing`` (mm³ for volumes with
            mm spacing; pixels for 2D images with spacing 1).
        spacing: size of a voxel along each axis.
        classes: label values to clean (each on its own: a small GGO component touching
            consolidation is still removed).

    Returns:
        A cleaned copy of ``labels``.
    """
    out = labels.copy()
    if min_size <= 0:
        return out
    voxel = float(np.prod(spacing))
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value in classes:
        components, count = ndimage.label(labels == value, structure=structure)
        if not count:
            continue
        sizes = np.bincount(components.ravel())[1:] * voxel
        small = np.flatnonzero(sizes < min_size) + 1
        out[np.isin(components, small)] = 0
    return out


def keep_largest_component(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component of each class given; the rest is background.

    Args:
        labels: integer label map (2D or 3D).
        classes: label values to reduce to one component each.

    Returns:
        A cleaned copy of ``labels``.
    """
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value in classes:
        components, count = ndimage.label(labels == value, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components > 0) & (components != int(sizes.argmax()))] = 0
    return out


def check_keep_largest(keep_largest: Sequence[str], classes: Sequence[str]) -> None:
    """Refuse ``eval.keep_largest`` names that are not foreground classes of the model.

    Args:
        keep_largest: the class names of ``eval.keep_largest``.
        classes: class names, index = label value (0 is background).

    Raises:
        ConfigError: naming the first unknown class and the foreground classes.
    """
    unknown = [name for name in keep_largest if name not in classes[1:]]
    if unknown:
        raise ConfigError(
            f"eval.keep_largest names {unknown[0]!r}; the foreground classes are {list(classes[1:])}"
        )


def postprocess_labels(
    labels: np.ndarray,
    classes: Sequence[str],
    spacing: Sequence[float],
    min_component_size: float = 0.0,
    keep_largest: Sequence[str] = (),
) -> np.ndarray:
    """Apply the ``eval`` post-processing rules to a predicted label map.

    Small components are removed first, then the largest of each ``keep_largest`` class is kept.

    Args:
        labels: integer label map on the study's grid.
        classes: class names, index = label value (0 is background).
        spacing: voxel size along each axis of ``labels``.
        min_component_size: ``eval.min_component_size``; 0 keeps every component.
        keep_largest: ``eval.keep_largest``, class names.

    Returns:
        The label map, cleaned (``labels`` itself when no rule applies).

    Raises:
        ConfigError: if ``keep_largest`` names background or a class the model does not have.
    """
    check_keep_largest(keep_largest, classes)
    if min_component_size <= 0 and not keep_largest:
        return labels
    if min_component_size > 0:
        labels = remove_small_components(labels, min_component_size, spacing, range(1, len(classes)))
    if keep_largest:
        labels = keep_largest_component(labels, [classes.index(name) for name in keep_largest])
    return labels
