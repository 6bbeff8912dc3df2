"""Restoring a learning-rate schedule on resume, stretched to the run's new length.

``torch.optim.lr_scheduler`` state dicts hold the schedule's length (``T_max``,
``step_size``, ``milestones``...) as well as its position. A run resumed with a larger
``train.max_epochs`` builds its scheduler for the new length, and loading the saved state
would put the old length back: a cosine schedule then climbs back up past its old end.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["load_scheduler_state"]

# Attributes of torch's schedulers that give the schedule's length, not its position.
_LENGTH_ATTRIBUTES = ("T_max", "step_size", "milestones", "total_iters", "_milestones")


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    """Load a saved position into ``scheduler`` but keep the length it was built with.

    A cosine schedule goes on down from the rate where the run stopped and reaches its floor
    at the new length instead of the old one. A step schedule keeps the decays it made and
    makes those of the new length still ahead, so it can end a decay or two lower than a run
    of the new length from the start. When the two schedules differ in their phases (a run
    shorter than its warm-up resumed for longer), the new schedule is replayed up to the
    saved position instead, with a warning: the rate then jumps to the new schedule's.

    Args:
        scheduler: a scheduler built for the resumed run's length (a ``SequentialLR`` too).
        state: the saved ``scheduler.state_dict()``.
    """
    lengths = _lengths(scheduler)
    if _phases(lengths) != _phases(state):
        _replay(scheduler, int(state.get("last_epoch", 0)))
        return
    scheduler.load_state_dict(state)
    _apply(scheduler, lengths)


def _phases(found: dict[str, Any]) -> Any:
    # A state dict and the lengths _lengths() collects share these keys.
    return (found.get("_milestones"), len(found.get("_schedulers", [])))


def _replay(scheduler: Any, position: int) -> None:
    log.warning(
        "the learning-rate schedule of the resumed run has other phases than the saved one "
        "(its warm-up no longer ends where it did); it is replayed to step %d and goes on from there",
        position,
    )
    # From the rates the new schedule started at: the optimizer's loaded ones are the old schedule's.
    for group, rate in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = rate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
        for _ in range(position):
            scheduler.step()


def _lengths(scheduler: Any) -> dict[str, Any]:
    found = {a: copy.copy(getattr(scheduler, a)) for a in _LENGTH_ATTRIBUTES if hasattr(scheduler, a)}
    children = getattr(scheduler, "_schedulers", None)
    if children:
        found["_schedulers"] = [_lengths(child) for child in children]
    return found


def _apply(scheduler: Any, lengths: dict[str, Any]) -> None:
    for name, value in lengths.items():
        if name == "_schedulers":
            for child, child_lengths in zip(scheduler._schedulers, value, strict=True):
                _apply(child, child_lengths)
        else:
            setattr(scheduler, name, value)
