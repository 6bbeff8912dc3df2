"""How much of a predicted mask is in doubt: one number per study, for triage.

With few annotations the natural questions after a prediction run are which masks to review
first and which studies to annotate next. Both want the cases the model is least sure of.
:func:`mask_uncertainty` scores that from the class probabilities alone: of the voxels that
are predicted as lesion or are doubtful (the most probable class below ``confident``), the
share that are doubtful. It ignores the confident background that fills most of a study, so
small and large lesions compare, and it is 0 for a study predicted lesion-free with
confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fewlabel.metrics.segmentation import CaseResult

__all__ = ["DOUBT_THRESHOLD", "mask_uncertainty", "uncertainty_dice_correlation"]

DOUBT_THRESHOLD = 0.75


def mask_uncertainty(probs: np.ndarray, confident: float = DOUBT_THRESHOLD) -> float:
    """The share of the predicted-or-doubtful voxels whose most probable class is below ``confident``.

    Args:
        probs: class probabilities ``(K, *shape)``, class 0 the background.
        confident: a voxel whose most probable class has at least this probability is sure.

    Returns:
        A value in [0, 1]: 0 when every voxel predicted as foreground is sure (or there is
        none and no doubtful voxel), 1 when every candidate voxel is doubtful.
    """
    top = probs.max(axis=0)
    doubtful = top < confident
    candidates = doubtful | (probs.argmax(axis=0) != 0)
    count = int(candidates.sum())
    return float(doubtful.sum() / count) if count else 0.0


def uncertainty_dice_correlation(cases: Sequence[CaseResult], classes: Mapping[int, str]) -> dict[str, float]:
    """Spearman's rank correlation between the cases' uncertainty and their Dice, per class.

    A clearly negative value says that the uncertainty of ``fewlabel predict`` points at the
    worse masks, so sorting new studies by it puts the ones to review first on top.

    Args:
        cases: evaluated cases with ``uncertainty`` set.
        classes: class index → name of the classes to correlate (foreground and merged).

    Returns:
        Class name → Spearman's ρ over the cases where both values are defined; classes with
        fewer than three such cases, or a constant uncertainty or Dice, are left out.
    """
    from scipy.stats import spearmanr

    out = {}
    for k, name in classes.items():
        pairs = [
            (c.uncertainty, c.metrics.get("dice", {}).get(k, np.nan))
            for c in cases
            if c.uncertainty is not None
        ]
        pairs = [(u, d) for u, d in pairs if np.isfinite(d)]
        if len(pairs) < 3:
            continue
        u, d = np.array(pairs, dtype=float).T
        if np.ptp(u) == 0 or np.ptp(d) == 0:
            continue
        out[name] = round(float(spearmanr(u, d).statistic), 3)
    return out
