import pytest

from nnunetv2_samssl.data.splits import LabeledSubsetError, choose_labeled_subset
from nnunetv2_samssl.data.unlabeled_loader import split_batch_size

CASES = [f"c{i:02d}" for i in range(10)]


def test_num_labeled_is_seeded_nested_and_disjoint():
    subsets = [choose_labeled_subset(CASES, n, seed=7) for n in (1, 2, 4, 10)]
    for (lab, unl) in subsets:
        assert set(lab).isdisjoint(unl) and sorted(lab + unl) == CASES
    assert set(subsets[0][0]) < set(subsets[1][0]) < set(subsets[2][0])
    assert subsets[3][1] == []
    assert choose_labeled_subset(CASES, 4, seed=7) == subsets[2]
    assert choose_labeled_subset(CASES, 4, seed=8) != subsets[2]


def test_explicit_labeled_cases():
    lab, unl = choose_labeled_subset(CASES, labeled_cases=["c03", "c01"])
    assert lab == ["c01", "c03"] and len(unl) == 8


@pytest.mark.parametrize("kwargs,match", [
    ({"num_labeled": 11}, "between 1 and the fold's 10"),
    ({"num_labeled": 0}, "between 1"),
    ({"labeled_cases": ["zz"]}, "not training cases of this fold"),
    ({"num_labeled": 1, "labeled_cases": ["c01"]}, "not both"),
])
def test_errors(kwargs, match):
    with pytest.raises(LabeledSubsetError, match=match):
        choose_labeled_subset(CASES, **kwargs)


def test_no_subset_keeps_everything_labeled():
    assert choose_labeled_subset(CASES) == (CASES, [])


def test_split_batch_size_over_ranks():
    assert [split_batch_size(5, 2, r) for r in range(2)] == [3, 2]
    assert [split_batch_size(4, 4, r) for r in range(4)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="smaller than the 4 DDP ranks"):
        split_batch_size(3, 4, 0)
