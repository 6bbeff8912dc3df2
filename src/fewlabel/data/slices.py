"""Training samples from preprocessed studies: 2D slices, 2.5D slabs and 3D patches.

Volumes are preprocessed once (MONAI ``CacheDataset``) and samples are cut from them:

- ``2d``: one slice along ``input.axis``, ``(C, H, W)``;
- ``2.5d``: ``slab`` adjacent slices stacked as channels, ``(C·slab, H, W)``, centred on the
  slice whose label is predicted; at the volume's edges the border slice is repeated;
- ``3d``: random patches of ``input.patch_size``, a share ``foreground_ratio`` of them centred
  on foreground (MONAI ``RandCropByPosNegLabeld``).

2D image datasets (``slices2d``) are volumes of a single slice, ``(C, H, W)``; only the ``2d``
mode applies to them.

Random choices (foreground sampling, crops, augmentation) draw their seeds from torch's global
generator, which ``seed_everything`` seeds and the ``DataLoader`` reseeds per worker, so runs are
reproducible and workers do not repeat each other's augmentations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, RandCropByPosNegLabeld, RandSpatialCropd, Resize, SpatialPadd

from fewlabel.config.segmentation import SegmentationExperiment
from fewlabel.data.images import is_image_file
from fewlabel.data.readers import is_volume_path
from fewlabel.data.segmentation_transforms import build_preprocessing, build_train_augmentation
from fewlabel.errors import ConfigError, DataError

__all__ = [
    "PatchDataset",
    "SliceDataset",
    "build_training_dataset",
    "build_volume_dataset",
    "extract_slab",
    "records_spatial_dims",
    "volume_to_samples",
]

log = logging.getLogger(__name__)


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor view (MONAI ``MetaTensor`` carries metadata that samples do not need)."""
    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(x)


def _as_long(x: Any) -> torch.Tensor:
    x = _plain(x)
    if x.is_floating_point():
        x = x.round()  # labels resampled or rotated as floats come back exactly integral
    return x.long().contiguous()


def _seed_from_torch() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def extract_slab(volume: torch.Tensor, index: int, slab: int, axis: int) -> torch.Tensor:
    """Cut ``slab`` adjacent slices centred on ``index`` and stack them as channels.

    Args:
        volume: ``(C, X, Y, Z)`` tensor (or ``(C, H, W)`` for a single 2D slice, then ``slab``
            must be 1).
        index: centre slice along ``axis``.
        slab: number of slices (odd).
        axis: spatial axis to slice along (0, 1 or 2).

    Returns:
        ``(C·slab, H, W)`` where ``H, W`` are the two other spatial axes in order; channel
        ``c·slab + j`` is channel ``c`` of slice ``index - slab//2 + j``, slices beyond the edges
        repeating the border slice.

    Raises:
        ValueError: for an even ``slab``, an index outside the volume or a wrong ``volume`` rank.
    """
    if slab < 1 or slab % 2 == 0:
        raise ValueError(f"slab must be a positive odd number, not {slab}")
    if volume.ndim == 3:
        if slab != 1 or index != 0:
            raise ValueError("a 2D slice (C, H, W) has one slice: slab and index must be 1 and 0")
        return volume
    if volume.ndim != 4:
        raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, not {axis}")
    n = volume.shape[axis + 1]
    if not 0 <= index < n:
        raise ValueError(f"slice index {index} outside 0..{n - 1}")
    half = slab // 2
    idx = torch.arange(index - half, index + half + 1).clamp_(0, n - 1).to(volume.device)
    picked = torch.index_select(volume, axis + 1, idx)  # (C, ..., slab, ...)
    picked = torch.movedim(picked, axis + 1, 1)  # (C, slab, H, W)
    return picked.reshape(volume.shape[0] * slab, *picked.shape[2:])


def _num_slices(volume: torch.Tensor, axis: int) -> int:
    return 1 if volume.ndim == 3 else int(volume.shape[axis + 1])


def _slice_label(label: torch.Tensor, index: int, axis: int) -> torch.Tensor:
    return extract_slab(label, index, 1, axis)


