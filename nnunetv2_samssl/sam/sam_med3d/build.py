"""Named SAM-Med3D configurations and the builder.

``vit_b_ori`` is the architecture of the released checkpoints ``sam_med3d.pth`` and
``sam_med3d_turbo.pth`` (100,509,232 parameters plus the 384-value Fourier matrix buffer).
``tiny`` has the same structure (one zero-padded window on the token grid, global blocks, the full
prompt encoder and decoder) at a small width and input size, for tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .model import SAMMed3D
from .prompt_encoder import PromptEncoder3D


@dataclass(frozen=True)
class SAMMed3DConfig:
    """Architecture hyperparameters. Sizes are per axis (cubic input)."""

    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def grid_size(self) -> int:
        """Token / embedding grid per axis (8 for ``vit_b_ori``)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Low-res logits / mask prompt grid per axis (32 for ``vit_b_ori``)."""
        return 4 * self.grid_size


SAM_MED3D_CONFIGS: Dict[str, SAMMed3DConfig] = {
    "vit_b_ori": SAMMed3DConfig(),
    "tiny": SAMMed3DConfig(img_size=32, patch_size=8, encoder_embed_dim=48, encoder_depth=4,
                           encoder_num_heads=4, encoder_global_attn_indexes=(1, 3), window_size=6,
                           prompt_embed_dim=48, mask_in_chans=8, decoder_num_heads=4, decoder_mlp_dim=64,
                           iou_head_hidden_dim=32),
}


def get_config(config: Union[str, SAMMed3DConfig]) -> SAMMed3DConfig:
    """Resolve a configuration name (see ``SAM_MED3D_CONFIGS``) or pass a config through."""
    if isinstance(config, SAMMed3DConfig):
        return config
    try:
        return SAM_MED3D_CONFIGS[config]
    except KeyError:
        raise ValueError(f"unknown SAM-Med3D config {config!r}; choose one of {sorted(SAM_MED3D_CONFIGS)}") from None


def build_sam_med3d(config: Union[str, SAMMed3DConfig] = "vit_b_ori", collapse_padding: bool = True) -> SAMMed3D:
    """Build an (untrained) :class:`SAMMed3D` in eval mode.

    Args:
        config: a name of ``SAM_MED3D_CONFIGS`` or a :class:`SAMMed3DConfig`.
        collapse_padding: attend to the zero-padded window through one collapsed key (exact); set
            ``False`` to materialise the padded window instead.
    Build under ``torch.device("meta")`` to get shapes without allocating weights.
    """
    cfg = get_config(config)
    g = cfg.grid_size
    model = SAMMed3D(
        image_encoder=ImageEncoderViT3D(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            embed_dim=cfg.encoder_embed_dim, depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads,
            mlp_ratio=cfg.mlp_ratio, out_chans=cfg.prompt_embed_dim, qkv_bias=True,
            window_size=cfg.window_size, global_attn_indexes=cfg.encoder_global_attn_indexes,
            collapse_padding=collapse_padding),
        prompt_encoder=PromptEncoder3D(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(g, g, g),
            input_image_size=(cfg.img_size,) * 3, mask_in_chans=cfg.mask_in_chans),
        mask_decoder=MaskDecoder3D(
            transformer_dim=cfg.prompt_embed_dim, num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            transformer_depth=cfg.decoder_depth, transformer_num_heads=cfg.decoder_num_heads,
            transformer_mlp_dim=cfg.decoder_mlp_dim, attention_downsample_rate=cfg.attention_downsample_rate),
    )
    return model.eval()


def expected_state_shapes(config: Union[str, SAMMed3DConfig] = "vit_b_ori") -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of the state dict of ``config``, computed without allocating weights."""
    with torch.device("meta"):
        model = build_sam_med3d(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
