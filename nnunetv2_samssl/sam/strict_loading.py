"""Checkpoint reading and strict state-dict checking shared by every promptable backend (no silent partial
loads, and one clear message naming the setting and the file for every file that is not what it should be)."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from nnunetv2_samssl.errors import UserError

MAX_LISTED = 8
CHECKPOINT_SETTING = "sam_checkpoint"
# torch.save's legacy (pre-zip) files start with a pickled magic number: protocol 2, LONG1 of 10 bytes
_LEGACY_HEADER = b"\x80\x02\x8a\x0a"


class NotACheckpointError(ValueError, UserError):
    """The file behind ``sam_checkpoint`` is empty, truncated or not a PyTorch checkpoint at all."""


def torch_load(path: "os.PathLike[str] | str", weights_only: bool = True, setting: str = CHECKPOINT_SETTING) -> Any:
    """``torch.load`` onto the CPU, with one clear error for a file that is not a checkpoint.

    Raises:
        NotACheckpointError: an empty file, or one ``torch.load`` cannot parse (a text file, random bytes, a
            truncated download). The message names ``setting`` and the file.
        pickle.UnpicklingError: only for a readable checkpoint that holds pickled objects besides tensors while
            ``weights_only`` is set (the callers explain how to convert such a file).
    """
    if os.path.getsize(path) == 0:
        raise NotACheckpointError(f"'{path}' (setting '{setting}') is an empty file (0 bytes), not a checkpoint: "
                                  f"set '{setting}' to the weights file of the chosen sam_backend.")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEADER))
    if not zipfile.is_zipfile(path) and head != _LEGACY_HEADER:
        raise NotACheckpointError(
            f"'{path}' (setting '{setting}') is not a readable PyTorch checkpoint: it is neither the zip archive "
            f"torch.save writes nor its legacy format, so it is truncated (e.g. an interrupted download) or another "
            f"kind of file. Set '{setting}' to a weights file saved with torch.save.")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if weights_only and "Weights only load failed" in str(error):
            raise  # a real checkpoint that needs a full pickle load
        problem = error
    except (EOFError, KeyError, RuntimeError, ValueError, OSError, AttributeError, ModuleNotFoundError) as error:
        problem = error
    raise NotACheckpointError(
        f"'{path}' (setting '{setting}') is not a readable PyTorch checkpoint ({type(problem).__name__}: "
        f"{str(problem)[:200]}): it is truncated or another kind of file. Set '{setting}' to a weights file saved "
        f"with torch.save.") from problem


def checkpoint_family(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which kind of promptable model a state dict holds, judged from its keys: a hint for mismatch messages
    (``"sam_med3d"``, ``"sam2d"``, ``"litemedsam"``), or ``None``."""
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and patch.dim() == 5:
        return "sam_med3d"
    if patch is not None and patch.dim() == 4:
        return "sam2d"
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "litemedsam"
    return None


_FAMILY_HINTS = {
    "sam_med3d": "It looks like a SAM-Med3D (3D) checkpoint: use sam_backend sam_med3d or sam_med3d_turbo.",
    "sam2d": "It looks like a 2D segment-anything checkpoint: use sam_backend sam2d_vit_b, sam2d_vit_l or "
             "sam2d_vit_h.",
    "litemedsam": "It looks like a LiteMedSAM (TinyViT) checkpoint: use sam_backend litemedsam.",
}


def family_hint(state_dict: Mapping[str, torch.Tensor], backend_family: str) -> str:
    """A sentence saying which backend the checkpoint is for, when that is not ``backend_family``."""
    family = checkpoint_family(state_dict)
    return _FAMILY_HINTS[family] if family is not None and family != backend_family else ""


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
