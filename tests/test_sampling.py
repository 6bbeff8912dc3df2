"""Resumable sampling: order and augmentation depend on (seed, epoch, position) only."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose, RandRotate90d
from torch.utils.data import DataLoader

from fewlabel.data.sampling import ResumableSampler, SeededDataset, group_share_weights


def _epoch(sampler):
    return list(iter(sampler))


def test_same_seed_same_order_and_epochs_differ():
    a, b = ResumableSampler(10, seed=3), ResumableSampler(10, seed=3)
    first_a, first_b = _epoch(a), _epoch(b)
    assert first_a == first_b
    assert sorted(i for i, _ in first_a) == list(range(10))
    assert _epoch(a) != first_a  # the second epoch is reshuffled


def test_resume_skips_consumed_samples_and_matches_uninterrupted():
    full = ResumableSampler(12, seed=1)
    _epoch(full)
    second = _epoch(full)
    resumed = ResumableSampler(12, seed=1)
    resumed.resume(epoch=1, samples_done=5)
    assert _epoch(resumed) == second[5:]
    assert _epoch(resumed) == _epoch(full)


def test_shards_partition_the_epoch():
    shards = [_epoch(ResumableSampler(9, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    single = ResumableSampler(9, seed=0, num_replicas=1)
    indices = {i for shard in shards for i, _ in shard}
    assert indices == {i for i, _ in _epoch(single)}


@pytest.mark.parametrize(("size", "replicas"), [(1, 4), (2, 8), (3, 4), (9, 2)])
def test_every_rank_gets_as_many_samples_as_it_says(size, replicas):
    # A rank left short would wait forever at the others' next all-reduce.
    shards = [_epoch(ResumableSampler(size, seed=0, num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert [len(s) for s in shards] == [len(ResumableSampler(size, num_replicas=replicas))] * replicas
    assert {i for shard in shards for i, _ in shard} == set(range(size))


def test_num_samples_sets_the_epoch_length():
    sampler = ResumableSampler(3, seed=0, num_samples=8)
    epoch = _epoch(sampler)
    assert len(epoch) == 8 == len(sampler)


def test_augmentation_is_identical_across_worker_counts():
    data = [{"image": np.arange(16, dtype=np.float32).reshape(1, 4, 4) + i} for i in range(6)]
    transform = Compose([RandRotate90d(keys="image", prob=0.75, max_k=3)])

    def run(workers: int):
        loader = DataLoader(
            SeededDataset(data, transform),
            batch_size=2,
            sampler=ResumableSampler(6, seed=5),
            num_workers=workers,
        )
        return [batch["image"].numpy() for batch in loader]

    serial, parallel = run(0), run(2)
    assert all(np.array_equal(s, p) for s, p in zip(serial, parallel, strict=True))


def test_sample_seed_fixes_the_augmentation():
    data = [{"image": np.arange(16, dtype=np.float32).reshape(1, 4, 4)}]
    dataset = SeededDataset(data, Compose([RandRotate90d(keys="image", prob=0.75, max_k=3)]))
    outputs = {seed: dataset[(0, seed)]["image"].numpy() for seed in range(20)}
    assert np.array_equal(dataset[(0, 7)]["image"].numpy(), outputs[7])
    distinct = {o.tobytes() for o in outputs.values()}
    assert len(distinct) == 4  # all four quarter turns occur, and nothing else


def test_group_share_weights_give_a_small_group_its_share():
    # 4 group members among 100 samples: drawn uniformly they would make up 4% of the draws.
    in_group = [i < 4 for i in range(100)]
    weights = group_share_weights(in_group, 0.5)
    assert sum(weights) == pytest.approx(1.0)
    assert len(set(weights[:4])) == 1 and len(set(weights[4:])) == 1
    order = ResumableSampler(100, seed=2, num_samples=4000, weights=weights).order(0)
    assert 0.45 < np.mean([i < 4 for i in order]) < 0.55
    assert set(order) == set(range(100))  # the others are still drawn, each equally often

    assert group_share_weights(in_group, 1.0)[4:] == [0.0] * 96
    with pytest.raises(ValueError, match="no samples"):
        group_share_weights([False] * 5, 0.5)
    with pytest.raises(ValueError, match="there are none"):
        group_share_weights([True] * 5, 0.5)
    with pytest.raises(ValueError, match="must lie in"):
        group_share_weights(in_group, 1.5)