def volume_to_samples(
    volume: torch.Tensor, label: torch.Tensor | None, mode: str, slab: int, axis: int
) -> list[dict]:
    """Every slice of a volume as a 2D or 2.5D sample (e.g. to predict a whole volume).

    Args:
        volume: ``(C, X, Y, Z)`` image (or ``(C, H, W)`` single slice).
        label: ``(1, X, Y, Z)`` label or ``None``.
        mode: ``2d`` or ``2.5d``.
        slab: slices per 2.5D sample (ignored in ``2d``).
        axis: slicing axis.

    Returns:
        ``[{"image": (C·k, H, W), "label": (1, H, W), "slice": i}, ...]`` in slice order (no
        ``label`` key when ``label`` is ``None``).

    Raises:
        ConfigError: for ``3d`` mode.
    """
    k = _slab_for(mode, slab)
    out = []
    for i in range(_num_slices(volume, axis)):
        sample: dict[str, Any] = {"image": extract_slab(volume, i, k, axis), "slice": i}
        if label is not None:
            sample["label"] = _slice_label(label, i, axis)
        out.append(sample)
    return out


def _slab_for(mode: str, slab: int) -> int:
    if mode == "2d":
        return 1
    if mode == "2.5d":
        return slab
    raise ConfigError(f"slice samples need input.mode 2d or 2.5d, not {mode!r}")


