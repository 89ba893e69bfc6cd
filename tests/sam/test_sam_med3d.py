"""Tests of the SAM-Med3D implementation (nnunetv2_samssl.sam.sam_med3d).

The numerical tests compare the modules against a plain reference written here from the description of
the released model: functions that read the weights by their checkpoint key names and compute with
explicit per-head loops, explicit zero padding and window cutting, explicit softmax and the released
relative-position terms

    bias((d, h, w), (a, b, c)) = q(d, h, w) . Rd[d, c] + q(d, h, a) . Rh[h, c] + q(d, h, b) . Rw[b, c].

Tolerance: float32, ``atol = rtol = 1e-5`` on the tiny configuration; ``atol = rtol = 5e-5`` on full-size
encoder blocks (768-wide sums and a softmax over 2744 keys in float32).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_samssl.sam.interface import PromptableModel
from nnunetv2_samssl.sam.sam_med3d import (SAM_MED3D_CONFIGS, SAMCheckpointError, SAMMed3DPromptable,
                                           build_sam_med3d, load_sam_med3d, load_sam_med3d_state_dict)
from nnunetv2_samssl.sam.sam_med3d.convert import main as convert_main
from nnunetv2_samssl.sam.sam_med3d.image_encoder import Block3D

ATOL = RTOL = 1e-5
FULL_SIZE_TOL = 5e-5
TINY = SAM_MED3D_CONFIGS["tiny"]
FULL = SAM_MED3D_CONFIGS["vit_b_ori"]


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------
# random weights
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and buffer non-trivial random values (rel-pos tables and pos_embed are
    zero after construction, LayerNorm weights one), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        noise = torch.randn(t.shape, generator=gen)
        if "rel_pos" in name or name.endswith("pos_embed"):
            t.copy_(0.5 * noise)
        elif t.ndim >= 2:
            t.copy_(noise / math.sqrt(t[0].numel()))
        elif "norm" in name or "neck.1" in name or "neck.3" in name or "upscaling.1" in name \
                or "downscaling.1" in name or "downscaling.4" in name:
            t.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
        else:
            t.copy_(0.1 * noise)
    return module


# ----------------------------------------------------------------------------------------------------
# reference implementation (functional, weights read by checkpoint key)
# ----------------------------------------------------------------------------------------------------
def ref_linear(x, sd, p):
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_layer_norm_last(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_layer_norm_channels(x, w, b, eps=1e-6):
    """(B, C, D, H, W): normalise over C for every voxel."""
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    shape = (1, -1, 1, 1, 1)
    return (x - mu) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)


def ref_rel_bias(q, t_d, t_h, t_w):
    """Released relative terms of one head in one cubic window. q: (K, K, K, hd) -> (K^3, K^3)."""
    k = q.shape[0]
    idx = torch.arange(k)
    rel = idx[:, None] - idx[None, :] + k - 1  # rel[x, y] = x - y + K - 1
    r_d, r_h, r_w = t_d[rel], t_h[rel], t_w[rel]  # (K, K, hd)
    # p1[d, h, w, c] = q(d, h, w) . Rd[d, c]
    p1 = (q[:, :, :, None, :] * r_d[:, None, None, :, :]).sum(-1)
    # p2[d, h, x, c] = q(d, h, x) . Rh[h, c]
    p2 = (q[:, :, :, None, :] * r_h[None, :, None, :, :]).sum(-1)
    # p3[d, h, x, c] = q(d, h, x) . Rw[x, c]
    p3 = (q[:, :, :, None, :] * r_w[None, None, :, :, :]).sum(-1)
    # bias[d, h, w, a, b, c] = p1[d, h, w, c] + p2[d, h, a, c] + p3[d, h, b, c]
    bias = p1[:, :, :, None, None, :] + p2[:, :, None, :, None, :] + p3[:, :, None, None, :, :]
    return bias.reshape(k ** 3, k ** 3)


def ref_window_attention(x, sd, p, num_heads):
    """x: (K, K, K, C) tokens of one window (padding included) -> (K, K, K, C)."""
    k, c = x.shape[0], x.shape[-1]
    hd = c // num_heads
    qkv = ref_linear(x.reshape(-1, c), sd, p + ".qkv")
    q_all, k_all, v_all = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
    heads = []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        q, kk, v = q_all[:, sl], k_all[:, sl], v_all[:, sl]
        logits = (q * hd ** -0.5) @ kk.T
        logits = logits + ref_rel_bias(q.reshape(k, k, k, hd), sd[p + ".rel_pos_d"], sd[p + ".rel_pos_h"],
                                       sd[p + ".rel_pos_w"])
        weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)
        heads.append(weights @ v)
    out = torch.cat(heads, dim=-1)
    return ref_linear(out, sd, p + ".proj").reshape(k, k, k, c)


def ref_encoder_block(x, sd, p, num_heads, window_size):
    """x: (B, G, G, G, C). Windowed blocks zero-pad after norm1 and cut explicit windows."""
    b, g, _, _, c = x.shape
    xn = ref_layer_norm_last(x, sd[p + ".norm1.weight"], sd[p + ".norm1.bias"], 1e-6)
    out = torch.empty_like(x)
    for i in range(b):
        if window_size == 0:
            out[i] = ref_window_attention(xn[i], sd, p + ".attn", num_heads)
            continue
        n_win = -(-g // window_size)
        gp = n_win * window_size
        padded = torch.zeros(gp, gp, gp, c)
        padded[:g, :g, :g] = xn[i]
        result = torch.zeros_like(padded)
        for wd, wh, ww in itertools.product(range(n_win), repeat=3):
            sl = tuple(slice(j * window_size, (j + 1) * window_size) for j in (wd, wh, ww))
            result[sl] = ref_window_attention(padded[sl], sd, p + ".attn", num_heads)
        out[i] = result[:g, :g, :g]
    x = x + out
    y = ref_layer_norm_last(x, sd[p + ".norm2.weight"], sd[p + ".norm2.bias"], 1e-6)
    return x + ref_linear(ref_gelu(ref_linear(y, sd, p + ".mlp.lin1")), sd, p + ".mlp.lin2")


def ref_image_encoder(images, sd, cfg):
    p = "image_encoder"
    x = F.conv3d(images, sd[p + ".patch_embed.proj.weight"], sd[p + ".patch_embed.proj.bias"],
                 stride=cfg.patch_size)
    x = x.permute(0, 2, 3, 4, 1) + sd[p + ".pos_embed"]
    for i in range(cfg.encoder_depth):
        window = 0 if i in cfg.encoder_global_attn_indexes else cfg.window_size
        x = ref_encoder_block(x, sd, f"{p}.blocks.{i}", cfg.encoder_num_heads, window)
    x = x.permute(0, 4, 1, 2, 3)
    x = F.conv3d(x, sd[p + ".neck.0.weight"])
    x = ref_layer_norm_channels(x, sd[p + ".neck.1.weight"], sd[p + ".neck.1.bias"])
    x = F.conv3d(x, sd[p + ".neck.2.weight"], padding=1)
    return ref_layer_norm_channels(x, sd[p + ".neck.3.weight"], sd[p + ".neck.3.bias"])


def ref_fourier(coords01, gauss):
    """coords in [0, 1]: (..., 3) -> (..., 3 * F): cat(sin, cos, sin) of 2 pi (2c - 1) G."""
    a = 2 * math.pi * ((2 * coords01 - 1) @ gauss)
    return torch.cat([torch.sin(a), torch.cos(a), torch.sin(a)], dim=-1)


def ref_dense_pe(gauss, g):
    """(C, G, G, G); Fourier coordinates of voxel (i, j, k) are ((j + .5) / G, (i + .5) / G, (k + .5) / G)."""
    i, j, k = torch.meshgrid(*[torch.arange(g, dtype=torch.float32)] * 3, indexing="ij")
    coords = torch.stack([(j + 0.5) / g, (i + 0.5) / g, (k + 0.5) / g], dim=-1)
    return ref_fourier(coords, gauss).permute(3, 0, 1, 2)


def ref_sparse_prompt(points, labels, sd, img_size):
    """One prompt set: points (N, 3) voxels, labels (N,) in {0, 1} -> (N + 1, C) with the padding token."""
    p = "prompt_encoder"
    gauss = sd[p + ".pe_layer.positional_encoding_gaussian_matrix"]
    tokens = []
    for pt, lab in zip(points, labels):
        e = ref_fourier((pt + 0.5) / img_size, gauss)
        e = e + sd[f"{p}.point_embeddings.{int(lab)}.weight"][0]
        tokens.append(e)
    tokens.append(sd[p + ".not_a_point_embed.weight"][0])
    return torch.stack(tokens)


def ref_dense_prompt(mask, sd):
    """mask: (1, 1, 4G, 4G, 4G) -> (1, C, G, G, G)."""
    p = "prompt_encoder.mask_downscaling"
    x = F.conv3d(mask, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=2)
    x = ref_gelu(ref_layer_norm_channels(x, sd[p + ".1.weight"], sd[p + ".1.bias"]))
    x = F.conv3d(x, sd[p + ".3.weight"], sd[p + ".3.bias"], stride=2)
    x = ref_gelu(ref_layer_norm_channels(x, sd[p + ".4.weight"], sd[p + ".4.bias"]))
    return F.conv3d(x, sd[p + ".6.weight"], sd[p + ".6.bias"])


def ref_attention(q, k, v, sd, p, num_heads):
    """Two-way transformer attention: (Nq, C), (Nk, C), (Nk, C) -> (Nq, C), naive per head."""
    q, k, v = ref_linear(q, sd, p + ".q_proj"), ref_linear(k, sd, p + ".k_proj"), ref_linear(v, sd, p + ".v_proj")
    hd = q.shape[-1] // num_heads
    outs = []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
        outs.append(w @ v[:, sl])
    return ref_linear(torch.cat(outs, dim=-1), sd, p + ".out_proj")


def ref_ln(x, sd, p):
    return ref_layer_norm_last(x, sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def ref_two_way(src, pos, tokens, sd, cfg):
    """src, pos: (C, G, G, G); tokens (T, C) -> (tokens (T, C), keys (G^3, C))."""
    p = "mask_decoder.transformer"
    heads = cfg.decoder_num_heads
    keys = src.flatten(1).T
    key_pe = pos.flatten(1).T
    queries = tokens
    for i in range(cfg.decoder_depth):
        lp = f"{p}.layers.{i}"
        if i == 0:
            queries = ref_attention(queries, queries, queries, sd, lp + ".self_attn", heads)
        else:
            q = queries + tokens
            queries = queries + ref_attention(q, q, queries, sd, lp + ".self_attn", heads)
        queries = ref_ln(queries, sd, lp + ".norm1")
        queries = ref_ln(queries + ref_attention(queries + tokens, keys + key_pe, keys, sd,
                                                 lp + ".cross_attn_token_to_image", heads), sd, lp + ".norm2")
        mlp = ref_linear(torch.relu(ref_linear(queries, sd, lp + ".mlp.lin1")), sd, lp + ".mlp.lin2")
        queries = ref_ln(queries + mlp, sd, lp + ".norm3")
        keys = ref_ln(keys + ref_attention(keys + key_pe, queries + tokens, queries, sd,
                                           lp + ".cross_attn_image_to_token", heads), sd, lp + ".norm4")
    queries = ref_ln(queries + ref_attention(queries + tokens, keys + key_pe, keys, sd,
                                             p + ".final_attn_token_to_image", heads), sd, p + ".norm_final_attn")
    return queries, keys


def ref_mlp(x, sd, p, n):
    for i in range(n):
        x = ref_linear(x, sd, f"{p}.layers.{i}")
        if i < n - 1:
            x = torch.relu(x)
    return x


def ref_decode(embedding, points, labels, mask, sd, cfg):
    """One query: embedding (C, G, G, G), points (N, 3), labels (N,), mask (1, 1, L, L, L) or None.
    Returns all mask outputs (M + 1, L, L, L) and IoU predictions (M + 1,)."""
    p = "mask_decoder"
    g = cfg.grid_size
    sparse = ref_sparse_prompt(points, labels, sd, cfg.img_size)
    if mask is None:
        dense = sd["prompt_encoder.no_mask_embed.weight"][0].view(-1, 1, 1, 1).expand(-1, g, g, g)
    else:
        dense = ref_dense_prompt(mask, sd)[0]
    tokens = torch.cat([sd[p + ".iou_token.weight"], sd[p + ".mask_tokens.weight"], sparse])
    pos = ref_dense_pe(sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"], g)
    hs, keys = ref_two_way(embedding + dense, pos, tokens, sd, cfg)
    n_masks = cfg.num_multimask_outputs + 1
    x = keys.T.reshape(1, -1, g, g, g)
    x = F.conv_transpose3d(x, sd[p + ".output_upscaling.0.weight"], sd[p + ".output_upscaling.0.bias"], stride=2)
    x = ref_gelu(ref_layer_norm_channels(x, sd[p + ".output_upscaling.1.weight"], sd[p + ".output_upscaling.1.bias"]))
    x = F.conv_transpose3d(x, sd[p + ".output_upscaling.3.weight"], sd[p + ".output_upscaling.3.bias"], stride=2)
    x = ref_gelu(x)[0]
    hyper = torch.stack([ref_mlp(hs[1 + i], sd, f"{p}.output_hypernetworks_mlps.{i}", 3) for i in range(n_masks)])
    masks = (hyper @ x.flatten(1)).reshape(n_masks, *x.shape[1:])
    iou = ref_mlp(hs[0], sd, p + ".iou_prediction_head", cfg.iou_head_depth)
    return masks, iou


# ----------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return randomize_(build_sam_med3d("tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny_sd(tiny_model):
    return {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):  # skip the default initialisation, every tensor is randomized anyway
        model = build_sam_med3d("vit_b_ori")
    return randomize_(model.to_empty(device="cpu"), seed=2)


def random_prompts(q, n, img_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randint(0, img_size, (q, n, 3), generator=gen).float()
    labels = torch.randint(0, 2, (q, n), generator=gen)
    return points, labels


def upstream_layout_checkpoint(state_dict):
    """A training checkpoint laid out like the released files (needs pickle to load)."""
    return {"epoch": 3, "model_state_dict": state_dict,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "lr_scheduler_state_dict": {"last_epoch": 3},
            "args": argparse.Namespace(model_type="vit_b_ori", lr=8e-4)}


# ----------------------------------------------------------------------------------------------------
# architecture of the released model
# ----------------------------------------------------------------------------------------------------
def test_vit_b_ori_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = build_sam_med3d("vit_b_ori")
    sd = model.state_dict()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 100_509_232
    assert sum(v.numel() for v in sd.values()) == 100_509_232 + 3 * 128  # plus the Fourier matrix buffer
    assert len(sd) == 324
    assert {k.split(".")[0] for k in sd} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    expected = {
        "image_encoder.pos_embed": (1, 8, 8, 8, 768),
        "image_encoder.patch_embed.proj.weight": (768, 1, 16, 16, 16),
        "image_encoder.blocks.0.attn.qkv.weight": (2304, 768),
        "image_encoder.blocks.0.attn.rel_pos_d": (27, 64),   # window 14 -> 2 * 14 - 1
        "image_encoder.blocks.2.attn.rel_pos_w": (15, 64),   # global on the 8^3 grid
        "image_encoder.blocks.11.mlp.lin1.weight": (3072, 768),
        "image_encoder.neck.0.weight": (384, 768, 1, 1, 1),
        "image_encoder.neck.2.weight": (384, 384, 3, 3, 3),
        "image_encoder.neck.3.bias": (384,),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (3, 128),
        "prompt_encoder.point_embeddings.1.weight": (1, 384),
        "prompt_encoder.not_a_point_embed.weight": (1, 384),
        "prompt_encoder.no_mask_embed.weight": (1, 384),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2, 2),
        "prompt_encoder.mask_downscaling.6.weight": (384, 16, 1, 1, 1),
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": (384, 384),
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.weight": (192, 384),
        "mask_decoder.transformer.layers.1.mlp.lin1.weight": (2048, 384),
        "mask_decoder.transformer.final_attn_token_to_image.out_proj.weight": (384, 192),
        "mask_decoder.mask_tokens.weight": (4, 384),
        "mask_decoder.output_upscaling.0.weight": (384, 96, 2, 2, 2),
        "mask_decoder.output_upscaling.3.weight": (96, 48, 2, 2, 2),
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (48, 384),
        "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "image_encoder.blocks.12.norm1.weight" not in sd
    assert not any("pixel_mean" in k or k.startswith("module.") for k in sd)


def test_block_rel_pos_reference_matches_released_formula():
    """The vectorised reference bias equals the formula evaluated entry by entry."""
    gen = torch.Generator().manual_seed(0)
    k, hd = 3, 2
    q = torch.randn(k, k, k, hd, generator=gen)
    tables = [torch.randn(2 * k - 1, hd, generator=gen) for _ in range(3)]
    r = lambda t, x, y: t[x - y + k - 1]  # noqa: E731
    bias = ref_rel_bias(q, *tables).reshape((k,) * 6)
    for d, h, w, a, b, c in itertools.product(range(k), repeat=6):
        value = q[d, h, w] @ r(tables[0], d, c) + q[d, h, a] @ r(tables[1], h, c) + q[d, h, b] @ r(tables[2], b, c)
        assert torch.allclose(bias[d, h, w, a, b, c], value, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# numerical equivalence with the reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window_size,grid,collapse", [
    (6, 4, True), (6, 4, False),  # grid padded into one window (as vit_b_ori: 8 -> 14)
    (3, 4, True),                 # several padded windows (explicit partition)
    (4, 4, True),                 # window equals grid, no padding
    (0, 4, True),                 # global
])
def test_encoder_block_matches_reference(window_size, grid, collapse):
    dim, heads = 24, 3
    block = randomize_(Block3D(dim, heads, window_size=window_size, input_size=(grid,) * 3,
                               collapse_padding=collapse), seed=window_size + grid)
    sd = {f"b.{k}": v for k, v in block.state_dict().items()}
    x = torch.randn(2, grid, grid, grid, dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(block(x), ref_encoder_block(x, sd, "b", heads, window_size))


@pytest.mark.parametrize("block_index", [0, 2])  # 0: 14^3 padded window, 2: global
def test_full_size_encoder_block_matches_reference(full_model, block_index):
    block = full_model.image_encoder.blocks[block_index]
    sd = {f"b.{k}": v for k, v in block.state_dict().items()}
    x = torch.randn(1, 8, 8, 8, 768, generator=torch.Generator().manual_seed(4))
    window = 0 if block_index in FULL.encoder_global_attn_indexes else FULL.window_size
    with torch.no_grad():
        assert_close(block(x), ref_encoder_block(x, sd, "b", 12, window), atol=FULL_SIZE_TOL, rtol=FULL_SIZE_TOL)


def test_full_size_encoder_forward(full_model):
    images = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        emb = full_model.image_encoder(images)
    assert emb.shape == (1, 384, 8, 8, 8)
    assert torch.isfinite(emb).all()
    # the neck ends in a LayerNorm over channels: its statistics are the affine's
    w = full_model.image_encoder.neck[3].weight
    assert_close(((emb - full_model.image_encoder.neck[3].bias.view(1, -1, 1, 1, 1)) / w.view(1, -1, 1, 1, 1)).mean(1),
                 torch.zeros(1, 8, 8, 8), atol=1e-3, rtol=0)


def test_tiny_image_encoder_matches_reference(tiny_model, tiny_sd):
    images = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(tiny_model.image_encoder(images), ref_image_encoder(images, tiny_sd, TINY))


def test_dense_positional_encoding_matches_reference(tiny_model, tiny_sd):
    gauss = tiny_sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    pe = tiny_model.prompt_encoder.get_dense_pe()
    assert pe.shape == (1, 48, 4, 4, 4)
    assert_close(pe[0], ref_dense_pe(gauss, 4))
    # the repeated sine: channels [0:F] and [2F:3F] are equal
    assert torch.equal(pe[0, :16], pe[0, 32:])


@pytest.mark.parametrize("use_mask", [False, True])
def test_tiny_decoder_matches_reference(tiny_model, tiny_sd, use_mask):
    q, n = 3, 2
    emb = torch.randn(q, 48, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    points, labels = random_prompts(q, n, 32, seed=8)
    masks = torch.randn(q, 1, 16, 16, 16, generator=torch.Generator().manual_seed(9)) if use_mask else None
    with torch.no_grad():
        single, iou1 = tiny_model.decode(emb, points, labels, masks, multimask_output=False)
        multi, iou3 = tiny_model.decode(emb, points, labels, masks, multimask_output=True)
    assert single.shape == (q, 1, 16, 16, 16) and iou1.shape == (q, 1)
    assert multi.shape == (q, 3, 16, 16, 16) and iou3.shape == (q, 3)
    for i in range(q):
        ref_masks, ref_iou = ref_decode(emb[i], points[i], labels[i], None if masks is None else masks[i:i + 1],
                                        tiny_sd, TINY)
        assert_close(single[i], ref_masks[:1])
        assert_close(multi[i], ref_masks[1:])
        assert_close(iou1[i], ref_iou[:1])
        assert_close(iou3[i], ref_iou[1:])


def test_full_size_decoder_matches_reference(full_model):
    sd = full_model.state_dict()
    emb = torch.randn(2, 384, 8, 8, 8, generator=torch.Generator().manual_seed(10))
    points, labels = random_prompts(2, 3, 128, seed=11)
    masks = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ours, iou = full_model.decode(emb, points, labels, masks)
        for i in range(2):
            ref_masks, ref_iou = ref_decode(emb[i], points[i], labels[i], masks[i:i + 1], sd, FULL)
            assert_close(ours[i], ref_masks[:1])
            assert_close(iou[i], ref_iou[:1])


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------
def test_upstream_layout_checkpoint_needs_pickle_and_loads_strictly(tmp_path, tiny_model, tiny_sd):
    path = tmp_path / "sam_med3d_tiny.pth"
    torch.save(upstream_layout_checkpoint(tiny_sd), path)

    with pytest.raises(SAMCheckpointError) as err:
        load_sam_med3d_state_dict(path)
    message = str(err.value)
    assert "sam_checkpoint" in message and "nnUNetv2_samssl_convert_sam_med3d" in message
    assert "sam_checkpoint_allow_pickle" in message and "execute code" in message

    loaded = load_sam_med3d(path, config="tiny", allow_pickle=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tiny_sd[k]), k
    images = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(images), tiny_model.image_encoder(images))


def test_conversion_command_round_trip(tmp_path, tiny_sd):
    src = tmp_path / "official.pth"
    dst = tmp_path / "out" / "weights.pth"
    torch.save(upstream_layout_checkpoint(tiny_sd), src)
    assert convert_main(["-i", str(src), "-o", str(dst), "-c", "tiny"]) == 0
    plain = torch.load(dst, map_location="cpu", weights_only=True)  # no pickle needed any more
    assert set(plain) == set(tiny_sd) and all(torch.equal(plain[k], tiny_sd[k]) for k in tiny_sd)
    assert os.listdir(dst.parent) == ["weights.pth"]  # no temporary file left behind
    model = load_sam_med3d(dst, config="tiny")  # safe default load
    assert all(torch.equal(v, tiny_sd[k]) for k, v in model.state_dict().items())


def test_conversion_command_refuses_wrong_architecture(tmp_path, tiny_sd, capsys):
    src = tmp_path / "official.pth"
    torch.save(upstream_layout_checkpoint(tiny_sd), src)
    assert convert_main(["-i", str(src), "-o", str(tmp_path / "w.pth")]) == 1  # default vit_b_ori
    assert "does not match" in capsys.readouterr().err
    assert not (tmp_path / "w.pth").exists()


def test_tampered_key_fails_naming_it(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["mask_decoder.iou_head.layers.0.weight"] = sd.pop("mask_decoder.iou_prediction_head.layers.0.weight")
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    with pytest.raises(SAMCheckpointError) as err:
        load_sam_med3d(path, config="tiny")
    message = str(err.value)
    assert "sam_checkpoint" in message
    assert "missing key(s): mask_decoder.iou_prediction_head.layers.0.weight" in message
    assert "unexpected key(s): mask_decoder.iou_head.layers.0.weight" in message


def test_tampered_shape_fails_naming_it(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["image_encoder.blocks.0.attn.rel_pos_d"] = torch.zeros(7, 12)
    path = tmp_path / "reshaped.pth"
    torch.save(sd, path)
    with pytest.raises(SAMCheckpointError, match=r"image_encoder\.blocks\.0\.attn\.rel_pos_d \(checkpoint \(7, 12\), "
                                                 r"model \(11, 12\)\)"):
        load_sam_med3d(path, config="tiny")


def test_missing_or_unset_checkpoint_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="sam_checkpoint"):
        load_sam_med3d_state_dict(tmp_path / "nope.pth")
    with pytest.raises(SAMCheckpointError, match="sam_checkpoint"):
        load_sam_med3d_state_dict(None)
    with pytest.raises(FileNotFoundError, match="sam_checkpoint"):
        SAMMed3DPromptable.from_checkpoint(tmp_path / "nope.pth", config="tiny")
    with pytest.raises(SAMCheckpointError, match="sam_checkpoint"):
        SAMMed3DPromptable.from_checkpoint(None, config="tiny")
    assert SAMMed3DPromptable.from_checkpoint(None, config="tiny", random_init=True).input_space.size == (32, 32, 32)


def test_ddp_prefix_and_safetensors(tmp_path, tiny_sd):
    path = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in tiny_sd.items()}}, path)
    assert set(load_sam_med3d_state_dict(path)) == set(tiny_sd)
    safetensors = pytest.importorskip("safetensors.torch")
    st = tmp_path / "w.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(st))
    model = load_sam_med3d(st, config="tiny")
    assert all(torch.equal(v, tiny_sd[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------
# the promptable-model adapter
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_promptable(tiny_model):
    return SAMMed3DPromptable(tiny_model, config="tiny")


def test_input_space_of_released_model():
    with torch.device("meta"):
        wrapped = SAMMed3DPromptable(build_sam_med3d("vit_b_ori"))
    assert isinstance(wrapped, PromptableModel)
    space = wrapped.input_space
    assert (space.ndim, space.size, space.spacing_mm, space.in_channels, space.low_res_size) == \
        (3, (128, 128, 128), (1.5, 1.5, 1.5), 1, (32, 32, 32))
    assert space.prompt_kinds == frozenset({"points", "masks"})
    assert not any(p.requires_grad for p in wrapped.parameters())


def test_promptable_shapes(tiny_promptable):
    images = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        x = tiny_promptable.normalize(images)
        assert x.shape == (2, 1, 32, 32, 32)
        emb = tiny_promptable.encode(x)
        assert emb.shape == (2, 48, 4, 4, 4)
        points, labels = random_prompts(4, 2, 32, seed=13)
        rows = torch.tensor([0, 0, 1, 1])
        logits, iou = tiny_promptable.decode(emb[rows], points, labels)
        assert logits.shape == (4, 1, 16, 16, 16) and iou.shape == (4, 1)
        assert tiny_promptable.upscale(logits).shape == (4, 1, 32, 32, 32)
        # an image shared by all prompt sets gives the same as repeating it
        shared, _ = tiny_promptable.decode(emb[:1], points, labels)
        assert_close(shared, tiny_promptable.decode(emb[:1].expand(4, -1, -1, -1, -1), points, labels)[0])
        # batched over queries = one query at a time
        for i in range(4):
            assert_close(logits[i:i + 1], tiny_promptable.decode(emb[rows[i]][None], points[i:i + 1],
                                                                 labels[i:i + 1])[0])
        # no prompt at all
        assert tiny_promptable.decode(emb)[0].shape == (2, 1, 16, 16, 16)
        with pytest.raises(ValueError, match="box"):
            tiny_promptable.decode(emb, boxes=torch.zeros(2, 6))
        with pytest.raises(ValueError, match="encode expects"):
            tiny_promptable.encode(torch.randn(1, 1, 16, 16, 16))


def test_padding_points_are_ignored(tiny_promptable):
    emb = torch.randn(2, 48, 4, 4, 4, generator=torch.Generator().manual_seed(14))
    points, labels = random_prompts(2, 2, 32, seed=15)
    with torch.no_grad():
        plain, iou = tiny_promptable.decode(emb, points, labels)
        pad_points = torch.cat([points, torch.tensor([[[3.0, 30.0, 7.0]], [[31.0, 0.0, 12.0]]])], dim=1)
        pad_labels = torch.cat([labels, torch.full((2, 1), -1)], dim=1)
        padded, iou_padded = tiny_promptable.decode(emb, pad_points, pad_labels)
        assert_close(padded, plain)
        assert_close(iou_padded, iou)
        # prompt sets of different length batched together: row 0 has one real point and one pad
        mixed_labels = labels.clone()
        mixed_labels[0, 1] = -1
        mixed, _ = tiny_promptable.decode(emb, points, mixed_labels)
        alone, _ = tiny_promptable.decode(emb[:1], points[:1, :1], labels[:1, :1])
        assert_close(mixed[:1], alone)
        assert_close(mixed[1:], plain[1:])
        # a real point does change the output
        assert (alone - plain[:1]).abs().max() > 1e-3


def test_mask_prompt_changes_output(tiny_promptable):
    emb = torch.randn(2, 48, 4, 4, 4, generator=torch.Generator().manual_seed(16))
    points, labels = random_prompts(2, 1, 32, seed=17)
    with torch.no_grad():
        without, _ = tiny_promptable.decode(emb, points, labels)
        with_mask, _ = tiny_promptable.decode(emb, points, labels, mask_logits=4 * without)
        assert with_mask.shape == without.shape
        assert (with_mask - without).abs().max() > 1e-2
        with pytest.raises(ValueError, match="mask_logits"):
            tiny_promptable.decode(emb, points, labels, mask_logits=torch.zeros(2, 1, 8, 8, 8))


def test_normalize_rules():
    gen = torch.Generator().manual_seed(18)
    images = torch.full((2, 1, 8, 8, 8), -100.0)
    body = torch.randn(2, 1, 4, 4, 4, generator=gen) * 5 + 2
    images[:, :, 2:6, 2:6, 2:6] = body
    images[1] = images[0] * 2 + 1  # a positive affine intensity change does not change the result
    with torch.device("meta"):
        model = build_sam_med3d("tiny")
    wrapped = SAMMed3DPromptable(model, config="tiny")
    out = wrapped.normalize(images)
    fg = out[:, :, 2:6, 2:6, 2:6]
    assert_close(fg.mean(dim=(1, 2, 3, 4)), torch.zeros(2), atol=1e-5, rtol=0)
    assert_close(fg.std(dim=(1, 2, 3, 4)), torch.ones(2), atol=1e-5, rtol=0)
    assert_close(out[0], out[1])
    # a threshold in input units (e.g. 0 for raw intensities) picks the voxels above it
    thresholded = SAMMed3DPromptable(model, config="tiny", foreground_threshold=0.0).normalize(images[:1])
    sel = images[:1] > 0
    assert_close(thresholded[sel].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert_close(thresholded[sel].std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # a constant image stays finite
    assert torch.isfinite(wrapped.normalize(torch.ones(1, 1, 8, 8, 8))).all()


def test_bf16_autocast(tiny_promptable):
    images = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(19))
    points, labels = random_prompts(2, 2, 32, seed=20)
    with torch.no_grad():
        emb32 = tiny_promptable.encode(images)
        low32, _ = tiny_promptable.decode(emb32, points, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb16 = tiny_promptable.encode(images)
            low16, iou16 = tiny_promptable.decode(emb16, points, labels)
    assert torch.isfinite(emb16).all() and torch.isfinite(low16).all() and torch.isfinite(iou16).all()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(emb16, emb32) < 0.05
    assert rel(low16, low32) < 0.1


def test_registry_loads_weights_of_any_named_configuration(tmp_path):
    """sam_checkpoint holding a smaller named configuration (e.g. a test model) loads as that configuration;
    weights that fit none are reported against the released architecture."""
    from nnunetv2_samssl.sam import registry
    from nnunetv2_samssl.sam.sam_med3d.build import build_sam_med3d
    from nnunetv2_samssl.sam.sam_med3d.checkpoint import SAMCheckpointError

    torch.manual_seed(0)
    tiny = build_sam_med3d("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    model = registry.build_promptable_model("sam_med3d", str(path), "cpu")
    assert model.input_space.size == (32, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), tiny.state_dict().values()))
    broken = dict(tiny.state_dict())
    broken.pop(next(iter(broken)))
    torch.save(broken, path)
    with pytest.raises(SAMCheckpointError, match="vit_b_ori"):
        registry.build_promptable_model("sam_med3d", str(path), "cpu")
