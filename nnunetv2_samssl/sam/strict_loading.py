"""Strict state-dict checking shared by every promptable backend (no silent partial loads)."""
from __future__ import annotations

from typing import List, Mapping, Sequence, Tuple

import torch

MAX_LISTED = 8


def listed(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``"a, b, c, ... and 5 more"``."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def state_dict_problems(state_dict: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, Tuple[int, ...]]
                        ) -> List[str]:
    """Missing keys, unexpected keys and shape mismatches (checkpoint vs model), one message each; empty if
    ``state_dict`` matches ``expected_shapes`` exactly."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    wrong = sorted(f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected_shapes[k])})"
                   for k in set(expected_shapes) & set(state_dict)
                   if tuple(state_dict[k].shape) != tuple(expected_shapes[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {listed(wrong)}")
    return problems