class SliceDataset(torch.utils.data.Dataset):
    """2D / 2.5D samples cut from preprocessed volumes.

    ``len()`` is the total number of slices; item ``i`` is slice ``i`` in (volume, slice) order,
    except that with ``foreground_ratio > 0`` a random foreground slice is drawn with that
    probability and a background slice otherwise, so the share of samples showing foreground is
    ``foreground_ratio`` regardless of how rare lesions are.

    Args:
        volumes: sequence of dicts with ``image`` ``(C, X, Y, Z)`` (or ``(C, H, W)``) and, for
            labelled data, ``label`` tensors; e.g. a ``CacheDataset`` of preprocessed records.
            Items are read on each access, so it should hold them in memory.
        mode: ``2d`` or ``2.5d``.
        slab: slices per 2.5D sample.
        axis: slicing axis.
        slice_size: resize slices to ``(H, W)`` (bilinear image, nearest label); ``None`` keeps them.
        foreground_ratio: probability of drawing a slice with foreground (labelled data only).
        transform: augmentation applied to each sample dict (MONAI random transforms).
        labeled: whether to return labels (``None``: when the first volume has a ``label``).
        single_slice: every item is one 2D slice ``(C, H, W)``; then volumes are not read at
            construction unless foreground sampling needs their labels.

    Raises:
        DataError: if labelled volumes lack a label or image and label slices differ in shape.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        mode: str = "2d",
        slab: int = 1,
        axis: int = 2,
        slice_size: Sequence[int] | None = None,
        foreground_ratio: float = 0.0,
        transform: Callable | None = None,
        labeled: bool | None = None,
        single_slice: bool = False,
    ) -> None:
        self.volumes = volumes
        self.k = _slab_for(mode, slab)
        self.axis = axis
        self.transform = transform
        self.foreground_ratio = float(foreground_ratio)
        self.slice_size = tuple(int(x) for x in slice_size) if slice_size else None
        self.single_slice = single_slice
        self._resize_image = Resize(tuple(slice_size), mode="bilinear") if slice_size else None
        self._resize_label = Resize(tuple(slice_size), mode="nearest-exact") if slice_size else None
        self.index: list[tuple[int, int]] = []
        fg: list[int] = []
        if single_slice and labeled is not None and not (labeled and self.foreground_ratio > 0):
            # One slice per item and nothing to learn from the labels: no need to read them now.
            self.index = [(v, 0) for v in range(len(volumes))]
        else:
            for v in range(len(volumes)):
                item = volumes[v]
                if labeled is None:
                    labeled = item.get("label") is not None
                fg.extend(self._add_volume(v, item, labeled))
        self.labeled = bool(labeled)
        self.foreground = fg
        fg_set = set(fg)
        self.background = [i for i in range(len(self.index)) if i not in fg_set]
        self._background_set = set(self.background)

    def _add_volume(self, v: int, item: Mapping[str, Any], labeled: bool) -> list[int]:
        """Index the slices of volume ``v``; return the dataset indices of its foreground slices."""
        image = _plain(item["image"])
        label = item.get("label") if labeled else None
        if labeled and label is None:
            raise DataError(_source(item), "labelled volume without a label")
        if label is not None:
            label = _plain(label)
            if label.shape[1:] != image.shape[1:]:
                raise DataError(
                    _source(item), f"label shape {tuple(label.shape)} != image {tuple(image.shape)}"
                )
        if self.k > 1 and image.ndim == 3:
            raise ConfigError("2.5D slabs need volumes; 2D images give single slices (use input.mode: 2d)")
        n = _num_slices(image, self.axis)
        start = len(self.index)
        self.index.extend((v, s) for s in range(n))
        if label is None or self.foreground_ratio <= 0:
            return []
        if label.ndim == 3:
            has = [bool((label > 0).any())]
        else:
            other = tuple(d for d in range(label.ndim) if d != self.axis + 1)
            has = (label > 0).any(dim=other).tolist()
        if self._resize_label is not None:
            # Judged as the network will see the slice: shrinking it to slice_size can drop a
            # lesion of a pixel or two, and a "foreground" draw would then be empty.
            plain = _plain(label)
            has = [
                bool(h) and bool((self._resize_label(_slice_label(plain, s, self.axis).float()) > 0).any())
                for s, h in enumerate(has)
            ]
        return [start + s for s in range(n) if has[s]]

    def __len__(self) -> int:
        return len(self.index)

    def slice_sizes(self) -> dict[tuple[int, ...], Any] | None:
        """The in-plane sizes of the samples, each with the first study that has it.

        Returns:
            ``{(H, W): source}``: one entry, with source ``None``, when slices are resized to
            ``slice_size``; otherwise one per distinct size among the studies in memory.
            ``None`` for 2D images read on each access: reading them all would cost a pass
            over the data (their headers tell the sizes, see
            :func:`fewlabel.data.images.image_size`).
        """
        if self.slice_size is not None:
            return {self.slice_size: None}
        if self.single_slice:
            return None
        sizes: dict[tuple[int, ...], Any] = {}
        for v in range(len(self.volumes)):
            item = self.volumes[v]
            sizes.setdefault(_slice_plane(item, self.axis), _source(item))
        return sizes

    def volume_of(self, i: int) -> int:
        """Index in ``volumes`` of the volume that sample ``i`` is cut from.

        Args:
            i: index in ``range(len(self))``.

        Returns:
            The volume index.
        """
        return self.index[i][0]

    def _pick(self, i: int) -> int:
        if not (self.labeled and self.foreground_ratio > 0 and self.foreground):
            return i
        if float(torch.rand(())) < self.foreground_ratio:
            return self.foreground[int(torch.randint(len(self.foreground), ()))]
        if not self.background or i in self._background_set:
            return i
        return self.background[int(torch.randint(len(self.background), ()))]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i`` (or a foreground/background draw, see the class docs).

        Args:
            i: index in ``range(len(self))``.

        Returns:
            ``{"image": float (C·k, H, W), "label": long (1, H, W), "slice": int, "id": str}``
            (``label`` only for labelled data).
        """
        v, s = self.index[self._pick(int(i))]
        item = self.volumes[v]
        image = extract_slab(_plain(item["image"]), s, self.k, self.axis).float()
        sample: dict[str, Any] = {"image": image}
        if self.labeled:
            sample["label"] = _slice_label(_plain(item["label"]), s, self.axis)
        if self._resize_image is not None:
            sample["image"] = _plain(self._resize_image(sample["image"]))
            if self.labeled:
                sample["label"] = _plain(self._resize_label(sample["label"].float()))
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=_seed_from_torch())
            sample = dict(self.transform(sample))
        sample["image"] = _plain(sample["image"]).float().contiguous()
        if self.labeled:
            sample["label"] = _as_long(sample["label"])
        sample["slice"] = s
        sample["id"] = str(item.get("id", v))
        return sample


