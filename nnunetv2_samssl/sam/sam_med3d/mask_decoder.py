"""SAM-Med3D mask decoder: two-way transformer, 3D upscaling and hypernetwork mask heads."""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import LayerNorm3d, TwoWayTransformer3D


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them: ``(..., input_dim) -> (..., output_dim)``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class MaskDecoder3D(nn.Module):
    """Predicts low-resolution mask logits and IoU estimates from image and prompt embeddings.

    Output tokens: one IoU token and ``num_multimask_outputs + 1`` mask tokens; mask token 0 is the
    single-mask output, tokens 1.. the multimask outputs. The image embedding is upscaled 4x
    (``G -> 4G``, 8 -> 32 for the released model) and each mask is the dot product of a mask token's
    hypernetwork output with the upscaled features.
    """

    def __init__(self, *, transformer_dim: int, num_multimask_outputs: int = 3,
                 activation: Type[nn.Module] = nn.GELU, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, transformer_depth: int = 2, transformer_num_heads: int = 8,
                 transformer_mlp_dim: int = 2048, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(depth=transformer_depth, embedding_dim=transformer_dim,
                                               num_heads=transformer_num_heads, mlp_dim=transformer_mlp_dim,
                                               attention_downsample_rate=attention_downsample_rate)
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool = False, sparse_valid: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: ``(B, C, G, G, G)`` or ``(1, C, G, G, G)`` (shared by all queries).
            image_pe: ``(1, C, G, G, G)`` or ``(B, C, G, G, G)`` dense positional encoding.
            sparse_prompt_embeddings: ``(B, T, C)`` prompt tokens (``T`` may be 0).
            dense_prompt_embeddings: ``(B, C, G, G, G)``.
            multimask_output: return the 3 multimask outputs instead of the single mask (token 0).
            sparse_valid: optional ``(B, T)`` bool; ``False`` prompt tokens are ignored (never attended to).
        Returns:
            ``masks (B, M, 4G, 4G, 4G)`` logits and ``iou_pred (B, M)``, ``M = 1`` or ``num_multimask_outputs``.
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings, sparse_valid)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                      sparse_valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` outputs: ``(B, num_mask_tokens, 4G, 4G, 4G)`` and ``(B, num_mask_tokens)``."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1)
        token_valid = None
        if sparse_valid is not None:
            token_valid = torch.cat([sparse_valid.new_ones(b, self.num_mask_tokens + 1), sparse_valid.bool()], dim=1)

        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(f"image_embeddings has batch {image_embeddings.shape[0]}, expected 1 or the "
                             f"number of prompt sets ({b})")
        src = image_embeddings.expand(b, -1, -1, -1, -1) + dense_prompt_embeddings
        pos_src = image_pe.expand(b, -1, -1, -1, -1)
        _, c, d, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens, token_valid)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)  # (B, num_mask_tokens, C / 8)
        masks = (hyper_in @ upscaled.flatten(2).to(hyper_in.dtype)).reshape(b, -1, *upscaled.shape[2:])
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
