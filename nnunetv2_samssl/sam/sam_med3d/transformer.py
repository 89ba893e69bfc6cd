"""Transformer building blocks of SAM-Med3D.

Holds the pieces shared by the image encoder and the mask decoder (:class:`MLPBlock`,
:class:`LayerNorm3d`) and the two-way transformer of the mask decoder, in which the prompt tokens
attend to the image embedding and the image embedding attends back to the tokens.

Parameter names follow the released checkpoints (``mask_decoder.transformer.layers.0.self_attn.q_proj``
and so on), so that a state dict loads without renaming.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))`` on the last dimension: ``(..., dim) -> (..., dim)``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm3d(nn.Module):
    """Layer normalisation over the channel axis of a ``(B, C, D, H, W)`` tensor.

    Statistics are taken per voxel over ``C`` (biased variance), then the per-channel affine
    ``weight``/``bias`` is applied. Computed with ``F.layer_norm`` on a channels-last view, which runs
    in float32 under autocast.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class Attention(nn.Module):
    """Multi-head attention whose projections may work in a narrower internal width.

    ``q``, ``k`` and ``v`` are projected from ``embedding_dim`` to ``embedding_dim // downsample_rate``,
    split into ``num_heads`` heads, attended with scale ``1 / sqrt(head_dim)`` and projected back.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the internal width "
                             f"{embedding_dim} // {downsample_rate} = {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, internal) -> (B, heads, N, internal / heads)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            q: ``(B, Nq, embedding_dim)`` queries.
            k, v: ``(B, Nk, embedding_dim)`` keys and values.
            key_valid: optional ``(B, Nk)`` bool, ``False`` for keys to ignore (padding prompts).
        Returns:
            ``(B, Nq, embedding_dim)``.
        """
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayAttentionBlock3D(nn.Module):
    """One two-way layer: token self-attention, tokens -> image, token MLP, image -> tokens.

    Each sub-layer is residual and followed by a LayerNorm (``norm1`` .. ``norm4``). In the first layer
    the self-attention gets no positional encoding and replaces the tokens instead of adding to them.
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor, token_valid: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: ``(B, T, C)`` prompt/output tokens; ``query_pe`` the same shape (the initial tokens).
            keys: ``(B, N, C)`` flattened image embedding; ``key_pe`` its positional encoding.
            token_valid: optional ``(B, T)`` bool; invalid tokens are never attended to.
        Returns:
            updated ``(queries, keys)``.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_valid)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_valid)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_valid))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock3D` plus a final token -> image attention and LayerNorm."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(embedding_dim, num_heads, mlp_dim, activation,
                                   attention_downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor, token_valid: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: ``(B, C, D, H, W)`` image embedding (plus dense prompt).
            image_pe: ``(B, C, D, H, W)`` positional encoding of the image grid.
            point_embedding: ``(B, T, C)`` output tokens followed by sparse prompt tokens.
            token_valid: optional ``(B, T)`` bool, ``False`` marks tokens no one attends to.
        Returns:
            ``(tokens (B, T, C), image_tokens (B, D*H*W, C))``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, token_valid)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