def _slice_plane(item: Mapping[str, Any], axis: int) -> tuple[int, ...]:
    """In-plane size of the slices of a 2D image ``(C, H, W)`` or volume ``(C, X, Y, Z)``."""
    image = _plain(item["image"])
    if image.ndim == 3:
        return tuple(image.shape[1:])
    return tuple(s for a, s in enumerate(image.shape[1:]) if a != axis)


def _check_square_slices(volumes: Sequence[Mapping[str, Any]], axis: int) -> None:
    """Refuse quarter turns of non-square slices, which would batch H x W with W x H.

    Raises:
        ConfigError: naming the first study whose slices are not square.
    """
    for item in volumes:
        plane = _slice_plane(item, axis)
        if plane[0] != plane[1]:
            raise ConfigError(
                f"augment.rotate90 turns slices by quarter turns, but the slices of {_source(item)} are "
                f"{plane[0]}x{plane[1]}: odd turns would batch them with {plane[1]}x{plane[0]} ones; set "
                "preprocess.slice_size to a square size, augment.rotate90: false, or batches of one slice "
                "(train.batch_size: 1, and tcsm.unlabeled_batch_size: 1 with TCSM)"
            )


def _source(item: Mapping[str, Any]) -> Any:
    image = item.get("image")
    meta = getattr(image, "meta", None)
    return meta.get("filename_or_obj") if meta else item.get("id")


