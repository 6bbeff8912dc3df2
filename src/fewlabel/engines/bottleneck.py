"""Bottleneck features of a frozen GoogLeNet: extracted once, cached on disk.

The bottleneck training stage (``train.mode: bottleneck`` or ``bottleneck_then_finetune``)
trains only the new head. Its input, the backbone's 1024-d pooled features, does not change
while the backbone is frozen, so :func:`extract_features` computes it once per image (and
per 90-degree rotation, which is the training augmentation) and :func:`cached_features`
keeps it in ``<run>/features/{train,val}.pt`` for resumed and repeated runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.errors import CheckpointError
from fewlabel.utils.distributed import is_main_process
from fewlabel.utils.runtime import autocast

log = logging.getLogger(__name__)

__all__ = ["FEATURES_DIR", "FeatureDataset", "cached_features", "extract_features", "feature_fingerprint"]

#: Folder of the run that holds the cached features.
FEATURES_DIR = "features"


class FeatureDataset(TorchDataset):
    """Cached features, ``N x R x D``: each access returns one of the R rotations at random."""

    def __init__(
        self, feats: torch.Tensor, labels: torch.Tensor, ids: Sequence[str], random_rotation: bool
    ) -> None:
        self.feats = feats
        self.labels = labels
        self.ids = list(ids)
        self.random_rotation = random_rotation

    def __len__(self) -> int:
        return self.feats.shape[0]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        # A ResumableSampler passes (index, sample seed): the rotation then depends on the seed alone.
        i, seed = item if isinstance(item, tuple) else (item, None)
        r = 0
        if self.random_rotation:
            r = (
                seed % self.feats.shape[1]
                if seed is not None
                else int(torch.randint(self.feats.shape[1], (1,)))
            )
        return {"features": self.feats[i, r], "label": self.labels[i], "id": self.ids[i]}


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Any, device: torch.device, rotations: int = 1, amp: bool = False
) -> dict[str, Any]:
    """Bottleneck features of every image, for each of ``rotations`` 90-degree rotations.

    Training features are extracted for the four rotations when ``augment.rotate90`` is on:
    the head then sees a random rotation of each image every epoch, which is exactly the
    training augmentation, at four extraction passes once instead of a full pass per epoch.
    Rotating the normalised tensor equals normalising the rotated image (normalisation is per
    channel). Flips are not cached: the bottleneck stage ignores ``augment.flip``.

    Args:
        model: network with ``features``.
        loader: batches of preprocessed (not augmented) ``{"image", "label", "id"}``.
        device: compute device.
        rotations: 1 (as is) or 4 (0/90/180/270 degrees).
        amp: float16 autocast on CUDA.

    Returns:
        ``{"features": N x rotations x 1024 float32, "labels": N long, "ids": [...], "rotations": R}``.
    """
    model.eval()
    feats, labels, ids = [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        with autocast(device, amp):
            per_rot = [
                model.features(torch.rot90(x, k, dims=(-2, -1))).float().cpu() for k in range(rotations)
            ]
        feats.append(torch.stack(per_rot, dim=1))
        labels.append(torch.as_tensor(batch["label"]).view(-1).cpu())
        ids.extend(str(i) for i in batch["id"])
    return {
        "features": torch.cat(feats).contiguous(),
        "labels": torch.cat(labels).long(),
        "ids": ids,
        "rotations": int(rotations),
    }


def feature_fingerprint(model: nn.Module, records: Sequence[dict], preprocessing: dict[str, Any]) -> str:
    """A digest of everything the cached features depend on besides the ids and labels.

    The backbone's weights (the new head's are left out: they train while the features stay),
    the preprocessing settings, and each image file's size and modification time (or an
    in-memory image's pixels), so that a cache is not reused for another backbone, input
    size or normalisation, or for an image replaced under the same name.

    Args:
        model: network with ``head_parameters()``.
        records: the records whose features are cached.
        preprocessing: JSON-serialisable settings of the transforms (size, mean, std, ...).

    Returns:
        A hex digest.
    """
    digest = hashlib.sha256(json.dumps(preprocessing, sort_keys=True).encode())
    head = {p.data_ptr() for p in model.head_parameters()}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in head:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for record in records:
        image = record["image"]
        if isinstance(image, str):
            stat = os.stat(image)
            digest.update(f"{image}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def cached_features(
    path: Path,
    records: Sequence[dict],
    make: Callable[[], dict[str, Any]],
    rotations: int,
    fingerprint: str = "",
) -> dict[str, Any]:
    """The cached features of ``records`` if ``path`` holds them, else ``make()``'s (then cached).

    Args:
        path: the cache file.
        records: the records, in the order of the features.
        make: extracts the features (see :func:`extract_features`).
        rotations: rotations per image the cache must hold.
        fingerprint: :func:`feature_fingerprint` of the backbone, preprocessing and images.

    Returns:
        The features dict, with ``fingerprint``.
    """
    ids = [str(r["id"]) for r in records]
    labels = [int(r["label"]) for r in records]
    if path.is_file():
        try:
            cached = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("ignoring unreadable feature cache %s (%s); extracting again", path, err)
        else:
            # The labels are compared too: a grade corrected in the CSV must not train on the old one.
            same_labels = "labels" in cached and cached["labels"].tolist() == labels
            same_source = cached.get("fingerprint", "") == fingerprint
            if (
                cached.get("ids") == ids
                and cached.get("rotations") == rotations
                and same_labels
                and same_source
            ):
                log.info("reusing cached bottleneck features %s", path)
                return cached
            what = (
                "other images or labels" if same_source else "another backbone, preprocessing or image files"
            )
            log.info("feature cache %s is for %s; extracting again", path, what)
    feats = {**make(), "fingerprint": fingerprint}
    if is_main_process():
        save_checkpoint(feats, path)
    return feats
