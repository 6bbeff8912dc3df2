"""Preprocessing and augmentation for retinopathy grading, as MONAI dictionary transforms.

The pipeline has a deterministic part (decode, scale to [0, 1], grey to RGB, resize), which
:func:`make_dataset` can cache, and a per-sample part (random 90-degree rotations, optional
flips, ImageNet normalisation). There is deliberately no colour, brightness or contrast
augmentation: in fundus photographs the colour of lesions (red haemorrhages, yellow
exudates) carries the diagnosis, and a rotation only moves pixels without changing them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRanged,
    Transform,
)

from fewlabel.config.classification import ClassificationAugment
from fewlabel.data.images import read_image
from fewlabel.data.sampling import SeededDataset
from fewlabel.errors import DataError, FewLabelError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ReadImaged",
    "build_augment_transforms",
    "build_classification_transforms",
    "build_decode_transforms",
    "make_dataset",
    "normalization_for",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_for(weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input normalisation that matches the network's weights.

    Args:
        weights: the ``model.weights`` setting: ``"imagenet"``, ``"none"`` or a file path.

    Returns:
        ``(mean, std)`` per RGB channel: ImageNet statistics for pretrained weights (the
        network converts them internally, as torchvision does), ``0.5`` for a network
        trained from scratch (inputs in [-1, 1]).
    """
    if weights == "none":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return IMAGENET_MEAN, IMAGENET_STD


class ReadImaged(MapTransform):
    """Decode an image path (or take an array) into a channel-first RGB ``uint8`` array.

    MONAI's ``LoadImaged`` returns images transposed to (W, H) and does not accept in-memory
    arrays (``.npz`` records), so this small reader uses :func:`fewlabel.data.images.read_image`.
    Grey images are repeated to three channels because GoogLeNet takes RGB input.

    Args:
        keys: keys of the images to read.
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(self, keys: str | Sequence[str] = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Read the images of one record.

        Args:
            data: a record whose ``keys`` hold a path or an ``HxW``/``HxWxC`` ``uint8`` array.

        Returns:
            A copy of the record with ``3xHxW`` ``uint8`` arrays.

        Raises:
            DataError: if a path cannot be decoded.
            DataError: if an array has an unsupported shape.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            arr = read_image(value) if isinstance(value, (str, Path)) else np.asarray(value)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
                raise DataError(
                    None, f"image {d.get('id', key)!r} has shape {arr.shape}; expected HxW or HxWxC"
                )
            arr = arr[..., :3]
            if arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            d[key] = np.ascontiguousarray(arr.transpose(2, 0, 1))
        return d


class ResizeSquared(MapTransform):
    """Resize ``C x H x W`` images to ``S x S``: bilinear, anti-aliased when shrinking.

    MONAI's ``Resized(anti_aliasing=True)`` smooths with a Gaussian that treats the outside of
    the image as zero, which darkens its outer ring of pixels (a flat 640x480 image of 200 came
    out at 146 in the corners at 32 pixels). Colour carries the diagnosis, so this uses
    PyTorch's anti-aliased bilinear interpolation instead, which keeps a flat image flat.
    Upsampling (small images such as 28-pixel MedMNIST) is plain bilinear interpolation, as
    with MONAI's.

    Args:
        keys: keys of the images.
        size: output height and width.
    """

    def __init__(self, keys: str | Sequence[str], size: int) -> None:
        super().__init__(keys)
        self.size = size

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Resize the images of one record.

        Args:
            data: a record whose ``keys`` hold ``C x H x W`` arrays or tensors.

        Returns:
            A copy of the record with ``C x S x S`` float tensors.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key], dtype=torch.float32)
            if tuple(image.shape[-2:]) != (self.size, self.size):
                image = torch.nn.functional.interpolate(
                    image[None],
                    size=(self.size, self.size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
            d[key] = image
        return d


class _CollatableMetad(Transform):
    """Replace ``None`` metadata (e.g. a missing patient id) by ``""``: batches cannot collate ``None``."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        return {k: ("" if v is None else v) for k, v in data.items()}


class _Pipeline(Compose):
    """``Compose`` that lets fewlabel's user-facing errors through.

    MONAI wraps every exception raised inside a transform in a ``RuntimeError``; a
    :class:`~fewlabel.errors.DataError` naming a corrupt file would then reach the user as a
    long traceback. This re-raises the original error instead.
    """

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, FewLabelError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None


