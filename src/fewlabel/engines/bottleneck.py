"""Bottleneck features of a frozen GoogLeNet: extracted once, cached on disk.

The bottleneck training stage (``train.mode: bottleneck`` or ``bottleneck_then_finetune``)
trains only the new head. Its input, the backbone's 1024-d pooled features, does not change
while the backbone is frozen, so :func:`extract_features` computes it once per image (and
per 90-degree rotation, which is the training augmentation) and :func:`cached_features`
keeps it in ``<run>/features/{train,val}.pt`` for resumed and repeated runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.errors import CheckpointError
from fewlabel.utils.distributed import is_main_process
from fewlabel.utils.runtime import autocast

log = logging.getLogger(__name__)

__all__ = ["FEATURES_DIR", "FeatureDataset", "cached_features", "extract_features"]

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


def cached_features(
    path: Path, records: Sequence[dict], make: Callable[[], dict[str, Any]], rotations: int
) -> dict[str, Any]:
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
            if cached.get("ids") == ids and cached.get("rotations") == rotations and same_labels:
                log.info("reusing cached bottleneck features %s", path)
                return cached
            log.info("feature cache %s is for other images or labels; extracting again", path)
    feats = make()
    if is_main_process():
        save_checkpoint(feats, path)
    return feats
