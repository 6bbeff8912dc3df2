"""MONAI preprocessing and augmentation pipelines for segmentation.

Preprocessing is deterministic and invertible: ``monai.transforms.Invertd`` with the returned
``Compose`` maps a prediction back onto the source voxel grid (orientation, spacing and
foreground crop are undone), which is how predictions are written next to the original study.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandAffineGrid,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)
from monai.utils import ImageMetaKey, ensure_tuple

from fewlabel.config.segmentation import Preprocess, SegmentationAugment
from fewlabel.data.readers import AFFINE_TOLERANCE, FewLabelReader, check_grid
from fewlabel.errors import ConfigError, FewLabelError

__all__ = [
    "LoadStudyd",
    "StudyCompose",
    "ValidatePaird",
    "build_preprocessing",
    "build_train_augmentation",
    "foreground_threshold",
    "raise_fewlabel_cause",
]


def raise_fewlabel_cause(err: BaseException) -> None:
    """Re-raise the :class:`~fewlabel.errors.FewLabelError` that caused ``err``, if any.

    MONAI wraps every exception raised inside a transform chain into
    ``RuntimeError("applying transform ...")``; the user-facing error with its clear message
    is further down the ``__cause__`` chain.

    Args:
        err: the caught exception.

    Raises:
        FewLabelError: the first one found in the cause chain.
    """
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, FewLabelError):
            raise cause
        cause = cause.__cause__


class StudyCompose(Compose):
    """``Compose`` that lets :class:`~fewlabel.errors.FewLabelError` through unwrapped.

    A corrupt file must reach the command line as a one-line message naming the file, not as a
    ``RuntimeError`` traceback from inside MONAI.
    """

    def __call__(
        self,
        input_: Any,
        start: int = 0,
        end: int | None = None,
        threading: bool = False,
        lazy: bool | None = None,
    ) -> Any:
        """Apply the transforms (see ``monai.transforms.Compose``).

        Args:
            input_: the record.
            start: first transform to apply.
            end: stop before this transform.
            threading: passed to MONAI (set by ``CacheDataset``).
            lazy: passed to MONAI.

        Returns:
            The transformed record.

        Raises:
            FewLabelError: from any transform, unwrapped.
        """
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as err:
            raise_fewlabel_cause(err)
            raise


class LoadStudyd(MapTransform):
    """Load studies with a :class:`FewLabelReader` into ``MetaTensor`` objects.

    Does what ``LoadImaged(keys, reader=FewLabelReader(), image_only=True)`` does, with two
    differences: ``LoadImaged`` catches the errors of the reader it was given and silently
    retries with MONAI's default readers (which would read a NaN-filled or mislabelled file
    without complaint, hiding the :class:`~fewlabel.errors.DataError`), and it instantiates all
    default readers each time it is built, some of which log warnings about optional GPU codecs.

    Args:
        keys: keys holding paths to load.
        reader: the reader (a new image reader by default).
        dtype: array type after loading (``None`` keeps the reader's).
        allow_missing_keys: skip keys absent from the record.
    """

    def __init__(
        self,
        keys: Any,
        reader: FewLabelReader | None = None,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reader = reader or FewLabelReader()
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        """Replace each path by the loaded ``MetaTensor`` (no channel axis yet).

        Args:
            data: a record of paths.

        Returns:
            The record with loaded studies; ``meta["filename_or_obj"]`` names the source.

        Raises:
            DataError: for unreadable or invalid studies.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            array, meta = self.reader.get_data(self.reader.read(path))
            if self.dtype is not None:
                array = np.asarray(array).astype(self.dtype, copy=False)
            meta[ImageMetaKey.FILENAME_OR_OBJ] = str(ensure_tuple(path)[0])
            d[key] = MetaTensor.ensure_torch_and_prune_meta(array, meta)
        return d


class ValidatePaird(MapTransform):
    """Reject a label that is not on its image's voxel grid (different shape or affine).

    Runs right after loading, before any resampling could hide the mismatch. The error names
    both files with their shapes and spacings.

    Args:
        image_key: key of the image.
        label_key: key of the label.
        atol: affine tolerance in mm.
    """

    def __init__(
        self, image_key: str = "image", label_key: str = "label", atol: float = AFFINE_TOLERANCE
    ) -> None:
        super().__init__([image_key, label_key])
        self.image_key, self.label_key, self.atol = image_key, label_key, atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        """Check the pair and return the record unchanged.

        Args:
            data: record with loaded, channel-first image and label.

        Returns:
            ``data`` as a dict.

        Raises:
            DataError: on a shape or affine mismatch.
        """
        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        check_grid(
            image.meta.get("filename_or_obj"),
            image.shape[1:],
            _np(image.affine),
            label.meta.get("filename_or_obj"),
            label.shape[1:],
            _np(label.affine),
            self.atol,
        )
        return d


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _body(x: torch.Tensor | np.ndarray, threshold: float | None = None) -> torch.Tensor | np.ndarray:
    """Voxels above ``threshold`` (non-zero without one), or all of them if there are none.

    MONAI's ``CropForegroundd`` crops a study with nothing selected to zero voxels, on which
    every network fails; a study of air (or an all-black image) is kept whole instead.
    """
    mask = x != 0 if threshold is None else x > threshold
    if mask.any():
        return mask
    return torch.ones_like(mask) if isinstance(mask, torch.Tensor) else np.ones_like(mask)


def foreground_threshold(pre: Preprocess) -> float | None:
    """Intensity above which a preprocessed voxel counts as body (for foreground cropping).

    Args:
        pre: preprocessing options.

    Returns:
        The threshold on the preprocessed intensity, or ``None`` for MR (non-zero voxels).
    """
    if pre.modality == "ct":
        # Air is at the bottom of the window with noise of some tens of HU; 5% of the window
        # above its floor excludes that noise and keeps the body outline (and so the lungs).
        return 0.05
    if pre.modality == "image":
        return 0.05
    return None


def build_preprocessing(
    pre: Preprocess,
    with_label: bool,
    spatial_dims: int,
    num_classes: int | None = None,
    label_dtype: torch.dtype = torch.long,
    keys: Sequence[str] = ("image", "label"),
) -> Compose:
    """Deterministic, invertible loading and preprocessing of segmentation records.

    Load (:class:`LoadStudyd`), channel first, check the label's grid, reorient to
    ``pre.orientation`` (3D), resample to ``pre.spacing`` (3D; bilinear image, nearest label),
    scale intensities (CT: window to [0, 1], clipped; MR: z-score over non-zero voxels; image:
    0..255 to [0, 1]), optionally crop to the foreground, and cast the label to an integer type.

    Args:
        pre: preprocessing options.
        with_label: records carry a ``label`` path to load too.
        spatial_dims: 3 for volumes, 2 for 2D slices (no reorientation or resampling: 2D images
            carry no physical geometry).
        num_classes: reject label values ``>= num_classes`` while loading.
        label_dtype: integer type of the preprocessed label (``torch.uint8`` saves memory when
            caching many volumes).
        keys: names of the image and label keys.

    Returns:
        A ``Compose`` usable with ``monai.transforms.Invertd``; data errors raised inside it
        reach the caller as :class:`~fewlabel.errors.DataError`, not wrapped by MONAI.

    Raises:
        ConfigError: if ``spatial_dims`` is not 2 or 3.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    image_key, label_key = keys[0], keys[1]
    all_keys = [image_key, label_key] if with_label else [image_key]
    interp = ["bilinear", "nearest"] if with_label else ["bilinear"]
    transforms: list[Any] = [LoadStudyd(image_key, reader=FewLabelReader())]
    if with_label:
        transforms.append(LoadStudyd(label_key, reader=FewLabelReader(label=True, num_classes=num_classes)))
    transforms.append(EnsureChannelFirstd(all_keys, channel_dim="no_channel"))
    if with_label:
        transforms.append(ValidatePaird(image_key, label_key))
    if spatial_dims == 3:
        if pre.orientation:
            transforms.append(Orientationd(all_keys, axcodes=pre.orientation, labels=None))
        if pre.spacing is not None:
            transforms.append(Spacingd(all_keys, pixdim=pre.spacing, mode=interp))
    if pre.modality == "ct":
        low, high = pre.window
        transforms.append(
            ScaleIntensityRanged(image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        )
    elif pre.modality == "mr":
        transforms.append(NormalizeIntensityd(image_key, nonzero=True, channel_wise=True))
    else:
        transforms.append(
            ScaleIntensityRanged(image_key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
        )
    if pre.crop_foreground:
        threshold = foreground_threshold(pre)
        select = functools.partial(_body, threshold=threshold)
        transforms.append(
            CropForegroundd(
                all_keys,
                source_key=image_key,
                select_fn=select,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    if with_label:
        transforms.append(CastToTyped(label_key, dtype=label_dtype))
    return StudyCompose(transforms)


def build_train_augmentation(
    aug: SegmentationAugment,
    spatial_dims: int,
    keys: Sequence[str] = ("image", "label"),
    axis: int = 2,
) -> Compose:
    """Random in-plane augmentation of training samples (image and label alike).

    Rotations by k·90° and flips act in the acquisition plane only: through-plane spacing is
    usually much coarser, so rotating it into the plane would create unrealistic images.
    Intensity changes (small scale and shift) touch the image only. The optional zoom and
    small-angle rotation (``aug.scale``, ``aug.rotate_degrees``) are one MONAI ``RandAffined``,
    also in-plane; the label is resampled by nearest neighbour and keeps its dtype, and what
    moves in from outside the slice is zero (air after CT windowing, black in 2D images).

    Args:
        aug: augmentation options.
        spatial_dims: 2 for slices/slabs ``(C, H, W)``, 3 for patches ``(C, X, Y, Z)``.
        keys: image key first, then the label key if present (missing keys are allowed, so the
            same pipeline serves unlabelled samples).
        axis: for 3D patches, the through-plane axis (the other two are rotated/flipped).

    Returns:
        A ``Compose`` of MONAI random transforms (an empty one when everything is off).
        In-plane rotation by 90° swaps height and width: use square slices or patches.
    """
    keys = list(keys)
    if spatial_dims == 2:
        plane = (0, 1)
    elif spatial_dims == 3:
        plane = tuple(a for a in range(3) if a != axis)
    else:
        raise ConfigError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    transforms: list[Any] = []
    if aug.rotate90:
        transforms.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=plane, allow_missing_keys=True))
    if aug.flip:
        for a in plane:
            transforms.append(RandFlipd(keys, prob=0.5, spatial_axis=a, allow_missing_keys=True))
    if aug.intensity:
        transforms.append(RandScaleIntensityd(keys[0], factors=0.1, prob=0.5))
        transforms.append(RandShiftIntensityd(keys[0], offsets=0.05, prob=0.5))
    if aug.scale > 0 or aug.rotate_degrees > 0:
        transforms.append(_in_plane_affine(aug, spatial_dims, plane, keys))
    return Compose(transforms)


class _RandAffineKeepDtyped(RandAffined):
    """``RandAffined`` that hands each key back in the dtype it came in.

    Nearest-neighbour resampling returns float32; a compact uint8 label would then take four
    times the memory and fail the integer checks downstream.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict:
        dtypes = {key: data[key].dtype for key in self.key_iterator(dict(data))}
        out = super().__call__(data, lazy=lazy)
        for key, dtype in dtypes.items():
            value = out[key]
            if value.dtype != dtype:
                out[key] = value.round().to(dtype) if not dtype.is_floating_point else value.to(dtype)
        return out


class _InPlaneZoomGrid(RandAffineGrid):
    """``RandAffineGrid`` with one zoom for both in-plane axes, drawn as a magnification.

    MONAI draws a scale per axis, which would stretch round lesions into ellipses, and scales
    the sampling grid, so that a factor ``s`` magnifies the image by ``1 / s``. Here one
    magnification ``m`` is drawn from ``[1 - zoom, 1 + zoom]`` and the grid is scaled by
    ``1 / m`` in-plane; the through-plane axis is not scaled.
    """

    def __init__(
        self, zoom: float, plane: tuple[int, ...], spatial_dims: int, rotate_range: list[float]
    ) -> None:
        super().__init__(rotate_range=rotate_range)
        self.zoom = zoom
        self.plane = plane
        self.spatial_dims = spatial_dims

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(data)
        magnification = 1.0 + self.R.uniform(-self.zoom, self.zoom) if self.zoom > 0 else 1.0
        self.scale_params = [
            1.0 / magnification if a in self.plane else 1.0 for a in range(self.spatial_dims)
        ]


def _in_plane_affine(
    aug: SegmentationAugment, spatial_dims: int, plane: tuple[int, ...], keys: list[str]
) -> RandAffined:
    """Zoom and small rotation in the acquisition plane, as one resampling.

    Args:
        aug: augmentation options (``scale`` and ``rotate_degrees``).
        spatial_dims: 2 or 3.
        plane: the in-plane spatial axes.
        keys: image key first, then the label key if present.

    Returns:
        The transform; in 3D the through-plane axis is neither rotated about another axis nor
        zoomed.
    """
    angle = float(np.deg2rad(aug.rotate_degrees))
    if spatial_dims == 2:
        rotate_range: list[float] = [angle]
    else:
        # MONAI's 3D angles turn about spatial axes 0, 1 and 2: an in-plane turn is one about
        # the through-plane axis.
        through = next(a for a in range(3) if a not in plane)
        rotate_range = [angle if a == through else 0.0 for a in range(3)]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    transform = _RandAffineKeepDtyped(
        keys, prob=0.5, mode=modes, padding_mode="zeros", allow_missing_keys=True
    )
    transform.rand_affine.rand_affine_grid = _InPlaneZoomGrid(aug.scale, plane, spatial_dims, rotate_range)
    return transform
