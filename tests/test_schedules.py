"""Learning-rate schedules restored on resume keep the resumed run's length."""

from __future__ import annotations

import itertools

import pytest
import torch

from fewlabel.config.segmentation import SegmentationTrain
from fewlabel.engines import classification, segmentation
from fewlabel.engines.schedules import load_scheduler_state


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)


def _rates(build, steps: int, resume_at: int | None = None, build_resumed=None) -> list[float]:
    """The rate of each step; with ``resume_at``, the state moves to a scheduler ``build_resumed`` makes."""
    optimizer = _optimizer()
    scheduler = build(optimizer)
    rates = []
    for step in range(steps):
        if step == resume_at:
            saved, saved_optimizer = scheduler.state_dict(), optimizer.state_dict()
            optimizer = _optimizer()
            scheduler = build_resumed(optimizer)
            optimizer.load_state_dict(saved_optimizer)
            load_scheduler_state(scheduler, saved)
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup", [0, 1])
def test_a_cosine_schedule_resumed_for_more_epochs_goes_on_down_to_its_new_end(warmup):
    def build(epochs):
        return lambda opt: classification.build_scheduler(opt, "cosine", epochs, warmup)

    rates = _rates(build(4), 8, resume_at=2, build_resumed=build(8))
    after = rates[2:]
    # Torch's saved T_max (4) made the rate climb back up after epoch 4, to 0.01 at epoch 8.
    assert all(b < a for a, b in itertools.pairwise(after))
    assert rates[-1] < 0.001
    assert rates[:3] == pytest.approx(_rates(build(4), 3))  # the epochs before the stop are as they were


def test_a_step_schedule_resumed_for_more_epochs_never_rises():
    def build(epochs):
        return lambda opt: classification.build_scheduler(opt, "step", epochs)

    rates = _rates(build(3), 9, resume_at=2, build_resumed=build(9))
    assert all(b <= a for a, b in itertools.pairwise(rates))


def test_a_segmentation_schedule_resumed_for_more_iterations_keeps_the_new_length():
    train = SegmentationTrain(scheduler="cosine")

    def build(total):
        return lambda opt: segmentation.build_scheduler(train, opt, total)

    rates = _rates(build(10), 20, resume_at=5, build_resumed=build(20))
    assert all(b < a for a, b in itertools.pairwise(rates[5:])) and rates[-1] < 0.001


def test_a_run_shorter_than_its_warm_up_resumed_for_longer_follows_the_new_schedule(caplog):
    # The 3-epoch run's warm-up was cut to 2 epochs; the 12-epoch run's lasts 5.
    def build(epochs):
        return lambda opt: classification.build_scheduler(opt, "cosine", epochs, 5)

    with caplog.at_level("WARNING"):
        rates = _rates(build(3), 12, resume_at=3, build_resumed=build(12))
    assert "replayed to step 3" in caplog.text
    assert rates[3:] == pytest.approx(_rates(build(12), 12)[3:])
    # one epoch with a warm-up has no warm-up at all: its state does not even fit (KeyError before)
    assert len(_rates(build(1), 6, resume_at=1, build_resumed=build(6))) == 6
