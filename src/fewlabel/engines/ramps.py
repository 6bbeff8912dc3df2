"""Ramp-up schedules for the weight of an unsupervised loss."""

from __future__ import annotations

import math

__all__ = ["sigmoid_rampup"]


def sigmoid_rampup(iteration: int, length: int) -> float:
    """The sigmoid-shaped ramp of Laine & Aila, used by mean teacher and TCSM.

    ``exp(-5 (1 - t)^2)`` with ``t = iteration / length`` clipped to ``[0, 1]``: it starts at
    ``exp(-5) ≈ 0.0067`` and reaches 1 at ``iteration == length``.

    Args:
        iteration: the current (0-based) iteration.
        length: iterations the ramp lasts; 0 means no ramp.

    Returns:
        The ramp value in ``(0, 1]``.

    Raises:
        ValueError: if ``length`` is negative.
    """
    if length < 0:
        raise ValueError(f"ramp length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    t = min(max(iteration / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