def build_decode_transforms(image_size: int) -> Compose:
    """Deterministic part: decode, scale to [0, 1], grey to RGB, resize to a square.

    Args:
        image_size: output height and width in pixels.

    Returns:
        A ``Compose`` mapping a record to one whose ``image`` is a ``3 x S x S`` float tensor.
    """
    return _Pipeline(
        [
            ReadImaged("image"),
            ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            ResizeSquared("image", image_size),
        ]
    )


def build_augment_transforms(
    train: bool,
    augment: ClassificationAugment,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    normalize: bool = True,
) -> Compose:
    """Per-sample part: random 90-degree rotations and flips (training only), normalisation.

    Args:
        train: apply the random augmentation (evaluation pipelines pass ``False``).
        augment: which augmentations are on.
        mean: per-channel mean subtracted from the [0, 1] image.
        std: per-channel divisor.
        normalize: ``False`` leaves the image in [0, 1] (for inspection and tests).

    Returns:
        A ``Compose`` whose output ``image`` is a float tensor and ``label`` a ``long`` tensor.
    """
    steps: list[Callable] = []
    if train and augment.rotate90:
        # Fires with probability 3/4 and then picks k in {1, 2, 3} uniformly: every rotation
        # by 0, 90, 180 or 270 degrees has probability 1/4.
        steps.append(RandRotate90d("image", prob=0.75, max_k=3, spatial_axes=(0, 1)))
    if train and augment.flip:
        steps.append(RandFlipd("image", prob=0.5, spatial_axis=1))
    if normalize:
        if mean is None or std is None:
            raise ValueError("normalisation needs both mean and std")
        steps.append(
            NormalizeIntensityd(
                "image",
                subtrahend=np.asarray(mean, dtype=np.float32),
                divisor=np.asarray(std, dtype=np.float32),
                channel_wise=True,
            )
        )
    steps += [
        EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", data_type="tensor", dtype=torch.long, track_meta=False, allow_missing_keys=True),
        _CollatableMetad(),
    ]
    return _Pipeline(steps)


def build_classification_transforms(
    image_size: int,
    train: bool,
    augment: ClassificationAugment,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    normalize: bool = True,
) -> Compose:
    """The whole pipeline: :func:`build_decode_transforms` then :func:`build_augment_transforms`.

    Args:
        image_size: network input size.
        train: add the random augmentation.
        augment: which augmentations are on.
        mean: per-channel mean (see :func:`normalization_for`).
        std: per-channel standard deviation.
        normalize: ``False`` skips normalisation (image stays in [0, 1]).

    Returns:
        A ``Compose`` mapping a record ``{"image": path or array, "label": int, ...}`` to
        ``{"image": 3xSxS float tensor, "label": long tensor, ...}``.
    """
    return _flat_compose(
        build_decode_transforms(image_size), build_augment_transforms(train, augment, mean, std, normalize)
    )


def _flat_compose(*parts: Callable | None) -> Compose:
    # CacheDataset caches up to the first random transform of a *flat* Compose; a nested
    # Compose counts as random and would disable caching.
    steps: list[Callable] = []
    for part in parts:
        if part is None:
            continue
        steps.extend(part.transforms if isinstance(part, Compose) else [part])
    return _Pipeline(steps)


def make_dataset(
    records: Sequence[dict],
    transforms_det: Callable,
    transforms_rand: Callable | None,
    cache: bool,
    seed: int | None = None,
) -> SeededDataset:
    """Wrap records in a dataset that caches the deterministic part and seeds the random part.

    Args:
        records: classification records.
        transforms_det: deterministic transforms (see :func:`build_decode_transforms`).
        transforms_rand: the rest (see :func:`build_augment_transforms`), applied every time.
        cache: keep the decoded, resized images in memory (``CacheDataset``); worth it when
            decoding large photographs dominates an epoch.
        seed: seed of the random transforms when the dataset is indexed by plain integers;
            a :class:`~fewlabel.data.sampling.ResumableSampler` instead gives every sample
            its own seed, which makes augmentations reproducible across resumes and workers.

    Returns:
        A :class:`~fewlabel.data.sampling.SeededDataset` over a MONAI ``Dataset``/``CacheDataset``.
    """
    det = _flat_compose(transforms_det)
    base: Dataset
    if cache:
        base = CacheDataset(list(records), transform=det, cache_rate=1.0, num_workers=0, progress=False)
    else:
        base = Dataset(list(records), transform=det)
    rand = _flat_compose(transforms_rand) if transforms_rand is not None else None
    if rand is not None and seed is not None:
        rand.set_random_state(seed=seed)
    return SeededDataset(base, rand)
