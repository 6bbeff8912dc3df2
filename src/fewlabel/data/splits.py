"""Reproducible train/validation/test splits, stratified by label and grouped by patient.

Images of the same patient (two eyes, several slices or nodules) are strongly correlated, so
a patient must never appear in two splits: otherwise validation and test scores measure
memorisation. :func:`split_indices` therefore splits whole groups when group ids are given.
:func:`split_folds` does the same for k-fold cross-validation: the test cases are held out
first, then the rest is cut into k folds, one of which validates.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from fewlabel.errors import ConfigError

__all__ = ["split_cases", "split_folds", "split_indices"]

log = logging.getLogger(__name__)


def split_indices(
    labels: Sequence[int] | None,
    groups: Sequence[str] | None,
    fractions: dict[str, float],
    seed: int,
    n: int | None = None,
) -> dict[str, np.ndarray]:
    """Split case indices into ``train`` and the named held-out splits.

    Without groups the split is stratified by label with scikit-learn's ``train_test_split``,
    falling back to the grouped assignment below (one group per case) when a class is too
    small for it. With groups (patient ids) whole groups are assigned, so no group is in two
    splits; groups are balanced per label (the group's majority label) by a seeded greedy
    assignment, because scikit-learn's group splitters only make equal-sized folds, not
    arbitrary fractions.

    Args:
        labels: class index of each case, or ``None`` for an unstratified split.
        groups: group (patient) id of each case, or ``None`` when cases are independent.
        fractions: share of cases for each held-out split, e.g. ``{"val": 0.15, "test": 0.15}``;
            the rest is ``"train"``. A zero fraction gives an empty split; a positive fraction
            gives at least one case (or group) when there are enough.
        seed: the split is a pure function of the inputs and this seed.
        n: number of cases; only needed when both ``labels`` and ``groups`` are ``None``.

    Returns:
        ``{"train": ..., **{name: ...}}``: sorted ``int64`` index arrays; every index in
        ``range(n)`` is in exactly one of them.

    Raises:
        ConfigError: if a fraction is negative, they leave nothing for training, a split is
            named ``train``, or the lengths of ``labels`` and ``groups`` differ.
    """
    n = _num_cases(labels, groups, n)
    for name, frac in fractions.items():
        if name == "train":
            raise ConfigError("split fractions name the held-out splits; 'train' takes the rest")
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"split fraction {name}={frac} must be in [0, 1)")
    if sum(fractions.values()) >= 1.0:
        raise ConfigError(f"split fractions {fractions} must sum to less than 1 to leave cases for training")

    label_arr = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if groups is None:
        parts = _split_cases(label_arr, labels is not None, fractions, seed)
    else:
        parts = _split_groups(label_arr, [str(g) for g in groups], fractions, seed)
    out = {"train": parts.pop("train")}
    out.update(parts)
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def split_cases(
    labels: Sequence[int] | None,
    groups: Sequence[str] | None,
    fractions: dict[str, float],
    seed: int,
    folds: int = 0,
    fold: int = 0,
) -> dict[str, np.ndarray]:
    """The split a data section asks for: :func:`split_indices`, or with ``folds`` :func:`split_folds`.

    Args:
        labels: class index of each case, or ``None``.
        groups: group (patient) id of each case, or ``None``.
        fractions: held-out splits, ``val`` among them; with ``folds`` the ``val`` fraction is
            not used (said in the log), as a fold validates instead.
        seed: the split is a pure function of the inputs and this seed.
        folds: ``data.folds``; 0 for a fraction split.
        fold: ``data.fold``, the validating fold.

    Returns:
        ``{"train": ..., "val": ..., **{name: ...}}`` sorted ``int64`` index arrays.
    """
    if not folds:
        return split_indices(labels, groups, fractions, seed)
    held_out = dict(fractions)
    if held_out.pop("val", 0.0) > 0:
        log.info("data.folds is set: data.val_fraction=%s is not used", fractions["val"])
    log.info("cross-validation: fold %d of %d validates (folds 0 to %d)", fold, folds, folds - 1)
    return split_folds(labels, groups, held_out, folds, fold, seed)


def split_folds(
    labels: Sequence[int] | None,
    groups: Sequence[str] | None,
    fractions: dict[str, float],
    folds: int,
    fold: int,
    seed: int,
    n: int | None = None,
) -> dict[str, np.ndarray]:
    """Split case indices for fold ``fold`` of a ``folds``-fold cross-validation.

    The held-out splits of ``fractions`` (e.g. ``{"test": 0.2}``) are taken first, exactly as
    :func:`split_indices` takes them, so every fold of one seed has the same test cases. The
    remaining cases are dealt into ``folds`` folds in one pass (:func:`assign_folds`: by group,
    stratified by label, every fold non-empty), with the same seed whatever ``fold`` is: fold
    ``fold`` becomes ``val`` and the others ``train``, so each case validates exactly one
    fold's model.

    Args:
        labels: class index of each case, or ``None``.
        groups: group (patient) id of each case, or ``None``.
        fractions: held-out splits other than ``val``, as for :func:`split_indices`.
        folds: number of folds, at least 2.
        fold: which fold validates, ``0`` to ``folds - 1``.
        seed: the split is a pure function of the inputs and this seed.
        n: number of cases; only needed when both ``labels`` and ``groups`` are ``None``.

    Returns:
        ``{"train": ..., "val": ..., **{name: ...}}`` sorted ``int64`` index arrays.

    Raises:
        ConfigError: if ``fractions`` names ``val`` or ``train``, ``fold`` is out of range, or
            fewer than ``folds`` groups (cases, without groups) remain for the folds.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ConfigError(
            f"data.fold={fold} must be one of 0 to {folds - 1} with data.folds={folds} (at least 2)"
        )
    if "val" in fractions:
        raise ConfigError("with cross-validation folds the validation cases are a fold, not a fraction")
    n = _num_cases(labels, groups, n)
    outer = split_indices(labels, groups, fractions, seed, n)
    pool = outer.pop("train")
    pool_groups = None if groups is None else [str(groups[i]) for i in pool]
    units = len(pool) if pool_groups is None else len(set(pool_groups))
    if units < folds:
        what = "patients" if groups is not None else "cases"
        raise ConfigError(
            f"data.folds={folds} needs at least {folds} {what} outside the test split, found {units}"
        )
    pool_labels = None if labels is None else [int(labels[i]) for i in pool]
    owner = assign_folds(pool_labels, pool_groups, folds, seed, len(pool))
    return {"train": np.sort(pool[owner != fold]), "val": np.sort(pool[owner == fold]), **outer}


def assign_folds(
    labels: Sequence[int] | None, groups: Sequence[str] | None, folds: int, seed: int, n: int
) -> np.ndarray:
    """Deal ``n`` cases into ``folds`` folds, whole groups at a time, balancing each label.

    Groups (patients; each case alone without groups) are taken in a seeded order, largest
    first, and each goes to the fold holding the fewest cases of its majority label, then the
    fewest cases. Cutting folds as successive fractions instead (k - 1 cuts and a remainder)
    can leave the last fold empty or twice the size of the others when a stratified cut falls
    back to a greedy one. Here, with at least ``folds`` groups, the first ``folds`` groups open
    one fold each, so no fold is empty. Without groups, each label's count differs by at most
    one between folds, and without labels too, so does each fold's size. scikit-learn's
    ``StratifiedGroupKFold`` guarantees neither non-empty folds nor near-equal sizes.

    Args:
        labels: class index of each case, or ``None``.
        groups: group id of each case, or ``None``.
        folds: number of folds.
        seed: the assignment is a pure function of the inputs and this seed.
        n: number of cases.

    Returns:
        The fold index (``0`` to ``folds - 1``) of each case.
    """
    group_of = [str(g) for g in groups] if groups is not None else [str(i) for i in range(n)]
    members, label_of, order = _groups_largest_first(labels, group_of, seed)
    per_label: list[Counter] = [Counter() for _ in range(folds)]
    sizes = [0] * folds
    owner = np.empty(n, dtype=np.int64)
    for g in order:
        lab = label_of[g]
        best = min(range(folds), key=lambda f: (per_label[f][lab], sizes[f]))
        per_label[best][lab] += len(members[g])
        sizes[best] += len(members[g])
        owner[members[g]] = best
    return owner


def _num_cases(labels: Sequence[int] | None, groups: Sequence[str] | None, n: int | None) -> int:
    sizes = {len(x) for x in (labels, groups) if x is not None}
    if len(sizes) > 1:
        raise ConfigError(f"labels ({len(labels)}) and groups ({len(groups)}) differ in length")
    if sizes:
        size = sizes.pop()
        if n is not None and n != size:
            raise ConfigError(f"n={n} does not match the {size} labels/groups given")
        return size
    if n is None:
        raise ConfigError("split_indices needs labels, groups or n")
    return int(n)


def _target_count(frac: float, total: int) -> int:
    if frac <= 0.0:
        return 0
    return max(1, round(frac * total))


def _split_cases(labels: np.ndarray, stratify: bool, fractions: dict[str, float], seed: int) -> dict:
    n = len(labels)
    rng = np.random.default_rng(seed)
    remaining = np.arange(n)
    parts: dict[str, np.ndarray] = {}
    for name, frac in fractions.items():
        k = _target_count(frac, n)
        # Never take the last training case: a split with no training data is useless.
        k = min(k, len(remaining) - 1)
        if k <= 0:
            parts[name] = np.empty(0, dtype=np.int64)
            continue
        state = int(rng.integers(2**31 - 1))
        try:
            strat = labels[remaining] if stratify else None
            rest, taken = train_test_split(remaining, test_size=k, stratify=strat, random_state=state)
        except ValueError:
            # A class with a single member, or fewer held-out cases than classes, defeats
            # scikit-learn's stratification. An unstratified split could then leave a small
            # class out of training altogether; the per-label greedy assignment of patient
            # groups, with one group per case, keeps every class's share instead.
            return _split_groups(labels, [str(i) for i in range(n)], fractions, seed)
        parts[name] = taken
        remaining = rest
    parts["train"] = remaining
    return parts


def _groups_largest_first(
    labels: Sequence[int] | None, groups: Sequence[str], seed: int
) -> tuple[dict[str, list[int]], dict[str, int], list[str]]:
    """Each group's cases and majority label (``0`` without labels), and the groups in order.

    Majority ties go to the smallest label, so the result is deterministic. The order is
    seeded and puts the largest groups first, so that the small ones can even out the totals
    of a greedy assignment; the stable sort keeps the seeded order among groups of equal size.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = sorted(members)
    group_label = {}
    for g in names:
        counts = Counter(int(labels[i]) for i in members[g]) if labels is not None else Counter({0: 1})
        group_label[g] = min(counts, key=lambda lab: (-counts[lab], lab))
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    order.sort(key=lambda g: -len(members[g]))
    return members, group_label, order


def _split_groups(labels: np.ndarray, groups: list[str], fractions: dict[str, float], seed: int) -> dict:
    members, group_label, order = _groups_largest_first(labels, groups, seed)

    active = ["train", *[k for k, f in fractions.items() if f > 0.0]]
    share = {"train": 1.0 - sum(fractions.values()), **{k: fractions[k] for k in active[1:]}}
    label_total = Counter(labels.tolist())
    assigned: dict[str, Counter] = {s: Counter() for s in active}
    chosen: dict[str, list[str]] = {s: [] for s in active}
    for g in order:
        lab = group_label[g]
        # Greedy: the split furthest below its target number of cases of this label.
        best = max(active, key=lambda s: share[s] * label_total[lab] - assigned[s][lab])
        assigned[best][lab] += len(members[g])
        chosen[best].append(g)

    # With very few groups a small held-out split can stay empty; give it the smallest group
    # of the largest split as long as that split keeps at least one group.
    for s in active[1:]:
        if not chosen[s]:
            donor = max(active, key=lambda t: len(chosen[t]))
            if len(chosen[donor]) > 1:
                chosen[s].append(chosen[donor].pop())

    parts = {s: [i for g in chosen[s] for i in members[g]] for s in active}
    for k in fractions:
        parts.setdefault(k, [])
    return parts
