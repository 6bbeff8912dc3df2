"""Learning-rate warm-up, label smoothing and weight averaging of the classification trainer."""

from __future__ import annotations

import itertools

import pytest
import torch
from ignite.engine import Engine, Events

from _factories import tiny_classification_config, write_config
from fewlabel.cli import main
from fewlabel.data.synthetic_fundus import make_synthetic_fundus
from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.engines.classification import AuxiliaryLoss, build_scheduler, weight_average


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


def test_weight_average_follows_its_formula_for_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert weight_average(model, 0.0) is None
    ema = weight_average(model, 0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {k: v.clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def step(engine, batch):
        model.train()
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()

    trainer = Engine(step)
    ema.attach(trainer, name="ema_momentum")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _track(engine):  # attached after the handler: sees the state it has just averaged
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = 0.75 * expected[key] + 0.25 * value.float()

    trainer.run([torch.randn(5, 3) for _ in range(4)], max_epochs=1)
    averaged = ema.ema_model.state_dict()
    for key, value in expected.items():
        assert torch.allclose(averaged[key], value, atol=1e-6), key
    # the average lags the trained weights, running statistics included
    assert not torch.allclose(averaged["1.running_mean"], model.state_dict()["1.running_mean"])


@pytest.mark.slow
def test_ema_decay_keeps_the_averaged_weights_as_best_checkpoint(tmp_path):
    data = make_synthetic_fundus(tmp_path / "fundus", n_per_class=4, num_classes=3, size=32)
    cfg = tiny_classification_config(
        data,
        tmp_path / "runs",
        data={"val_fraction": 0.0},  # without validation best.pt is the model after the last epoch
        model={"aux_logits": False},
        train={"max_epochs": 2, "batch_size": 3, "ema_decay": 0.5},
    )
    assert main(["train", str(write_config(tmp_path / "exp.yaml", cfg))]) == 0
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    best, last = load_checkpoint(checkpoints / "best.pt"), load_checkpoint(checkpoints / "last.pt")
    weight = "net.fc.weight"
    assert torch.equal(best["model"][weight], last["ema_model"][weight])
    assert not torch.equal(best["model"][weight], last["model"][weight])
