"""Tests for patient-grouped, stratified splitting."""

from __future__ import annotations

import numpy as np
import pytest

from fewlabel.data.splits import split_indices
from fewlabel.errors import ConfigError

FRACTIONS = {"val": 0.2, "test": 0.2}


def _grouped_data(n_patients: int = 60, seed: int = 0) -> tuple[list[int], list[str]]:
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_patients):
        grade = p % 3
        for _ in range(int(rng.integers(1, 4))):  # 1 to 3 images per patient
            labels.append(grade)
            groups.append(f"patient{p}")
    return labels, groups


def _assert_partition(parts: dict[str, np.ndarray], n: int) -> None:
    joined = np.concatenate(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(n)), "every index must be in exactly one split"
    for idx in parts.values():
        assert np.all(np.diff(idx) > 0), "indices are sorted and unique"


def test_groups_never_shared_and_every_index_used_once():
    labels, groups = _grouped_data()
    parts = split_indices(labels, groups, FRACTIONS, seed=3)
    assert set(parts) == {"train", "val", "test"}
    _assert_partition(parts, len(labels))
    owner = {}
    for name, idx in parts.items():
        for i in idx:
            assert owner.setdefault(groups[i], name) == name, (
                f"{groups[i]} is in {owner[groups[i]]} and {name}"
            )


def test_grouped_split_keeps_label_proportions_roughly():
    labels, groups = _grouped_data(n_patients=150)
    parts = split_indices(labels, groups, FRACTIONS, seed=1)
    n = len(labels)
    for name, frac in (("train", 0.6), *FRACTIONS.items()):
        assert abs(len(parts[name]) / n - frac) < 0.05
        sub = np.asarray(labels)[parts[name]]
        for c in range(3):
            assert abs(np.mean(sub == c) - 1 / 3) < 0.08


def test_reproducible_and_seed_dependent():
    labels, groups = _grouped_data()
    a = split_indices(labels, groups, FRACTIONS, seed=7)
    b = split_indices(labels, groups, FRACTIONS, seed=7)
    c = split_indices(labels, groups, FRACTIONS, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)

    flat = list(range(5)) * 20
    d = split_indices(flat, None, FRACTIONS, seed=7)
    e = split_indices(flat, None, FRACTIONS, seed=7)
    f = split_indices(flat, None, FRACTIONS, seed=8)
    assert all(np.array_equal(d[k], e[k]) for k in d)
    assert not all(np.array_equal(d[k], f[k]) for k in d)


def test_ungrouped_split_is_stratified():
    labels = [0] * 80 + [1] * 20  # imbalanced
    parts = split_indices(labels, None, {"val": 0.1, "test": 0.2}, seed=0)
    _assert_partition(parts, 100)
    lab = np.asarray(labels)
    assert len(parts["val"]) == 10 and len(parts["test"]) == 20
    assert np.sum(lab[parts["val"]] == 1) == 2
    assert np.sum(lab[parts["test"]] == 1) == 4


def test_tiny_class_falls_back_to_the_per_label_assignment():
    labels = [0] * 10 + [1]  # one image of class 1 cannot be stratified
    parts = split_indices(labels, None, FRACTIONS, seed=0)
    _assert_partition(parts, 11)
    assert len(parts["val"]) == 2 and len(parts["test"]) == 2


def test_zero_fraction_gives_empty_split_and_unlabelled_split_works():
    parts = split_indices(None, None, {"val": 0.25, "test": 0.0}, seed=0, n=12)
    _assert_partition(parts, 12)
    assert len(parts["test"]) == 0 and len(parts["val"]) == 3
    grouped = split_indices(None, [f"g{i // 2}" for i in range(12)], {"val": 0.0, "test": 0.3}, seed=0)
    assert len(grouped["val"]) == 0 and len(grouped["test"]) > 0


def test_small_heldout_split_gets_a_group():
    groups = ["a", "a", "b", "b", "c", "c"]
    parts = split_indices([0] * 6, groups, {"val": 0.1}, seed=0)
    assert len(parts["val"]) == 2 and len(parts["train"]) == 4


def test_invalid_fractions_are_refused():
    with pytest.raises(ConfigError):
        split_indices([0, 1] * 5, None, {"val": 0.6, "test": 0.5}, seed=0)
    with pytest.raises(ConfigError):
        split_indices([0, 1] * 5, None, {"train": 0.5}, seed=0)
    with pytest.raises(ConfigError):
        split_indices([0, 1], ["a"], {"val": 0.5}, seed=0)


