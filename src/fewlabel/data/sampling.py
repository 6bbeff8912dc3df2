"""Resumable, reproducible sampling: the same seed gives the same batches and augmentations.

Two pieces make a run reproducible across crashes, worker counts and process counts:

* :class:`ResumableSampler` draws each epoch's order from ``(seed, epoch)`` alone, can skip
  the batches an interrupted epoch had already consumed, and shards the order across
  distributed ranks. It yields ``(index, sample_seed)`` pairs.
* :class:`SeededDataset` applies the random transforms of a sample with a random state set
  from that ``sample_seed``, so an augmentation depends on ``(seed, epoch, position)`` only,
  never on which worker or which process produced it, or on what ran before a resume.

PyTorch's ``DistributedSampler`` and Ignite's ``DeterministicEngine`` each solve half of this
(shuffling per epoch; replaying the data order) but neither reseeds MONAI's per-transform
random states, which is what makes resumed augmentations identical.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable, apply_transform
from torch.utils.data import Dataset, Sampler


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class ResumableSampler(Sampler):
    """Seeded per-epoch order that yields ``(index, sample_seed)``.

    Every call of ``__iter__`` is one epoch; the epoch counter advances by itself, so the
    sampler needs no ``set_epoch`` call from the training loop (and works with worker processes).

    Args:
        size: number of samples in the dataset.
        seed: base seed.
        shuffle: draw a random permutation per epoch (else keep dataset order).
        num_samples: samples per epoch (default ``size``); larger values repeat the data, drawn
            as concatenated permutations, which gives an iteration budget independent of the size.
        num_replicas: number of distributed processes sharing the epoch.
        rank: this process's rank.
        weights: per-sample weights; when given, each epoch draws ``num_samples`` indices with
            replacement in proportion to them (class-balanced sampling).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        weights: Sequence[float] | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = num_samples or size
        self.num_replicas = num_replicas
        self.rank = rank
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and len(self.weights) != size:
            raise ValueError(f"{len(self.weights)} weights for {size} samples")
        self.epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def order(self, epoch: int) -> list[int]:
        """The global order of one epoch (before sharding).

        Args:
            epoch: zero-based epoch.

        Returns:
            ``num_samples`` dataset indices, padded to a multiple of ``num_replicas``.
        """
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        out: list[int] = []
        if self.weights is not None:
            out = torch.multinomial(
                self.weights, self.num_samples, replacement=True, generator=generator
            ).tolist()
        while len(out) < self.num_samples:
            if self.shuffle:
                out.extend(torch.randperm(self.size, generator=generator).tolist())
            else:
                out.extend(range(self.size))
        out = out[: self.num_samples]
        total = len(self) * self.num_replicas
        # Cycled, not sliced once: with fewer samples than ranks one copy is not enough, and
        # a rank left short would wait at the others' next all-reduce.
        return (out * -(-total // len(out)))[:total] if out else out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self._skip
        self.epoch += 1
        self._skip = 0
        order = self.order(epoch)
        positions = range(self.rank, len(order), self.num_replicas)
        for n, position in enumerate(positions):
            if n < skip:
                continue
            yield order[position], _sample_seed(self.seed, epoch, position)

    def resume(self, epoch: int, samples_done: int) -> None:
        """Continue an interrupted epoch.

        Args:
            epoch: zero-based epoch to continue.
            samples_done: samples (on this rank) that epoch had already consumed.
        """
        self.epoch = epoch
        self._skip = samples_done


def group_share_weights(in_group: Sequence[bool], share: float) -> list[float]:
    """Per-sample weights that give one group of samples a fixed share of the draws.

    Args:
        in_group: for each sample, whether it belongs to the group.
        share: probability that a draw comes from the group; the other samples share the rest.
            Within each side every sample is equally likely.

    Returns:
        Weights for :class:`ResumableSampler` (they sum to 1).

    Raises:
        ValueError: if ``share`` is outside [0, 1], or a side that should be drawn from is empty.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1], got {share}")
    members = sum(bool(m) for m in in_group)
    others = len(in_group) - members
    if members == 0 and share > 0:
        raise ValueError(f"a share of {share} is asked of a group with no samples")
    if others == 0 and share < 1:
        raise ValueError(f"a share of {1 - share} is asked of the other samples, but there are none")
    return [share / members if m else (1.0 - share) / others for m in in_group]


class SeededDataset(Dataset):
    """Apply random transforms with a random state chosen by the sampler.

    Args:
        data: a map-style dataset (e.g. a MONAI ``CacheDataset`` holding the deterministic part).
        transform: the random part, a MONAI transform or ``Compose``.
    """

    def __init__(self, data: Sequence[Any] | Dataset, transform: Callable | None = None) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            index, seed = item
        else:
            index, seed = item, None
        sample = self.data[index]
        if self.transform is None:
            return sample
        # A cached sample must survive its augmentation: some MONAI transforms (channel-wise
        # normalisation among them) write into their input, which would compound every epoch.
        sample = copy.deepcopy(sample)
        if seed is not None and isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=seed % 2**32)
        if isinstance(self.transform, Compose):
            # A Compose reports its own errors; apply_transform would wrap them once more.
            return self.transform(sample)
        return apply_transform(self.transform, sample)
