"""Labeled-subset mode: which training cases of a fold stay labeled."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_samssl.errors import UserError


class LabeledSubsetError(ValueError, UserError):
    """num_labeled / labeled_cases do not fit the fold."""


def choose_labeled_subset(train_cases: Sequence[str], num_labeled: Optional[int] = None,
                          labeled_cases: Optional[Sequence[str]] = None,
                          seed: int = 12345) -> Tuple[List[str], List[str]]:
    """Splits a fold's training cases into (labeled, unlabeled), both sorted.

    With ``num_labeled`` the choice is a seeded permutation of the sorted cases, so subsets are nested:
    the 2 labeled cases of a seed contain its 1 labeled case, the 4 contain the 2, and so on.
    With neither argument every case stays labeled.
    """
    cases = sorted(train_cases)
    if num_labeled is not None and labeled_cases is not None:
        raise LabeledSubsetError("Give either num_labeled or labeled_cases, not both.")
    if labeled_cases is not None:
        unknown = sorted(set(labeled_cases) - set(cases))
        if unknown:
            raise LabeledSubsetError(
                f"labeled_cases lists {unknown[:5]}, which are not training cases of this fold "
                f"(its {len(cases)} training cases: {cases[:8]}{' ...' if len(cases) > 8 else ''}).")
        labeled = sorted(set(labeled_cases))
    elif num_labeled is not None:
        if not 1 <= num_labeled <= len(cases):
            raise LabeledSubsetError(
                f"num_labeled={num_labeled} must lie between 1 and the fold's {len(cases)} training cases.")
        order = np.random.RandomState(seed).permutation(len(cases))
        labeled = sorted(cases[i] for i in order[:num_labeled])
    else:
        return cases, []
    unlabeled = [c for c in cases if c not in set(labeled)]
    return labeled, unlabeled
