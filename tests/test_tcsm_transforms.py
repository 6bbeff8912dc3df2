"""TCSM building blocks: in-plane transforms, consistency loss, ramp-up."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fewlabel.engines.ramps import sigmoid_rampup
from fewlabel.losses.consistency import ConsistencyLoss
from fewlabel.transforms import InPlaneTransform, apply_per_sample, sample_transforms

ALL_RIGID = [InPlaneTransform(k, f) for k, f in itertools.product(range(4), (False, True))]


@pytest.mark.parametrize("shape", [(2, 3, 6, 10), (2, 2, 6, 10, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("t", ALL_RIGID, ids=str)
def test_inverse_is_exact_for_rotations_and_flips(t, shape):
    x = torch.randn(shape)
    y = t(x)
    if t.k % 2:
        assert y.shape[2:4] == (shape[3], shape[2])  # quarter turn swaps H and W
    assert y.shape[4:] == x.shape[4:]  # depth untouched
    assert torch.equal(t.inverse(y), x)


def test_the_eight_rigid_transforms_are_distinct():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = {tuple(t(x).flatten().tolist()) for t in ALL_RIGID}
    assert len(images) == 8


def test_rotation_and_flip_act_on_in_plane_axes_only():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 2, 3, 4, 5)
    y = InPlaneTransform(1, True)(x)
    expected = torch.flip(torch.rot90(x, 1, dims=(2, 3)), dims=(3,))
    assert torch.equal(y, expected)
    assert torch.equal(y[:, 0], InPlaneTransform(1, True)(x[:, :1])[:, 0])  # channels independent


@pytest.mark.parametrize(
    "t", [*ALL_RIGID, InPlaneTransform(1, True, 1.25), InPlaneTransform(2, False, 1.5)], ids=str
)
def test_transform_commutes_with_a_pointwise_network(t):
    conv = torch.nn.Conv2d(3, 2, kernel_size=1)
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        assert torch.allclose(t(conv(x)), conv(t(x)), atol=1e-5)


def test_transform_commutes_with_a_pointwise_3d_network():
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    x = torch.randn(1, 1, 6, 10, 4)
    for t in [*ALL_RIGID, InPlaneTransform(3, True, 1.3)]:
        with torch.no_grad():
            assert torch.allclose(t(conv(x)), conv(t(x)), atol=1e-5), t


def test_zoom_keeps_size_and_zooms_in_about_the_centre():
    x = torch.zeros(1, 1, 20, 20)
    x[..., 8:12, 8:12] = 1.0  # a centred square
    y = InPlaneTransform(0, False, 2.0)(x)
    assert y.shape == x.shape
    assert y[..., 10, 10] > 0.9 and y[..., 0, 0] == 0
    assert (y > 0.5).sum() > (x > 0.5).sum() * 3  # the square grew about four-fold
    back = InPlaneTransform(0, False, 2.0).inverse(y)
    assert back.shape == x.shape
    assert torch.allclose(back[..., 6:14, 6:14], x[..., 6:14, 6:14], atol=0.3)


def test_zoom_of_integer_labels_stays_integer():
    labels = torch.randint(0, 3, (1, 1, 12, 12))
    y = InPlaneTransform(1, False, 1.4)(labels)
    assert y.dtype == labels.dtype and set(y.unique().tolist()) <= {0, 1, 2}


def test_apply_per_sample_matches_each_transform():
    x = torch.randn(len(ALL_RIGID) + 1, 2, 8, 8)
    transforms = [*ALL_RIGID, ALL_RIGID[3]]  # one transform repeated: grouped samples
    y = apply_per_sample(transforms, x)
    for i, t in enumerate(transforms):
        assert torch.equal(y[i], t(x[i : i + 1])[0])


def test_apply_per_sample_keeps_gradients():
    x = torch.randn(3, 1, 6, 6, requires_grad=True)
    transforms = [InPlaneTransform(1, False), InPlaneTransform(0, True), InPlaneTransform(2, True)]
    apply_per_sample(transforms, x).pow(2).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach())


def test_apply_per_sample_rejects_unstackable_non_square_batches():
    x = torch.randn(2, 1, 6, 10)
    with pytest.raises(ValueError, match="non-square"):
        apply_per_sample([InPlaneTransform(0, False), InPlaneTransform(1, False)], x)
    with pytest.raises(ValueError, match="2 transforms for a batch of 3"):
        apply_per_sample(ALL_RIGID[:2], torch.randn(3, 1, 6, 6))


def test_sample_transforms_respects_switches_and_seed():
    g = torch.Generator().manual_seed(0)
    ts = sample_transforms(64, rotate90=True, flip=True, scale=0.0, generator=g)
    assert len(ts) == 64
    assert {t.k for t in ts} == {0, 1, 2, 3} and {t.flip for t in ts} == {False, True}
    assert all(t.scale == 1.0 for t in ts)
    again = sample_transforms(64, True, True, 0.0, torch.Generator().manual_seed(0))
    assert again == ts
    assert all(t.is_identity for t in sample_transforms(8, False, False, 0.0, g))
    zooms = sample_transforms(32, False, False, 0.2, g)
    assert all(1.0 <= t.scale <= 1.2 for t in zooms) and len({t.scale for t in zooms}) > 1


def test_shared_transforms_let_non_square_batches_rotate():
    g = torch.Generator().manual_seed(3)
    ts = sample_transforms(5, True, True, 0.0, g, shared=True)
    assert len(set(ts)) == 1 and len(ts) == 5
    x = torch.randn(5, 1, 6, 10)
    assert torch.equal(apply_per_sample(ts, x), ts[0](x))


def test_invalid_transform_parameters_are_rejected():
    with pytest.raises(ValueError):
        InPlaneTransform(4, False)
    with pytest.raises(ValueError):
        InPlaneTransform(0, False, 0.0)
    with pytest.raises(ValueError):
        InPlaneTransform(0, False)(torch.randn(4, 4))


# --- consistency loss -------------------------------------------------------------------


def test_mse_consistency_matches_formula_and_is_zero_for_equal_maps():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    loss = ConsistencyLoss("mse")
    expected = ((s.softmax(1) - t.softmax(1)) ** 2).mean()
    assert torch.allclose(loss(s, t), expected)
    assert loss(s, s.clone()) == 0


def test_kl_consistency_matches_formula():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    p, q = t.softmax(1), s.softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(ConsistencyLoss("kl")(s, t), expected, atol=1e-6)
    assert ConsistencyLoss("kl")(s, s.clone()).abs() < 1e-6


def test_single_channel_outputs_use_a_sigmoid():
    s, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.allclose(ConsistencyLoss("mse")(s, t), F.mse_loss(s.sigmoid(), t.sigmoid()))
    p, q = t.sigmoid(), s.sigmoid()
    kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert torch.allclose(ConsistencyLoss("kl")(s, t), kl.mean(), atol=1e-6)


def test_consistency_gradient_flows_to_student_only():
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    t = torch.randn(1, 2, 3, 3, requires_grad=True)
    ConsistencyLoss("mse")(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_consistency_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        ConsistencyLoss()(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="'mse', 'kl' or 'ce'"):
        ConsistencyLoss("l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        ConsistencyLoss("ce", threshold=1.0)


def test_ce_consistency_without_threshold_is_cross_entropy_on_teacher_argmax():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = F.cross_entropy(s, t.argmax(1))
    assert torch.allclose(ConsistencyLoss("ce", threshold=0.0)(s, t), expected)


def test_ce_consistency_counts_only_confident_teacher_pixels_over_all_pixels():
    s = torch.randn(1, 2, 2, 2, requires_grad=True)
    t = torch.zeros(1, 2, 2, 2)
    t[0, 1, 0, 0] = 10.0  # one pixel where the teacher is sure of class 1; elsewhere 50/50
    loss = ConsistencyLoss("ce", threshold=0.9)(s, t)
    expected = F.cross_entropy(s[:, :, :1, :1], torch.ones(1, 1, 1, dtype=torch.long)) / 4
    assert torch.allclose(loss, expected)
    loss.backward()
    assert s.grad is not None
    assert s.grad[0, :, 0, 0].abs().sum() > 0
    assert s.grad[0, :, 1, :].abs().sum() == 0 and s.grad[0, :, 0, 1].abs().sum() == 0


def test_ce_consistency_single_channel_uses_binary_pseudo_labels():
    s = torch.randn(1, 1, 3, 3)
    t = torch.full((1, 1, 3, 3), -6.0)
    t[0, 0, 1, 1] = 0.1  # unsure: left out
    loss = ConsistencyLoss("ce", threshold=0.9)(s, t)
    mask = torch.ones(1, 1, 3, 3)
    mask[0, 0, 1, 1] = 0
    expected = (F.binary_cross_entropy_with_logits(s, torch.zeros_like(s), reduction="none") * mask).mean()
    assert torch.allclose(loss, expected)


# --- ramp-up ----------------------------------------------------------------------------


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(-3, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(7, 0) == 1.0
    values = [sigmoid_rampup(i, 10) for i in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        sigmoid_rampup(0, -1)