class PatchDataset(torch.utils.data.Dataset):
    """Random 3D patches from preprocessed volumes, ``patches_per_volume`` per volume and visit.

    MONAI's own ``PatchDataset`` is an iterable dataset (no shuffling, no samplers); this one
    is map-style: item ``i`` is a fresh random patch of volume ``i // patches_per_volume``.

    Args:
        volumes: sequence of dicts with ``image`` ``(C, X, Y, Z)`` and optionally ``label``.
        patch_size: patch size; smaller volumes are padded (image with 0, label background).
        patches_per_volume: patches drawn per volume.
        foreground_ratio: share of patches centred on a foreground voxel (labelled data).
        transform: augmentation applied to each patch dict.
        labeled: whether to crop with the label (``None``: when the first volume has one).
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        patch_size: Sequence[int],
        patches_per_volume: int = 1,
        foreground_ratio: float = 0.5,
        transform: Callable | None = None,
        labeled: bool | None = None,
    ) -> None:
        self.volumes = volumes
        self.patches_per_volume = int(patches_per_volume)
        self.transform = transform
        if labeled is None:
            labeled = len(volumes) > 0 and volumes[0].get("label") is not None
        self.labeled = bool(labeled)
        keys = ["image", "label"] if self.labeled else ["image"]
        size = tuple(int(s) for s in patch_size)
        if self.labeled:
            ratio = float(foreground_ratio)
            crop: Any = RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=size, pos=ratio, neg=1.0 - ratio, num_samples=1
            )
        else:
            crop = RandSpatialCropd(keys, roi_size=size, random_size=False)
        self.sampler = Compose([SpatialPadd(keys, spatial_size=size), crop])

    def __len__(self) -> int:
        return len(self.volumes) * self.patches_per_volume

    def volume_of(self, i: int) -> int:
        """Index in ``volumes`` of the volume that sample ``i`` is cut from.

        Args:
            i: index in ``range(len(self))``.

        Returns:
            The volume index.
        """
        return int(i) // self.patches_per_volume

    def __getitem__(self, i: int) -> dict[str, Any]:
        """A random patch of volume ``i // patches_per_volume``.

        Args:
            i: index in ``range(len(self))``.

        Returns:
            ``{"image": float (C, *patch_size), "label": long (1, *patch_size), "id": str}``
            (``label`` only for labelled data).
        """
        item = self.volumes[int(i) // self.patches_per_volume]
        sample: dict[str, Any] = {"image": _plain(item["image"]).float()}
        if self.labeled:
            sample["label"] = _plain(item["label"])
        self.sampler.set_random_state(seed=_seed_from_torch())
        out = self.sampler(sample)
        sample = dict(out[0] if isinstance(out, list) else out)
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=_seed_from_torch())
            sample = dict(self.transform(sample))
        result: dict[str, Any] = {"image": _plain(sample["image"]).float().contiguous()}
        if self.labeled:
            result["label"] = _as_long(sample["label"])
        result["id"] = str(item.get("id", int(i) // self.patches_per_volume))
        return result


def records_spatial_dims(records: Sequence[Mapping[str, Any]]) -> int:
    """Whether records hold 2D images (2) or volumes (3).

    Args:
        records: datalist records with an ``image`` path.

    Returns:
        2 or 3.

    Raises:
        DataError: if the records mix 2D images and volumes, or a path is neither.
    """
    first: dict[int, Any] = {}
    for rec in records:
        path = rec["image"]
        if is_image_file(path):
            first.setdefault(2, path)
        elif is_volume_path(path):
            first.setdefault(3, path)
        else:
            raise DataError(path, "neither a 2D image nor a volume (NIfTI file or DICOM folder)")
    if len(first) > 1:
        raise DataError(
            None,
            f"the datalist mixes 2D images (e.g. {first[2]}) and 3D volumes (e.g. {first[3]}); "
            "use one kind per experiment",
        )
    return next(iter(first)) if first else 3


def _clean_records(records: Sequence[Mapping[str, Any]], labeled: bool) -> list[dict]:
    out = []
    for rec in records:
        rec = dict(rec)
        if labeled:
            if not rec.get("label"):
                raise DataError(rec.get("image"), "record has no label but labelled data was requested")
        else:
            rec.pop("label", None)
        out.append(rec)
    return out


def build_volume_dataset(
    records: Sequence[Mapping[str, Any]],
    cfg: SegmentationExperiment,
    with_label: bool = True,
    classes: Sequence[str] | None = None,
    cache: bool | None = None,
    label_dtype: torch.dtype = torch.long,
) -> torch.utils.data.Dataset:
    """Preprocessed whole studies (for validation, sliding-window inference and slicing).

    Args:
        records: datalist records.
        cfg: the experiment (``preprocess``, ``data.cache``, ``data.num_workers``).
        with_label: load labels too.
        classes: class names for the label-range check (default ``cfg.data.classes``).
        cache: override ``cfg.data.cache``.
        label_dtype: integer type of the labels.

    Returns:
        A MONAI ``CacheDataset`` (or ``Dataset``) of dicts with ``MetaTensor`` ``image``
        ``(C, ...)`` and ``label`` ``(1, ...)``, plus the record's other keys; invertible with
        ``Invertd`` and the ``transform`` attribute.
    """
    recs = _clean_records(records, with_label)
    spatial_dims = records_spatial_dims(recs)
    classes = classes if classes is not None else cfg.data.classes
    transform = build_preprocessing(
        cfg.preprocess,
        with_label=with_label,
        spatial_dims=spatial_dims,
        num_classes=None if classes is None else len(classes),
        label_dtype=label_dtype,
    )
    use_cache = cfg.data.cache if cache is None else cache
    if use_cache:
        return CacheDataset(
            recs,
            transform=transform,
            cache_rate=1.0,
            num_workers=max(1, cfg.data.num_workers),
            progress=False,
            copy_cache=False,
        )
    return MonaiDataset(recs, transform=transform)


def build_training_dataset(
    records: Sequence[Mapping[str, Any]],
    cfg: SegmentationExperiment,
    train: bool,
    labeled: bool = True,
    classes: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> torch.utils.data.Dataset:
    """Dataset of training (or validation) samples for the configured input mode.

    Args:
        records: datalist records (``label`` ignored when ``labeled`` is False).
        cfg: the experiment: ``preprocess``, ``input`` (mode, slab, axis, patches), ``augment``,
            ``data.cache``.
        train: random sampling and augmentation; otherwise deterministic samples without
            augmentation: every slice once (2D/2.5D) or whole preprocessed volumes (3D, for
            sliding-window validation).
        labeled: samples carry a ``label``.
        classes: class names for the label-range check (default ``cfg.data.classes``).
        batch_size: samples per batch of the loader that will draw from it (default
            ``train.batch_size``; the unlabelled loader's is ``tcsm.unlabeled_batch_size``).

    Returns:
        2D/2.5D: a :class:`SliceDataset`; 3D: a :class:`PatchDataset` (``train``) or the volume
        dataset. Samples are dicts ``{"image": float (C, ...), "label": long (1, ...)}`` plus
        ``id`` (and ``slice`` for slices).

    Raises:
        ConfigError: for 2.5D/3D modes on 2D images, or 90° rotation of non-square slices or
            patches.
        DataError: for unreadable or inconsistent studies.
    """
    inp = cfg.input
    recs = _clean_records(records, labeled)
    spatial_dims = records_spatial_dims(recs) if recs else 3
    if spatial_dims == 2 and inp.mode != "2d":
        raise ConfigError(
            f"input.mode={inp.mode!r} needs volumes, but the data are 2D images; use input.mode: 2d"
        )
    rotate = train and cfg.augment.rotate90
    classes = classes if classes is not None else cfg.data.classes
    # Samples are cast to long when cut, so cached labels can use one byte per voxel, provided
    # the class check guarantees that every value fits.
    compact = torch.uint8 if classes is not None and len(classes) <= 256 else torch.long
    if inp.mode == "3d":
        plane = [s for a, s in enumerate(inp.patch_size) if a != inp.axis]
        if rotate and plane[0] != plane[1]:
            raise ConfigError(
                f"augment.rotate90 needs a square in-plane patch, but input.patch_size is {inp.patch_size}; "
                "make the in-plane sizes equal or set augment.rotate90: false"
            )
        if not train:
            return build_volume_dataset(recs, cfg, with_label=labeled, classes=classes)
        volumes = build_volume_dataset(recs, cfg, with_label=labeled, classes=classes, label_dtype=compact)
        aug = build_train_augmentation(cfg.augment, 3, axis=inp.axis)
        return PatchDataset(
            volumes,
            inp.patch_size,
            inp.patches_per_volume,
            inp.foreground_ratio,
            transform=aug if aug.transforms else None,
            labeled=labeled,
        )
    size = cfg.preprocess.slice_size
    if rotate and size is not None and size[0] != size[1]:
        raise ConfigError(
            f"augment.rotate90 needs square slices, but preprocess.slice_size is {size}; "
            "make it square or set augment.rotate90: false"
        )
    # Slices are drawn from all volumes in random order, so the preprocessed volumes must stay
    # in memory; only single-slice 2D images may be re-read on each access.
    cache = True if spatial_dims == 3 else None
    if spatial_dims == 3 and not cfg.data.cache:
        log.info("2D/2.5D sampling keeps the preprocessed volumes in memory although data.cache is false")
    volumes = build_volume_dataset(
        recs, cfg, with_label=labeled, classes=classes, cache=cache, label_dtype=compact
    )
    if rotate and size is None and (batch_size or cfg.train.batch_size) > 1:
        # Volumes stay in memory, so all are checked; 2D images of one batch share one size,
        # so the first stands for the rest.
        checked = len(volumes) if spatial_dims == 3 else min(1, len(volumes))
        _check_square_slices([volumes[i] for i in range(checked)], inp.axis)
    aug = build_train_augmentation(cfg.augment, 2) if train else None
    return SliceDataset(
        volumes,
        mode=inp.mode,
        slab=inp.slab,
        axis=inp.axis,
        slice_size=size,
        foreground_ratio=inp.foreground_ratio if train else 0.0,
        transform=aug if aug is not None and aug.transforms else None,
        labeled=labeled,
        single_slice=spatial_dims == 2,
    )
