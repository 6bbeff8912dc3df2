"""Restoring a learning-rate schedule on resume, stretched to the run's new length.

``torch.optim.lr_scheduler`` state dicts hold the schedule's length (``T_max``,
``step_size``, ``milestones``...) as well as its position. A run resumed with a larger
``train.max_epochs`` builds its scheduler for the new length, and loading the saved state
would put the old length back: a cosine schedule then climbs back up past its old end.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["load_scheduler_state"]

# Attributes of torch's schedulers that give the schedule's length, not its position.
_LENGTH_ATTRIBUTES = ("T_max", "step_size", "milestones", "total_iters", "_milestones")


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    """Load a saved position into ``scheduler`` but keep the length it was built with.

    The rates continue from where the run stopped (the chainable forms of cosine and step
    schedules go on from the current rate) and reach the end of the schedule at the new
    length instead of the old one.

    Args:
        scheduler: a scheduler built for the resumed run's length (a ``SequentialLR`` too).
        state: the saved ``scheduler.state_dict()``.
    """
    lengths = _lengths(scheduler)
    scheduler.load_state_dict(state)
    _apply(scheduler, lengths)


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
