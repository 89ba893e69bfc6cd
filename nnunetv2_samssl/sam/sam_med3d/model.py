"""The assembled SAM-Med3D model: image encoder, prompt encoder and mask decoder."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class SAMMed3D(nn.Module):
    """SAM-Med3D: encode a 3D crop once, decode many prompt sets against the cached embedding.

    State-dict keys are those of the released checkpoints: ``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``. Images are ``(B, 1, S, S, S)`` crops already normalised (see
    ``SAMMed3DPromptable.normalize``); points are voxel coordinates in that crop, tensor axis order.
    """

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D,
                 mask_decoder: MaskDecoder3D) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S, S)`` -> image embeddings ``(B, C, G, G, G)`` (384 x 8^3 for ``vit_b_ori``)."""
        return self.image_encoder(images)

    def decode(self, image_embeddings: torch.Tensor, point_coords: Optional[torch.Tensor] = None,
               point_labels: Optional[torch.Tensor] = None, mask_inputs: Optional[torch.Tensor] = None,
               multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per row, batched over rows.

        Args:
            image_embeddings: ``(Q, C, G, G, G)``, or ``(1, C, G, G, G)`` shared by all ``Q`` prompt sets.
            point_coords: ``(Q, N, 3)`` voxel coordinates in the ``S^3`` input grid, tensor axis order.
            point_labels: ``(Q, N)``: 1 positive, 0 negative, -1 padding (ignored).
            mask_inputs: ``(Q, 1, 4G, 4G, 4G)`` low-res logits of a previous decode, or ``None``.
            multimask_output: return the 3 multimask outputs instead of the single-mask output.
        Returns:
            ``low_res_logits (Q, M, 4G, 4G, 4G)`` and ``iou_pred (Q, M)`` with ``M = 1`` or 3.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense, sparse_valid = self.prompt_encoder(points=points, masks=mask_inputs,
                                                          batch_size=image_embeddings.shape[0])
        return self.mask_decoder(image_embeddings=image_embeddings,
                                 image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense,
                                 multimask_output=multimask_output,
                                 sparse_valid=sparse_valid)

    def forward(self, images: torch.Tensor, point_coords: Optional[torch.Tensor] = None,
                point_labels: Optional[torch.Tensor] = None, mask_inputs: Optional[torch.Tensor] = None,
                multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode ``images (B, 1, S, S, S)`` and decode one prompt set per image (see :meth:`decode`)."""
        return self.decode(self.encode_image(images), point_coords, point_labels, mask_inputs, multimask_output)
