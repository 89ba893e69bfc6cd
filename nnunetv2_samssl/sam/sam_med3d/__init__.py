"""SAM-Med3D (3D promptable segmentation), architecture ``vit_b_ori`` of the released checkpoints.

Components (one per module): :mod:`.image_encoder`, :mod:`.prompt_encoder`, :mod:`.mask_decoder`,
:mod:`.transformer`, the assembled :class:`SAMMed3D` (:mod:`.model`), named configurations
(:mod:`.build`), strict and safe weight loading (:mod:`.checkpoint`, :mod:`.convert`) and the
promptable-model adapter :class:`SAMMed3DPromptable` (:mod:`.promptable`).
"""
from .build import SAM_MED3D_CONFIGS, SAMMed3DConfig, build_sam_med3d, expected_state_shapes, get_config
from .checkpoint import SAMCheckpointError, check_state_dict, load_sam_med3d, load_sam_med3d_state_dict
from .model import SAMMed3D
from .promptable import SAMMed3DPromptable

__all__ = [
    "SAM_MED3D_CONFIGS", "SAMMed3DConfig", "build_sam_med3d", "expected_state_shapes", "get_config",
    "SAMCheckpointError", "check_state_dict", "load_sam_med3d", "load_sam_med3d_state_dict",
    "SAMMed3D", "SAMMed3DPromptable",
]
