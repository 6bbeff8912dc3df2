"""Learning-rate warm-up and label smoothing of the classification trainer."""

from __future__ import annotations

import itertools

import pytest
import torch

from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.engines.classification import AuxiliaryLoss, build_scheduler


def _rates(scheduler, optimizer, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_rises_linearly_then_cosine_decays():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.05)
    rates = _rates(build_scheduler(optimizer, "cosine", 10, warmup_epochs=3), optimizer, 10)
    assert rates[:4] == pytest.approx([0.005, 0.02, 0.035, 0.05])
    assert all(a > b for a, b in itertools.pairwise(rates[3:]))
    assert rates[-1] < 0.01


def test_warmup_scheduler_state_is_weights_only_safe(tmp_path):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.05)
    scheduler = build_scheduler(optimizer, "none", 6, warmup_epochs=2)
    _rates(scheduler, optimizer, 3)
    path = save_checkpoint({"scheduler": scheduler.state_dict()}, tmp_path / "s.pt")
    optimizer2 = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.05)
    scheduler2 = build_scheduler(optimizer2, "none", 6, warmup_epochs=2)
    scheduler2.load_state_dict(load_checkpoint(path)["scheduler"])
    assert scheduler2.last_epoch == scheduler.last_epoch


def test_label_smoothing_penalises_overconfidence():
    logits = torch.tensor([[12.0, 0.0, 0.0]])
    target = torch.tensor([0])
    plain = AuxiliaryLoss()(logits, [], target)
    smooth = AuxiliaryLoss(label_smoothing=0.1)(logits, [], target)
    assert smooth > plain + 0.1
