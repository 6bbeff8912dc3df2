"""Continuous Dice: hand-worked values, equality with Dice on binary maps, loss behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from fewlabel.losses.continuous_dice import ContinuousDiceLoss, continuous_dice


def _two_class_probs(b: torch.Tensor) -> torch.Tensor:
    """(N, 2, ...) probabilities whose foreground channel is ``b`` (N, 1, ...)."""
    return torch.cat([1.0 - b, b], dim=1)


def test_paper_example_confidence_does_not_lower_cdc():
    a = torch.zeros(1, 1, 8, 8)
    a[..., 2:6, 2:6] = 1
    b = 0.6 * a
    assert continuous_dice(a, b, dims=(2, 3), eps=0.0).item() == pytest.approx(1.0)
    soft_dice = 2 * (a * b).sum() / (a.sum() + b.sum())
    assert soft_dice.item() == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # Σab = 1.2, Σa·sign(b) = 2 -> c = 0.6; cDC = 2.4 / (0.6·2 + 1.4) = 2.4 / 2.6
        ([1, 1, 0, 0], [0.8, 0.4, 0.2, 0.0], 2.4 / 2.6),
        # Σab = 0.5, Σa·sign(b) = 1 -> c = 0.5; cDC = 1 / (0.5·3 + 1) = 0.4
        ([1, 1, 1, 0], [0.5, 0.0, 0.0, 0.5], 0.4),
        # no overlap -> c = 1; cDC = 0
        ([1, 1, 0, 0], [0.0, 0.0, 0.3, 0.9], 0.0),
    ],
)
def test_hand_worked_partial_overlap(a, b, expected):
    a_t = torch.tensor(a, dtype=torch.float32).view(1, 1, 2, 2)
    b_t = torch.tensor(b, dtype=torch.float32).view(1, 1, 2, 2)
    assert continuous_dice(a_t, b_t, dims=(2, 3), eps=0.0).item() == pytest.approx(expected, abs=1e-6)


def test_equals_dice_on_binary_predictions():
    gen = torch.Generator().manual_seed(0)
    gt = (torch.rand(3, 1, 16, 16, generator=gen) > 0.6).float()
    pred = (torch.rand(3, 1, 16, 16, generator=gen) > 0.5).float()
    gt[:, :, 0, 0] = 1  # no empty masks: DiceMetric and cDC then agree exactly
    pred[:, :, 0, 0] = 1
    cdc = continuous_dice(gt, pred, dims=(2, 3), eps=0.0)
    metric = DiceMetric(include_background=True, reduction="none")
    dice = metric(y_pred=pred, y=gt)
    torch.testing.assert_close(cdc, dice, atol=1e-6, rtol=0)


def test_loss_on_hand_worked_case_and_include_background():
    b = torch.tensor([0.8, 0.4, 0.2, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([1, 1, 0, 0]).view(1, 1, 2, 2)
    probs = _two_class_probs(b)
    fg_only = ContinuousDiceLoss(softmax=False, eps=0.0)(probs, target)
    assert fg_only.item() == pytest.approx(1 - 2.4 / 2.6, abs=1e-6)
    # background: a = [0,0,1,1], b = [0.2,0.6,0.8,1.0]; Σab = 1.8, c = 0.9; cDC = 3.6 / (1.8 + 2.6)
    both = ContinuousDiceLoss(include_background=True, softmax=False, eps=0.0)(probs, target)
    assert both.item() == pytest.approx(1 - (2.4 / 2.6 + 3.6 / 4.4) / 2, abs=1e-6)


def test_one_hot_target_equals_label_target():
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (2, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    loss = ContinuousDiceLoss()
    assert loss(logits, labels).item() == pytest.approx(loss(logits, one_hot(labels, 3, dim=1)).item())


def test_batch_pools_samples():
    # sample 1: cDC 1 (0.6 on the true region); sample 2: no overlap, cDC 0
    b = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    target[0, 0, 0, :] = 1
    b[0, 0, 0, :] = 0.6
    target[1, 0, 1, 0] = 1
    b[1, 0, 1, 1] = 1.0
    probs = _two_class_probs(b)
    per_sample = ContinuousDiceLoss(softmax=False, eps=0.0, reduction="none")(probs, target)
    torch.testing.assert_close(per_sample, torch.tensor([[0.0], [1.0]]))
    # pooled: Σab = 1.2, Σa·sign(b) = 2 -> c = 0.6, Σa = 3, Σb = 2.2; cDC = 2.4 / 4.0
    pooled = ContinuousDiceLoss(softmax=False, eps=0.0, batch=True)(probs, target)
    assert pooled.item() == pytest.approx(1 - 0.6, abs=1e-6)


def test_ce_weight_adds_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 6, 4, generator=gen)  # 3D input
    labels = torch.randint(0, 3, (2, 1, 6, 6, 4), generator=gen)
    dice_only = ContinuousDiceLoss()(logits, labels)
    with_ce = ContinuousDiceLoss(ce_weight=0.5)(logits, labels)
    ce = F.cross_entropy(logits, labels[:, 0])
    assert with_ce.item() == pytest.approx(dice_only.item() + 0.5 * ce.item(), rel=1e-6)


def test_soft_dice_weight_adds_monai_soft_dice_over_the_same_classes():
    from monai.losses import DiceLoss

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, 6, generator=gen)
    labels = torch.randint(0, 3, (2, 1, 6, 6), generator=gen)
    cdice = ContinuousDiceLoss()(logits, labels)
    combined = ContinuousDiceLoss(soft_dice_weight=0.5)(logits, labels)
    # background excluded in both terms, as include_background=False says
    soft = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)(logits, labels)
    assert combined.item() == pytest.approx(cdice.item() + 0.5 * soft.item(), rel=1e-5)


def test_soft_dice_term_rewards_confidence_on_the_true_region():
    # A prediction of 0.6 exactly on the truth already scores cDC = 1; the soft-Dice term
    # adds a stronger pull towards confidence there than continuous Dice alone gives.
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., 2:6, 2:6] = 1
    fg = (target == 1).float() * 0.6
    probs = torch.cat([1.0 - fg, fg], dim=1).requires_grad_(True)
    ContinuousDiceLoss(softmax=False)(probs, target).backward()
    cdice_pull = probs.grad[0, 1, 2:6, 2:6].clone()
    probs.grad = None
    ContinuousDiceLoss(softmax=False, soft_dice_weight=1.0)(probs, target).backward()
    combined_pull = probs.grad[0, 1, 2:6, 2:6]
    assert (combined_pull < cdice_pull - 1e-3).all()  # descending the loss raises the probability


def test_gradients_finite_with_empty_masks():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)  # all background
    logits = torch.zeros(2, 2, 8, 8)
    logits[:, 0] = 12.0  # foreground probability ~ 6e-6 everywhere
    logits.requires_grad_(True)
    loss = ContinuousDiceLoss(ce_weight=1.0)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # the loss keeps pushing stray foreground probability down
    assert (logits.grad[:, 1] > 0).all()


def test_empty_truth_and_empty_prediction_is_zero_loss():
    probs = torch.zeros(1, 2, 4, 4)
    probs[:, 0] = 1.0
    probs.requires_grad_(True)
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    loss = ContinuousDiceLoss(softmax=False)(probs, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(probs.grad).all()


def test_gradient_flows_to_the_true_region():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[..., :2, :2] = 1
    ContinuousDiceLoss()(logits, target).backward()
    # descending the loss raises foreground logits on the true region, lowers them elsewhere
    assert (logits.grad[0, 1, :2, :2] < 0).all()
    assert (logits.grad[0, 1, 2:, 2:] > 0).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="reduction"):
        ContinuousDiceLoss(reduction="max")
    with pytest.raises(ValueError, match="none"):
        ContinuousDiceLoss(reduction="none", ce_weight=1.0)
    with pytest.raises(ValueError, match="none"):
        ContinuousDiceLoss(reduction="none", soft_dice_weight=1.0)
    with pytest.raises(ValueError, match="soft_dice_weight"):
        ContinuousDiceLoss(soft_dice_weight=-1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        ContinuousDiceLoss()(torch.zeros(1, 2, 4, 4), torch.full((1, 1, 4, 4), 2))
    with pytest.raises(ValueError, match="does not match"):
        ContinuousDiceLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="single channel"):
        ContinuousDiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        continuous_dice(torch.zeros(2, 2), torch.zeros(2, 3), dims=(0, 1))


def test_half_precision_input_does_not_overflow():
    # 64·64·32 voxels of foreground: Σb exceeds the float16 maximum of 65504
    target = torch.ones(1, 1, 64, 64, 32, dtype=torch.long)
    logits = torch.zeros(1, 2, 64, 64, 32, dtype=torch.float16)
    logits[:, 1] = 4.0
    loss = ContinuousDiceLoss()(logits, target)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)  # the prediction covers the truth exactly


def test_loss_config_reaches_the_loss():
    from fewlabel.config.segmentation import SegmentationLoss
    from fewlabel.engines.segmentation import build_loss

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 3, 8, 8, generator=gen)
    labels = torch.randint(0, 3, (3, 1, 8, 8), generator=gen)
    cfg = SegmentationLoss(include_background=True, ce_weight=0.5, batch=True)
    expected = ContinuousDiceLoss(include_background=True, ce_weight=0.5, batch=True)(logits, labels)
    assert build_loss(cfg)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    per_sample = build_loss(SegmentationLoss(include_background=True, ce_weight=0.5))(logits, labels)
    assert per_sample.item() != pytest.approx(expected.item(), rel=1e-6)
    with_soft = build_loss(SegmentationLoss(soft_dice_weight=0.25))(logits, labels)
    expected_soft = ContinuousDiceLoss(soft_dice_weight=0.25, ce_weight=1.0)(logits, labels)
    assert with_soft.item() == pytest.approx(expected_soft.item(), rel=1e-6)
    assert with_soft.item() != pytest.approx(build_loss(SegmentationLoss())(logits, labels).item(), rel=1e-6)


def test_a_lesion_free_sample_needs_the_cross_entropy_to_penalise_false_positives():
    # Per sample, a class absent from the ground truth gives cDC near 0 for any softmax output,
    # so the Dice term neither ranks faint against strong false positives nor pushes them down.
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    faint, strong = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    faint[:, 0], strong[:, 1] = 5.0, 5.0
    dice_only = ContinuousDiceLoss()
    assert dice_only(faint, target).item() == pytest.approx(1.0, abs=1e-3)
    assert dice_only(strong, target).item() == pytest.approx(1.0, abs=1e-3)
    logits = strong.clone().requires_grad_(True)
    dice_only(logits, target).backward()
    assert logits.grad.abs().max() < 1e-6
    logits.grad = None
    ContinuousDiceLoss(ce_weight=1.0)(logits, target).backward()
    assert logits.grad.abs().max() > 1e-3


def test_the_config_default_keeps_the_cross_entropy():
    from fewlabel.config.segmentation import SegmentationLoss

    assert SegmentationLoss().ce_weight == 1.0
