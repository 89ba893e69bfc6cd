"""SAM-Med3D prompt encoder: points and a low-resolution mask to sparse and dense embeddings.

Coordinates: points are ``(B, N, 3)`` voxel coordinates in the model-input grid (``img_size``^3,
128^3 for the released model), in the tensor's own axis order ``(d, h, w)``, exactly what
``torch.argwhere`` returns on a ``(D, H, W)`` array; that is how the released checkpoints were trained
and prompted. The dense positional encoding of the embedding grid reproduces the released model
exactly, including its axis order: its first Fourier coordinate varies along tensor axis 1 and the
second along axis 0 (the third along axis 2), whereas point coordinate ``i`` feeds Fourier coordinate
``i``. The weights were learned with this pairing, so it is kept as is.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .transformer import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of 3D coordinates.

    ``pe(c) = cat(sin(a), cos(a), sin(a))`` with ``a = 2 pi (2 c - 1) @ G``, ``c`` in ``[0, 1]^3`` and
    ``G`` a fixed ``(3, num_pos_feats)`` Gaussian matrix (a persistent buffer, part of the checkpoint).
    The output has ``3 * num_pos_feats`` channels; the repeated sine is how the released model fills
    384 channels from 128 frequencies. Computed in float32 even under autocast (the phases reach tens
    of radians, beyond bfloat16's resolution).
    """

    def __init__(self, num_pos_feats: int = 128, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(3, num_pos_feats))

    def encode_unit(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` coordinates in ``[0, 1]`` -> ``(..., 3 * num_pos_feats)`` float32."""
        with torch.autocast(device_type=coords.device.type, enabled=False):
            phase = (2.0 * coords.float() - 1.0) @ self.positional_encoding_gaussian_matrix.float()
            phase = (2.0 * math.pi) * phase
            return torch.cat([torch.sin(phase), torch.cos(phase), torch.sin(phase)], dim=-1)

    def forward(self, size: Sequence[int]) -> torch.Tensor:
        """Encoding of the voxel centres of a ``size`` grid: ``(3 * num_pos_feats, *size)``.

        Fourier coordinate 0 is ``(axis-1 index + 0.5) / size[0]``, coordinate 1 is
        ``(axis-0 index + 0.5) / size[1]``, coordinate 2 is ``(axis-2 index + 0.5) / size[2]``
        (the released model's convention, see the module docstring).
        """
        s0, s1, s2 = (int(s) for s in size)
        device = self.positional_encoding_gaussian_matrix.device
        i0 = (torch.arange(s0, device=device, dtype=torch.float32) + 0.5)[:, None, None].expand(s0, s1, s2)
        i1 = (torch.arange(s1, device=device, dtype=torch.float32) + 0.5)[None, :, None].expand(s0, s1, s2)
        i2 = (torch.arange(s2, device=device, dtype=torch.float32) + 0.5)[None, None, :].expand(s0, s1, s2)
        coords = torch.stack([i1 / s0, i0 / s1, i2 / s2], dim=-1)
        return self.encode_unit(coords).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """``(B, N, 3)`` coordinates in voxels of an ``image_size`` grid -> ``(B, N, 3 * num_pos_feats)``."""
        scale = torch.tensor([float(s) for s in image_size], device=coords.device, dtype=torch.float32)
        return self.encode_unit(coords.float() / scale)


class PromptEncoder3D(nn.Module):
    """Encodes point and mask prompts for the mask decoder.

    Sparse: one token per point (Fourier encoding of the voxel centre plus a learned positive/negative
    embedding), and, as the released model always had it without boxes, one extra "not a point" token
    appended to every prompt set. Dense: the mask prompt downscaled 4x by strided convolutions to the
    embedding grid, or the learned ``no_mask_embed`` broadcast over the grid.
    """

    def __init__(self, embed_dim: int, image_embedding_size: Sequence[int],
                 input_image_size: Sequence[int], mask_in_chans: int,
                 activation: Type[nn.Module] = nn.GELU) -> None:
        """
        Args:
            embed_dim: prompt width (384); must be divisible by 3.
            image_embedding_size: embedding grid ``(G, G, G)``.
            input_image_size: model-input grid ``(S, S, S)``, the frame of the point coordinates.
            mask_in_chans: hidden channels of the mask downscaling path (its first conv has a quarter).
        """
        super().__init__()
        if embed_dim % 3 != 0:
            raise ValueError(f"prompt embed_dim ({embed_dim}) must be divisible by 3 for the 3D Fourier encoding")
        self.embed_dim = embed_dim
        self.input_image_size = tuple(int(s) for s in input_image_size)
        self.image_embedding_size = tuple(int(s) for s in image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # index 0: negative point (label 0), index 1: positive point (label 1)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid: ``(1, embed_dim, G, G, G)`` float32."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` voxel coordinates and ``(B, N)`` labels -> ``(B, N + 1, embed_dim)`` tokens,
        the last one the appended "not a point" token.

        Label 1 adds the positive embedding, 0 the negative one, -1 replaces the encoding by the
        "not a point" embedding; any other label leaves the bare positional encoding.
        """
        b = points.shape[0]
        points = points.float() + 0.5  # voxel centres
        points = torch.cat([points, points.new_zeros(b, 1, 3)], dim=1)
        labels = torch.cat([labels.long(), labels.new_full((b, 1), -1, dtype=torch.long)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        embedding = torch.where(lab == -1, self.not_a_point_embed.weight.to(embedding.dtype), embedding)
        embedding = embedding + (lab == 0) * self.point_embeddings[0].weight
        embedding = embedding + (lab == 1) * self.point_embeddings[1].weight
        return embedding

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                boxes: Optional[torch.Tensor] = None, masks: Optional[torch.Tensor] = None,
                batch_size: Optional[int] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            points: ``(coords (B, N, 3), labels (B, N))``; coords in voxels of the input grid, tensor
                axis order; labels 1 positive, 0 negative, -1 padding.
            boxes: not supported by SAM-Med3D (must be ``None``).
            masks: ``(B, 1, 4G, 4G, 4G)`` mask logits (32^3 for the released model) or ``None``.
            batch_size: batch size when neither points nor masks are given (default 1).
        Returns:
            ``sparse (B, N + 1, embed_dim)`` (``(B, 0, embed_dim)`` without points),
            ``dense (B, embed_dim, G, G, G)``,
            ``sparse_valid (B, N + 1)`` bool, ``False`` for padding points given by the caller (label -1),
            which the decoder then ignores; the appended "not a point" token is always valid.
        """
        if boxes is not None:
            raise ValueError("SAM-Med3D has no box prompt embeddings; pass points and/or masks")
        if points is not None:
            bs = points[0].shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1 if batch_size is None else int(batch_size)
        device = self.no_mask_embed.weight.device

        if points is not None:
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 3 or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(f"points must be (B, N, 3) with labels (B, N), got {tuple(coords.shape)} "
                                 f"and {tuple(labels.shape)}")
            sparse = self._embed_points(coords, labels)
            sparse_valid = torch.cat([labels != -1, labels.new_ones((bs, 1), dtype=torch.bool)], dim=1)
        else:
            sparse = torch.empty(bs, 0, self.embed_dim, device=device)
            sparse_valid = torch.empty(bs, 0, dtype=torch.bool, device=device)

        if masks is not None:
            if masks.ndim != 5 or masks.shape[1] != 1 or tuple(masks.shape[2:]) != self.mask_input_size:
                raise ValueError(f"mask prompt must be (B, 1, {', '.join(map(str, self.mask_input_size))}), "
                                 f"got {tuple(masks.shape)}")
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense, sparse_valid
