"""Copy-paste between labelled and unlabelled batches, and its term in TCSMTrainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewlabel.config.segmentation import TCSMConfig
from fewlabel.engines import tcsm as tcsm_module
from fewlabel.engines.tcsm import TCSMTrainer
from fewlabel.errors import DataError
from fewlabel.transforms.consistency import InPlaneTransform, apply_per_sample
from fewlabel.transforms.copy_paste import copy_paste_batch, paste_masks
from test_tcsm_trainer import ZeroLoss, batches, dice, record_outputs, tiny_net


def test_paste_masks_are_rectangles_of_the_asked_size_inside_the_slice():
    inside, labeled_inside = paste_masks(64, 12, 18, 2 / 3, torch.Generator().manual_seed(0))
    assert inside.shape == (64, 12, 18) and inside.dtype == torch.bool
    assert labeled_inside.shape == (64,) and 0 < int(labeled_inside.sum()) < 64
    for mask in inside:
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        assert len(rows) == 8 and len(cols) == 12
        # A filled rectangle: every pixel between its first and last row and column is set.
        assert int(mask.sum()) == 8 * 12
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 11
    positions = {(int(m.any(1).nonzero()[0]), int(m.any(0).nonzero()[0])) for m in inside}
    assert len(positions) > 10


def test_paste_masks_repeat_with_the_generator_seed():
    a = paste_masks(4, 16, 16, 0.5, torch.Generator().manual_seed(3))
    b = paste_masks(4, 16, 16, 0.5, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("size", [0.0, 1.0, -0.2])
def test_paste_masks_reject_sizes_outside_the_unit_interval(size):
    with pytest.raises(ValueError, match="size"):
        paste_masks(2, 8, 8, size, None)


@pytest.mark.parametrize("shape", [(10, 14), (10, 14, 3)])
def test_copy_paste_takes_each_pixel_and_its_label_from_one_source(shape):
    n = 16
    labeled = torch.full((n, 2, *shape), 1.0)
    unlabeled = torch.full((n, 2, *shape), -1.0)
    label = torch.full((n, 1, *shape), 2)
    pseudo = torch.full((n, 1, *shape), 1)
    image, target = copy_paste_batch(labeled, label, unlabeled, pseudo, 0.5, torch.Generator().manual_seed(0))
    assert image.shape == labeled.shape and target.shape == label.shape and target.dtype == label.dtype
    from_labeled = image == 1.0
    assert torch.equal(from_labeled | (image == -1.0), torch.ones_like(from_labeled))
    # Labels follow the pixels: true labels where the labelled image shows, pseudo-labels elsewhere.
    assert torch.equal(target == 2, from_labeled[:, :1])
    # Channels (and planes in 3D) share one mask.
    assert torch.equal(from_labeled[:, 0], from_labeled[:, 1])
    if len(shape) == 3:
        assert torch.equal(from_labeled[..., 0], from_labeled[..., 2])
    share = from_labeled[:, 0].flatten(1).float().mean(1)
    # A rectangle of half each side covers 5 x 7 of 10 x 14 pixels, labelled inside or outside.
    assert set(share.tolist()) == {0.25, 0.75}


def test_copy_paste_rejects_mismatched_shapes():
    x = torch.zeros(2, 1, 8, 8)
    y = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="one shape"):
        copy_paste_batch(x, y, torch.zeros(2, 1, 8, 6), y, 0.5, None)
    with pytest.raises(ValueError, match="pseudo-labels"):
        copy_paste_batch(x, y, x, torch.zeros(2, 2, 8, 8), 0.5, None)


def test_apply_per_sample_inverse_undoes_each_transform():
    x = torch.randn(4, 2, 6, 6)
    ts = [
        InPlaneTransform(1, True),
        InPlaneTransform(2, False),
        InPlaneTransform(3, True),
        InPlaneTransform(0, True),
    ]
    assert torch.equal(apply_per_sample(ts, apply_per_sample(ts, x), inverse=True), x)


def _copy_paste_trainer(
    weight: float,
    unlabelled=None,
    shape=(12, 12),
    net: nn.Module | None = None,
    labelled=None,
    loss: nn.Module | None = None,
    lr: float = 0.1,
    **tcsm,
) -> TCSMTrainer:
    net = net if net is not None else tiny_net()
    settings = {"enabled": True, "rampup_iterations": 0, "consistency_weight": 1.0, **tcsm}
    config = TCSMConfig(copy_paste_weight=weight, **settings)
    labelled = labelled if labelled is not None else batches(2, 2, shape)
    unlabelled = unlabelled if unlabelled is not None else batches(2, 3, shape, False, seed=2)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    return TCSMTrainer("cpu", 1, labelled, unlabelled, net, optimizer, loss or dice(), config)


def test_copy_paste_term_enters_the_loss_with_its_weight():
    trainer = _copy_paste_trainer(0.5)
    outputs = record_outputs(trainer)
    trainer.run()
    for out in outputs:
        assert out["cp_loss"] > 0
        expected = out["sup_loss"] + out["cons_weight"] * out["cons_loss"] + 0.5 * out["cp_loss"]
        assert torch.allclose(out["loss"], expected)
    assert trainer.copy_paste_weight(1) == 0.5


def test_copy_paste_off_adds_nothing():
    trainer = _copy_paste_trainer(0.0)
    outputs = record_outputs(trainer)
    trainer.run()
    assert all("cp_loss" not in out for out in outputs)
    assert torch.allclose(outputs[0]["loss"], outputs[0]["sup_loss"] + outputs[0]["cons_loss"])


def test_copy_paste_weight_follows_the_consistency_ramp():
    trainer = _copy_paste_trainer(2.0, rampup_iterations=10)
    assert trainer.copy_paste_weight(11) == pytest.approx(2.0)
    assert trainer.copy_paste_weight(1) == pytest.approx(2.0 * trainer.consistency_weight(1) / 1.0)
    no_unlabelled = TCSMTrainer(
        "cpu",
        1,
        batches(1, 2, (8, 8)),
        None,
        tiny_net(),
        torch.optim.SGD(tiny_net().parameters(), lr=0.1),
        dice(),
        TCSMConfig(enabled=True, copy_paste_weight=2.0),
    )
    assert no_unlabelled.copy_paste_weight(5) == 0.0


@pytest.mark.parametrize("apply_to_labeled", [True, False])
def test_pseudo_labels_are_the_teachers_argmax_in_the_original_orientation(monkeypatch, apply_to_labeled):
    # A pixel-wise network commutes with every T, so T^-1(teacher(T(x))) must equal teacher(x)
    # exactly. T is a quarter turn without flip: every flip, and the half turn, is its own
    # inverse, so only a quarter turn tells T^-1 from T.
    monkeypatch.setattr(
        tcsm_module, "sample_transforms", lambda n, **kwargs: [InPlaneTransform(1, False)] * n
    )
    torch.manual_seed(0)
    pointwise = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    unlabelled = batches(3, 3, (10, 14), False, seed=4)
    trainer = _copy_paste_trainer(
        1.0, unlabelled=unlabelled, shape=(10, 14), net=pointwise, apply_to_labeled=apply_to_labeled
    )
    seen = _record_pseudo_labels(monkeypatch, lambda t: t.argmax(dim=1, keepdim=True), trainer)
    trainer.run()
    assert len(seen) == 2
    for pseudo, expected, _ in seen:
        assert pseudo.shape == (2, 1, 10, 14)  # min(2 labelled, 3 unlabelled) pairs
        assert len(pseudo.unique()) > 1
        assert torch.equal(pseudo, expected)
    assert torch.equal(seen[0][2], unlabelled[0]["image"][:2])


def test_copy_paste_trains_the_student_through_the_mixed_images():
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = _copy_paste_trainer(
        1.0,
        unlabelled=batches(1, 2, (12, 12), False, seed=2),
        net=net,
        labelled=batches(1, 2, (12, 12)),
        loss=_MixedOnlyLoss(),
        lr=0.5,
        consistency_weight=0.0,
    )
    trainer.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


class _MixedOnlyLoss(ZeroLoss):
    """Zero on the plain labelled batch; a Dice loss on the second call (the mixed batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.dice = dice()

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.dice(logits, label) if self.calls % 2 == 0 else super().forward(logits, label)


def test_copy_paste_needs_labelled_and_unlabelled_samples_of_one_shape():
    trainer = _copy_paste_trainer(1.0, unlabelled=batches(1, 2, (12, 16), False))
    with pytest.raises(DataError, match="copy_paste_weight"):
        trainer.run()


def test_copy_paste_pseudo_labels_of_one_channel_outputs_are_positive_logits(monkeypatch):
    monkeypatch.setattr(
        tcsm_module, "sample_transforms", lambda n, **kwargs: [InPlaneTransform(0, False)] * n
    )
    identity = nn.Conv2d(1, 1, 1)  # logit = pixel value, so both signs occur
    nn.init.ones_(identity.weight)
    nn.init.zeros_(identity.bias)
    trainer = _copy_paste_trainer(
        1.0,
        unlabelled=batches(1, 2, (12, 12), False, seed=2),
        net=identity,
        labelled=batches(1, 2, (12, 12)),
        loss=ZeroLoss(),
        lr=0.0,
    )
    seen = _record_pseudo_labels(monkeypatch, lambda t: (t > 0).long(), trainer)
    trainer.run()
    pseudo, expected, _ = seen[0]
    assert len(pseudo.unique()) == 2
    assert torch.equal(pseudo, expected)


def test_copy_paste_refuses_a_zoomed_transformation():
    # Undoing a zoom-in leaves a border the teacher never predicted, which argmax reads as background.
    with pytest.raises(ValueError, match="tcsm.scale = 0"):
        TCSMConfig(enabled=True, copy_paste_weight=1.0, scale=0.1)
    assert TCSMConfig(enabled=True, copy_paste_weight=0.0, scale=0.1).scale == 0.1


def _record_pseudo_labels(monkeypatch, hard_labels, trainer: TCSMTrainer) -> list[tuple]:
    """Record, at every copy-paste call, the pseudo-labels the trainer passed, the labels
    ``hard_labels`` makes of the teacher's output on the same unlabelled images (no T), and
    those images."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = tcsm_module.copy_paste_batch

    def spy(labeled, label, unlabeled, pseudo, size, generator):
        with torch.no_grad():
            seen.append((pseudo, hard_labels(trainer.teacher(unlabeled)), unlabeled))
        return real(labeled, label, unlabeled, pseudo, size, generator)

    monkeypatch.setattr(tcsm_module, "copy_paste_batch", spy)
    return seen
