"""Mixup for classification batches: exact mixtures, seeded draws, soft targets in the loss."""

from __future__ import annotations

import pytest
import torch

from fewlabel.engines.classification import AuxiliaryLoss
from fewlabel.transforms.mixup import mixup_batch


def test_each_image_and_its_target_are_the_same_mixture():
    # Sample i is the constant image i with label i: the mixed image's value must equal the
    # label-weighted mean of the class indices its target row puts weight on.
    n = 6
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 5, 7).contiguous()
    labels = torch.arange(n)
    torch.manual_seed(0)
    mixed, targets = mixup_batch(images, labels, num_classes=n, alpha=0.4)
    assert mixed.shape == images.shape and mixed.dtype == images.dtype
    assert targets.shape == (n, n)
    assert torch.allclose(targets.sum(dim=1), torch.ones(n))
    assert (targets >= 0).all()
    # At most two classes per row: the sample itself and its partner.
    assert ((targets > 0).sum(dim=1) <= 2).all()
    expected = targets @ torch.arange(n, dtype=torch.float32)
    assert torch.allclose(mixed.amax(dim=(1, 2, 3)), expected, atol=1e-6)
    assert torch.allclose(mixed.amin(dim=(1, 2, 3)), expected, atol=1e-6)
    # Mixing happened: not every row is a one-hot vector.
    assert (targets.max(dim=1).values < 1).any()


def test_draws_follow_torch_global_seed():
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(7)
    first = mixup_batch(images, labels, 3, 0.2)
    torch.manual_seed(7)
    second = mixup_batch(images, labels, 3, 0.2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    ("labels", "alpha", "match"),
    [
        (torch.tensor([0, 1, 2]), 0.0, "alpha must be positive"),
        (torch.tensor([0, 1]), 0.2, r"shape \(3,\)"),
        (torch.tensor([0, 1, 3]), 0.2, r"\[0, 3\)"),
        (torch.tensor([0, -1, 2]), 0.2, r"\[0, 3\)"),
    ],
)
def test_bad_arguments_are_refused(labels, alpha, match):
    with pytest.raises(ValueError, match=match):
        mixup_batch(torch.rand(3, 1, 4, 4), labels, 3, alpha)


def test_loss_takes_soft_targets_and_matches_indices_for_one_hot_rows():
    torch.manual_seed(0)
    logits, aux = torch.randn(5, 4), [torch.randn(5, 4), torch.randn(5, 4)]
    labels = torch.tensor([0, 3, 1, 2, 3])
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    loss = AuxiliaryLoss(aux_weight=0.3, label_smoothing=0.1)
    assert torch.allclose(loss(logits, aux, one_hot), loss(logits, aux, labels), atol=1e-6)
    # A half-and-half target costs the mean of the two hard targets' costs (CE is linear in it).
    other = torch.tensor([1, 0, 2, 3, 0])
    soft = 0.5 * one_hot + 0.5 * torch.nn.functional.one_hot(other, 4).float()
    expected = 0.5 * loss(logits, aux, labels) + 0.5 * loss(logits, aux, other)
    assert torch.allclose(loss(logits, aux, soft), expected, atol=1e-6)
