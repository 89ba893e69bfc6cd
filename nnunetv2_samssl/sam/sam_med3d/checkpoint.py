"""Loading SAM-Med3D weights safely and strictly.

The released files (``sam_med3d.pth``, ``sam_med3d_turbo.pth``) are training checkpoints: a dict with
``model_state_dict`` (the weights, upstream key names) and training state, including the training
arguments as a pickled ``argparse.Namespace``. Reading them needs ``torch.load(weights_only=False)``,
which runs code stored in the file. The safe route is to convert such a file once with
``nnUNetv2_samssl_convert_sam_med3d -i sam_med3d_turbo.pth -o sam_med3d_turbo_weights.pth``
(see :mod:`.convert`) and point the setting ``sam_checkpoint`` at the tensors-only result, which loads
with ``weights_only=True``. Setting ``sam_checkpoint_allow_pickle: true`` loads a pickled file
directly, for files one trusts.

Every load is strict: missing keys, unexpected keys and shape mismatches are all reported and refused
(a loader that ignores them silently runs a partly random model).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from nnunetv2_samssl.errors import UserError
from nnunetv2_samssl.sam.strict_loading import (CHECKPOINT_SETTING, family_hint, listed, state_dict_problems,
                                                torch_load)

from .build import SAMMed3DConfig, build_sam_med3d, expected_state_shapes
from .model import SAMMed3D

ALLOW_PICKLE_SETTING = "sam_checkpoint_allow_pickle"
CONVERT_COMMAND = "nnUNetv2_samssl_convert_sam_med3d"

PathLike = Union[str, "os.PathLike[str]"]


class SAMCheckpointError(ValueError, UserError):
    """A SAM-Med3D checkpoint could not be loaded as configured (message says which setting to fix)."""


def extract_model_state_dict(obj, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint object.

    Accepts a training checkpoint (dict with ``model_state_dict``) or a plain ``{key: tensor}`` dict.
    A uniform ``module.`` prefix (weights saved from a DistributedDataParallel wrapper) is removed.
    """
    if not isinstance(obj, Mapping):
        raise SAMCheckpointError(f"{CHECKPOINT_SETTING} {source}: expected a dict of weights, got {type(obj).__name__}")
    state = obj.get("model_state_dict", obj)
    if not isinstance(state, Mapping) or not state:
        raise SAMCheckpointError(f"{CHECKPOINT_SETTING} {source}: 'model_state_dict' is not a non-empty dict of tensors")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise SAMCheckpointError(
            f"{CHECKPOINT_SETTING} {source}: expected a SAM-Med3D training checkpoint (a dict with "
            f"'model_state_dict') or a plain dict of tensors; these entries are not tensors: {listed([str(k) for k in not_tensors])}")
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_sam_med3d_state_dict(path: Optional[PathLike], allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read the SAM-Med3D weights of ``path`` onto the CPU.

    Args:
        path: value of the setting ``sam_checkpoint``: a tensors-only ``.pth`` (from the conversion
            command), a ``.safetensors`` file, or, with ``allow_pickle``, an official training checkpoint.
        allow_pickle: permit ``torch.load(weights_only=False)``, which executes code from the file
            (setting ``sam_checkpoint_allow_pickle``). Only for files you trust.
    Returns:
        ``{key: tensor}`` with upstream key names (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    Raises:
        FileNotFoundError: no such file. SAMCheckpointError: unusable content, or pickle needed but not allowed.
    """
    if path is None or str(path).strip() == "":
        raise SAMCheckpointError(f"the setting '{CHECKPOINT_SETTING}' is empty: set it to a SAM-Med3D weights "
                                 f"file (e.g. the output of {CONVERT_COMMAND})")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{CHECKPOINT_SETTING}: no such file: {path} (set '{CHECKPOINT_SETTING}' to an "
                                "existing SAM-Med3D weights file)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise SAMCheckpointError(f"{CHECKPOINT_SETTING} {path} is a .safetensors file; install the "
                                     "'safetensors' package to read it") from e
        return extract_model_state_dict(load_file(str(path), device="cpu"), str(path))
    try:
        obj = torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise SAMCheckpointError(
                f"{CHECKPOINT_SETTING} {path} holds pickled Python objects besides tensors (the official "
                "SAM-Med3D files store their training arguments that way), and loading it would execute code "
                f"from the file. Convert it once into a tensors-only file and point '{CHECKPOINT_SETTING}' at "
                f"the result:\n    {CONVERT_COMMAND} -i {path} -o {path.with_name(path.stem + '_weights.pth')}\n"
                f"or, if you trust the file, set '{ALLOW_PICKLE_SETTING}: true'.") from e
        obj = torch_load(path, weights_only=False)
    return extract_model_state_dict(obj, str(path))


def check_state_dict(state_dict: Mapping, config: Union[str, SAMMed3DConfig] = "vit_b_ori",
                     source: str = "checkpoint") -> None:
    """Raise :class:`SAMCheckpointError` unless ``state_dict`` has exactly the keys and shapes of ``config``.

    The message lists missing keys, unexpected keys and shape mismatches (checkpoint vs model).
    """
    expected = expected_state_shapes(config)
    name = config if isinstance(config, str) else "custom"
    parts = state_dict_problems(state_dict, expected)
    if parts:
        hint = family_hint(state_dict, "sam_med3d")
        raise SAMCheckpointError(f"{CHECKPOINT_SETTING} {source} does not match the SAM-Med3D architecture "
                                 f"'{name}' ({'; '.join(parts)})" + (f". {hint}" if hint else ""))


def matching_config(state_dict: Mapping) -> str:
    """The named configuration (``SAM_MED3D_CONFIGS``) whose keys and shapes ``state_dict`` has exactly; the
    released architecture ``vit_b_ori`` when none does (so the mismatch is reported against it)."""
    from .build import SAM_MED3D_CONFIGS
    for name in SAM_MED3D_CONFIGS:
        if not state_dict_problems(state_dict, expected_state_shapes(name)):
            return name
    return "vit_b_ori"


def load_sam_med3d(path: Optional[PathLike], config: Union[str, SAMMed3DConfig] = "vit_b_ori",
                   allow_pickle: bool = False, device: Union[str, torch.device] = "cpu") -> SAMMed3D:
    """Build ``config`` and load the weights of ``path`` strictly; float32, eval mode, on ``device``.
    ``config="auto"``: the named configuration the weights fit (:func:`matching_config`)."""
    state_dict = load_sam_med3d_state_dict(path, allow_pickle=allow_pickle)
    if config == "auto":
        config = matching_config(state_dict)
    check_state_dict(state_dict, config, source=str(path))
    with torch.device("meta"):
        model = build_sam_med3d(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval()