def test_a_class_too_small_to_stratify_still_reaches_training():
    # One single-image class defeats scikit-learn's stratification; the two-image classes must
    # not then lose both images to validation and test.
    counts = (10, 2, 2, 1)
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    for seed in range(50):
        parts = split_indices(labels, None, {"val": 0.15, "test": 0.15}, seed=seed)
        assert set(np.asarray(labels)[parts["train"]].tolist()) >= {0, 1, 2}, seed
        assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(labels)))


def test_folds_partition_the_non_test_cases_and_share_one_test_split():
    from fewlabel.data.splits import split_folds

    labels, groups = _grouped_data(n_patients=40)
    folds = [split_folds(labels, groups, {"test": 0.2}, 5, f, seed=2) for f in range(5)]
    for parts in folds:
        assert set(parts) == {"train", "val", "test"}
        _assert_partition(parts, len(labels))
        owner = {}
        for name, idx in parts.items():
            for i in idx:
                assert owner.setdefault(groups[i], name) == name, "a patient in two parts"
        np.testing.assert_array_equal(parts["test"], folds[0]["test"])
    # Each non-test case validates exactly one fold; the folds are about equal in patients.
    vals = np.concatenate([p["val"] for p in folds])
    assert sorted(vals.tolist()) == sorted(np.concatenate([folds[0]["train"], folds[0]["val"]]).tolist())
    patients = [len({groups[i] for i in p["val"]}) for p in folds]
    assert max(patients) - min(patients) <= 1, patients
    # Stratified: every fold validates on every grade.
    assert all({labels[i] for i in p["val"]} == {0, 1, 2} for p in folds)
    # The same seed gives the same folds; the test split is split_indices' own.
    again = split_folds(labels, groups, {"test": 0.2}, 5, 3, seed=2)
    assert all(np.array_equal(again[k], folds[3][k]) for k in again)
    np.testing.assert_array_equal(
        folds[0]["test"], split_indices(labels, groups, {"test": 0.2}, seed=2)["test"]
    )


@pytest.mark.parametrize("grouped", [False, True])
def test_no_fold_is_empty_and_each_grade_is_dealt_evenly(grouped):
    from fewlabel.data.splits import assign_folds

    # Successive fractional cuts left the last fold empty here (12 cases, 3 grades, 5 folds)
    # and made it twice the size of the others in many more cases.
    for n in range(6, 41):
        for k in range(2, min(6, n // 2) + 1):
            for grades in (1, 2, 3):
                labels = [i % grades for i in range(n)]
                groups = [f"p{i // 2}" for i in range(n)] if grouped else None
                owner = assign_folds(labels, groups, k, seed=n, n=n)
                assert sorted(set(owner.tolist())) == list(range(k)), (n, k, grades)
                if grouped:
                    patients = [{groups[i] for i in np.flatnonzero(owner == f)} for f in range(k)]
                    assert sum(len(p) for p in patients) == len(set(groups)), "a patient in two folds"
                    continue
                for grade in range(grades):
                    counts = [int(((owner == f) & (np.array(labels) == grade)).sum()) for f in range(k)]
                    assert max(counts) - min(counts) <= 1, (n, k, grades, counts)
    sizes = np.bincount(assign_folds(None, None, 4, seed=0, n=10))
    assert sorted(sizes.tolist()) == [2, 2, 3, 3]


def test_folds_refuse_what_cannot_be_cut():
    from fewlabel.data.splits import split_folds

    with pytest.raises(ConfigError, match="needs at least 5 patients outside the test split, found 3"):
        split_folds(None, ["a", "a", "b", "c", "c", "d"], {"test": 0.25}, 5, 0, seed=0)
    with pytest.raises(ConfigError, match="data.fold=4 must be one of 0 to 3"):
        split_folds(None, None, {}, 4, 4, seed=0, n=20)
    with pytest.raises(ConfigError, match="a fold, not a fraction"):
        split_folds(None, None, {"val": 0.2}, 4, 0, seed=0, n=20)
    # Without groups the cases are cut one by one.
    sizes = [len(split_folds(None, None, {}, 4, f, seed=0, n=10)["val"]) for f in range(4)]
    assert sorted(sizes) == [2, 2, 3, 3]
