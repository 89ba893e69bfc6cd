"""SAM-Med3D image encoder: a 3D ViT with windowed attention and decomposed relative positions.

Input ``(B, in_chans, S, S, S)`` with ``S = img_size`` (128 for the released model), output embedding
``(B, out_chans, G, G, G)`` with ``G = S // patch_size`` (8). Tokens are kept channels-last,
``(B, D, H, W, C)``, in tensor axis order.

Relative position terms of the released model
---------------------------------------------
Attention logits are ``q_i . k_j / sqrt(head_dim) + bias(i, j)``. For a query at ``i = (d, h, w)`` and
a key at ``j = (a, b, c)`` of a cubic ``K^3`` window (or grid), with ``Rd[x, y] = rel_pos_d[x - y + K - 1]``
and likewise ``Rh``, ``Rw``, the released SAM-Med3D computes

    bias(i, j) = q(d, h, w) . Rd[d, c]  +  q(d, h, a) . Rh[h, c]  +  q(d, h, b) . Rw[b, c]

(``q`` unscaled, ``q(d, h, x)`` the query of the token at that position). This is not the textbook
decomposition ``q_i . (Rd[d, a] + Rh[h, b] + Rw[w, c])``: its per-axis terms are broadcast into the
attention map with shifted axes (SAM-Med3D issue #101), which only runs because all sizes are equal.
The released checkpoints were trained with these terms, so they are reproduced exactly here, and
every grid must be cubic.

Windowed blocks and the padded window
-------------------------------------
Non-global blocks attend inside cubes of ``window_size`` tokens; the token grid is zero-padded at the
high end of each axis to a multiple of the window. The released model has an 8^3 grid and
``window_size = 14``, so those blocks zero-pad the grid to ONE 14^3 window (2744 tokens, 2232 of
them padding) and the real tokens attend to the padding too. The padding tokens are zero after
``norm1``, so all of them share one query, key and value (the ``qkv`` bias); only their relative terms
differ. Writing the three terms above as ``f1(c)``, ``f2(a, c)`` and ``f3(b, c)`` for a fixed query,
``sum_j exp(bias(i, j)) = sum_c exp(f1(c)) * sum_a exp(f2(a, c)) * sum_b exp(f3(b, c))``, so the summed weight of all padding keys is the window
total minus the real-corner total, and the 2232 padding keys collapse exactly into ONE extra key whose
logit carries the log of that mass. :class:`Attention` does this when the whole grid fits into one
window (``collapse_padding``), which equals attending over the padded 14^3 window at about a fifth of
the cost; otherwise :class:`Block3D` partitions into padded windows explicitly.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import LayerNorm3d, MLPBlock


def window_partition3d(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Zero-pad ``(B, D, H, W, C)`` tokens at the high end of each axis to a multiple of
    ``window_size`` and cut them into windows.

    Returns:
        ``(windows (B * nW, w, w, w, C), padded_size (Dp, Hp, Wp))``; windows are ordered
        batch-major, then d, h, w.
    """
    b, d, h, w, c = x.shape
    ws = window_size
    pads = [(-s) % ws for s in (d, h, w)]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
    x = x.reshape(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition3d(windows: torch.Tensor, window_size: int, padded_size: Sequence[int],
                         size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition3d`: ``(B * nW, w, w, w, C) -> (B, D, H, W, C)``, padding removed."""
    ws = window_size
    dp, hp, wp = padded_size
    nd, nh, nw = dp // ws, hp // ws, wp // ws
    b = windows.shape[0] // (nd * nh * nw)
    x = windows.reshape(b, nd, nh, nw, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    d, h, w = size
    return x[:, :d, :h, :w].contiguous()


def _rel_pos_table(table: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """``R[i, j] = table[i - j + k_len - 1]`` for query positions ``0..q_len-1`` and key positions
    ``0..k_len-1`` of one axis: ``(q_len, k_len, head_dim)``. The table must hold ``2 * k_len - 1`` rows."""
    if table.shape[0] != 2 * k_len - 1 or q_len > k_len:
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, which fits a key extent of "
            f"{(table.shape[0] + 1) // 2} tokens, but the attention spans {k_len} keys and {q_len} "
            "queries on this axis; the encoder input must have the configured image size")
    idx = (torch.arange(q_len, device=table.device)[:, None]
           - torch.arange(k_len, device=table.device)[None, :] + (k_len - 1))
    return table[idx]


class Attention(nn.Module):
    """Multi-head self-attention over a cubic token grid with the released model's relative terms.

    ``logit(i, j) = q_i . k_j / sqrt(head_dim) + bias(i, j)``; see the module docstring for ``bias``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 input_size: Tuple[int, int, int] = (14, 14, 14)) -> None:
        """
        Args:
            dim: token width.
            num_heads: heads; must divide ``dim``.
            qkv_bias: bias on the fused ``qkv`` projection.
            input_size: key extent per axis the relative tables cover (the window, or the full grid
                for global blocks); each table has ``2 * size - 1`` rows.
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the encoder width ({dim})")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor, padded_window: Optional[int] = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, G, G, G, C)`` tokens of a cubic window, or of the whole grid for global attention.
            padded_window: if given (``K >= G``), ``x`` holds the real tokens at the low corner of a
                ``K^3`` window whose other tokens are zero (zero-padding after the block's ``norm1``);
                the result equals attending over that whole padded window, for the real tokens only.
        Returns:
            ``(B, G, G, G, C)``.
        """
        b, g, g1, g2, c = x.shape
        if not g == g1 == g2:
            raise ValueError(f"SAM-Med3D attention needs a cubic token grid, got {tuple(x.shape[1:4])}")
        k_len = g if padded_window is None else int(padded_window)
        n = g ** 3
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)

        if k_len == g:
            f1, f2, f3 = self._rel_terms(q, None, g, g)
            bias = self._real_key_bias(f1, f2, f3, g)
        else:
            # Every padding token is zero, so its query, key and value are the projection of zero.
            zero_qkv = self.qkv(x.new_zeros(1, c)).reshape(3, 1, self.num_heads, 1, -1)
            f1, f2, f3 = self._rel_terms(q, zero_qkv[0], g, k_len)
            bias = torch.cat([self._real_key_bias(f1, f2, f3, g),
                              self._log_padding_mass(f1, f2, f3, g).flatten(2)[..., None]], dim=-1)
            k = torch.cat([k, zero_qkv[1].expand(b, -1, -1, -1).to(k.dtype)], dim=2)
            v = torch.cat([v, zero_qkv[2].expand(b, -1, -1, -1).to(v.dtype)], dim=2)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, g, g, g, c))

    def _rel_terms(self, q: torch.Tensor, q_pad: Optional[torch.Tensor], g: int, k_len: int):
        """The three relative terms in float32 (module docstring):
        ``f1 (B, heads, G, G, G, K)``, ``f2 (B, heads, G, G, K, K)``, ``f3 (B, heads, G, G, K, K)``.

        ``q``: ``(B, heads, G^3, head_dim)`` real queries; ``q_pad``: ``(1, heads, 1, head_dim)`` query
        of a padding token (needed when ``K > G``).
        """
        b, nh, _, hd = q.shape
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf = q.float().reshape(b, nh, g, g, g, hd)
            if k_len > g:
                # f2 and f3 read queries at (d, h, x) for every window position x < K
                pad = q_pad.float().reshape(1, nh, 1, 1, 1, hd).expand(b, nh, g, g, k_len - g, hd)
                q_ext = torch.cat([qf, pad], dim=4)
            else:
                q_ext = qf
            r_d = _rel_pos_table(self.rel_pos_d.float(), g, k_len)
            r_h = _rel_pos_table(self.rel_pos_h.float(), g, k_len)
            r_w = _rel_pos_table(self.rel_pos_w.float(), k_len, k_len)
            f1 = torch.einsum("zndhwx,dcx->zndhwc", qf, r_d)
            f2 = torch.einsum("zndhax,hcx->zndhac", q_ext, r_h)
            f3 = torch.einsum("zndhbx,bcx->zndhbc", q_ext, r_w)
        return f1, f2, f3

    @staticmethod
    def _real_key_bias(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor, g: int) -> torch.Tensor:
        """``bias(i, j)`` for real queries and the real keys ``j = (a, b, c) < G``: ``(B, heads, G^3, G^3)``."""
        bias = (f1[..., None, None, :g]                       # (B, n, d, h, w, 1, 1, c)
                + f2[:, :, :, :, None, :g, None, :g]          # (B, n, d, h, 1, a, 1, c)
                + f3[:, :, :, :, None, None, :g, :g])         # (B, n, d, h, 1, 1, b, c)
        return bias.flatten(5).flatten(2, 4)

    @staticmethod
    def _log_padding_mass(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor, g: int) -> torch.Tensor:
        """``log sum_{j in padding} exp(bias(i, j))`` per real query: ``(B, heads, G, G, G)``.

        ``sum_j exp(bias) = sum_c exp(f1(c)) (sum_a exp(f2(a, c))) (sum_b exp(f3(b, c)))`` over the whole
        window, minus the same sum restricted to the real corner ``a, b, c < G``.
        """
        def log_mass(f1_, f2_, f3_):
            per_c = f1_ + f2_.logsumexp(-2)[:, :, :, :, None, :] + f3_.logsumexp(-2)[:, :, :, :, None, :]
            return per_c.logsumexp(-1)

        log_all = log_mass(f1, f2, f3)
        log_real = log_mass(f1[..., :g], f2[..., :g, :g], f3[..., :g, :g])
        # log(exp(a) - exp(b)) = a + log(1 - exp(b - a)); the clamp keeps rounding from giving log(<0).
        return log_all + torch.log(-torch.expm1((log_real - log_all).clamp(max=0.0)))


class Block3D(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``window_size > 0`` makes the attention windowed (zero-padded windows), ``0`` global.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 window_size: int = 0, input_size: Tuple[int, int, int] = (8, 8, 8),
                 collapse_padding: bool = True) -> None:
        """
        Args:
            input_size: token grid of the encoder (sizes the relative tables of global blocks).
            collapse_padding: when the grid fits into one window, attend to the zero padding through
                one collapsed key (exact, faster) instead of materialising the padded window.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = tuple(input_size) if window_size == 0 else (window_size,) * 3
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size
        self.collapse_padding = collapse_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, D, H, W, C)`` -> same shape."""
        shortcut = x
        x = self.norm1(x)
        ws = self.window_size
        if ws == 0:
            x = self.attn(x)
        elif self.collapse_padding and max(x.shape[1:4]) <= ws:
            x = self.attn(x, padded_window=ws)
        else:
            size = x.shape[1:4]
            windows, padded_size = window_partition3d(x, ws)
            x = window_unpartition3d(self.attn(windows), ws, padded_size, size)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping patches to tokens: ``(B, C_in, S, S, S) -> (B, G, G, G, embed_dim)``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """3D ViT image encoder with a convolutional neck.

    ``(B, in_chans, S, S, S)`` -> ``(B, out_chans, G, G, G)``, ``S = img_size``,
    ``G = img_size // patch_size``. The learned absolute position embedding is added as is, so the
    input size is fixed.
    """

    def __init__(self, img_size: int = 128, patch_size: int = 16, in_chans: int = 1,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 out_chans: int = 384, qkv_bias: bool = True, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
                 collapse_padding: bool = True) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size = img_size
        self.in_chans = in_chans
        grid = img_size // patch_size
        self.grid_size = (grid, grid, grid)
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, qkv_bias,
                    window_size=0 if i in global_attn_indexes else window_size,
                    input_size=self.grid_size, collapse_padding=collapse_padding)
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_chans, S, S, S)`` normalised image -> ``(B, out_chans, G, G, G)``."""
        expected = (self.in_chans,) + (self.img_size,) * 3
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SAM-Med3D image encoder expects input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
