"""SamPseudoLabeler with a small fake promptable model (no real SAM anywhere)."""
import inspect
import math

import pytest
import torch

from nnunetv2_samssl.sam.branch import SamPseudoLabeler, combine_class_probabilities
from nnunetv2_samssl.sam.interface import InputSpace
from sam_fakes import SPACE_2D, SPACE_2D_BOXES, SPACE_3D, FakeSam


SAM_INSIDE = float(torch.sigmoid(2.0 * torch.logit(torch.tensor(0.99))))  # the fake's probability on the object


def ball(shape, centre, radius):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def ellipsoid(shape, centre, radii):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def dice(a, b):
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def two_class_probs(foreground_prob):
    return torch.stack([1 - foreground_prob, foreground_prob], 1)


PATCH = (16, 40, 40)
SPACING = (3.0, 2.0, 2.0)  # 48 x 80 x 80 mm: one 32^3 window at 1.5 mm
OBJECT = ball(PATCH, (8, 20, 20), 7)  # in voxel units, with the (2, 1, 1) spacing it is an ellipsoid


def scene(batch=2):
    """Sample 0 has a bright object the student predicts with confidence; sample 1 has none predicted."""
    images = torch.zeros(batch, 1, *PATCH)
    images[:, 0][:, OBJECT] = 1.0
    fg = torch.full((batch, *PATCH), 0.02)
    fg[0][OBJECT] = 0.95
    return images, two_class_probs(fg)


# ---------------------------------------------------------------------------------------------------- point mode
def test_point_mode_click_loop_shapes_and_validity():
    model = FakeSam(SPACE_3D, radius=3.0)  # small radius: SAM misses most of the object -> positive clicks
    labeler = SamPseudoLabeler(model, mode="point", num_clicks=4)
    images, probs = scene()
    out = labeler(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
    assert out.probabilities.shape == (2, 2, *PATCH) and out.valid.shape == (2, *PATCH)
    assert torch.allclose(out.probabilities.sum(1), torch.ones(2, *PATCH), atol=1e-5)
    assert bool(out.valid[0][OBJECT].all()) and not bool(out.valid[1].any())
    assert torch.equal(out.probabilities[1], probs[1])  # nothing predicted: no SAM opinion, source copied
    assert out.uncertainty is None
    assert out.stats["num_queries"] == 1 and out.stats["num_decoder_calls"] == 4
    assert model.encoded == [1]  # the encoder ran once
    # exactly one new point per step, earlier points kept, previous low-res logits fed back
    assert [c["points"].shape[1] for c in model.calls] == [1, 2, 3, 4]
    for step in range(1, 4):
        previous, current = model.calls[step - 1], model.calls[step]
        assert torch.equal(current["points"][:, :-1], previous["points"])
        assert torch.equal(current["labels"][:, :-1], previous["labels"])
        assert torch.equal(current["mask"], model.outputs[step - 1])
    assert model.calls[0]["mask"] is None
    assert model.calls[1]["labels"][0, -1].item() == 1  # SAM missed predicted foreground -> positive click
    # every click, mapped back through the crop geometry, lies on the object the student predicted
    points = model.calls[-1]["points"]
    assert points.shape == (1, 4, 3) and bool((model.calls[-1]["labels"] == 1).all())
    crop = labeler.mapper(SPACING).to_model(images, (probs.argmax(1) > 0).unsqueeze(1), keep_empty=False)
    in_patch = crop.points_to_patch(points).round().long()[0]
    assert bool(OBJECT[tuple(in_patch.unbind(-1))].all())


def test_clicks_stop_adding_information_when_sam_agrees():
    model = FakeSam(SPACE_3D, radius=40.0)  # SAM gets the whole bright object from the first click
    labeler = SamPseudoLabeler(model, mode="point", num_clicks=3)
    images, probs = scene(1)
    out = labeler(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
    assert [c["labels"][0].tolist() for c in model.calls] == [[1], [1, -1], [1, -1, -1]]
    assert dice(out.hard_label[0] == 1, OBJECT) > 0.97


def test_sam_recovers_what_an_uncertain_student_misses():
    images, _ = scene(1)
    fg = torch.full((1, *PATCH), 0.02)
    cap = OBJECT.clone()
    cap[:8] = False  # the student is confident only about half the object ...
    fg[0][OBJECT] = 0.4  # ... and unsure (predicts background) about the rest
    fg[0][cap] = 0.95
    probs = two_class_probs(fg)
    model = FakeSam(SPACE_3D, radius=40.0)
    out = SamPseudoLabeler(model, mode="point", num_clicks=3)(images, probs, patch_spacing=SPACING,
                                                              generator=torch.Generator().manual_seed(0))
    student_dice = dice(probs.argmax(1)[0] == 1, OBJECT)
    sam_dice = dice(out.hard_label[0] == 1, OBJECT)
    assert student_dice < 0.75 and sam_dice > 0.95
    # the uncertain half is never clicked negative
    assert all((c["labels"] != 0).all() for c in model.calls)


def test_deterministic_with_generator():
    """Equal seeds give bit-identical prompts and pseudo-labels even when the global RNG differs between the runs
    (the draws come from the generator, not the global state); another seed gives other prompts and another
    pseudo-label. With a small SAM radius (3 model voxels on an object of radius ~9-14), where the random initial
    points land decides what SAM segments, so the seed must show in the output."""
    images, probs = scene()

    def run(seed, global_seed):
        model = FakeSam(SPACE_3D, radius=3.0)
        labeler = SamPseudoLabeler(model, mode="point", num_clicks=3, num_positive=2, num_negative=2)
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)
            out = labeler(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(seed))
        return [(c["points"], c["labels"]) for c in model.calls], out.probabilities

    (prompts_a, probs_a), (prompts_b, probs_b), (prompts_c, probs_c) = run(4, 0), run(4, 1), run(5, 0)
    assert len(prompts_a) == len(prompts_b) == 3
    assert all(torch.equal(pa, pb) and torch.equal(la, lb) for (pa, la), (pb, lb) in zip(prompts_a, prompts_b))
    assert torch.equal(probs_a, probs_b)
    assert not torch.equal(prompts_a[0][0], prompts_c[0][0])  # other initial points ...
    assert not torch.equal(probs_a, probs_c)  # ... and another pseudo-label
    assert float((probs_a - probs_c).abs().max()) > 0.5  # not a rounding-level difference


def test_cpu_chunks_the_encoder_by_one_and_the_decoder_by_four_without_changing_the_pseudo_labels():
    """On a CPU (settings left open) windows are encoded one at a time and queries decoded four at a time, the
    fastest per image / per query there; the pseudo-labels equal one batched call of each, and a click round
    still counts as one decoder call."""
    batch = 6
    images = torch.zeros(batch, 1, *PATCH)
    images[:, 0][:, OBJECT] = 1.0
    fg = torch.full((batch, *PATCH), 0.02)
    fg[:, OBJECT] = 0.95
    probs = two_class_probs(fg)
    outputs, models = {}, {}
    for chunks in ("cpu default", "one batch"):
        models[chunks] = model = FakeSam(SPACE_3D, radius=3.0)
        sizes = dict(encoder_batch_size=100, decoder_batch_size=100) if chunks == "one batch" else {}
        labeler = SamPseudoLabeler(model, mode="point", num_clicks=3, **sizes)
        outputs[chunks] = labeler(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
    assert models["cpu default"].encoded == [1] * batch and models["one batch"].encoded == [batch]
    assert [len(c["points"]) for c in models["cpu default"].calls] == [4, 2] * 3
    assert [len(c["points"]) for c in models["one batch"].calls] == [batch] * 3
    for chunked, whole in zip(models["cpu default"].calls[::2], models["one batch"].calls):
        assert torch.equal(chunked["points"], whole["points"][:4])
    default, batched = outputs["cpu default"], outputs["one batch"]
    assert default.stats["num_decoder_calls"] == batched.stats["num_decoder_calls"] == 3
    assert default.stats["num_queries"] == batch
    torch.testing.assert_close(default.probabilities, batched.probabilities, atol=1e-6, rtol=0)
    assert torch.equal(default.valid, batched.valid)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_warns_once_where_the_cpu_only_emulates_bf16(monkeypatch, native):
    """``sam_cpu_bf16=true`` on a CPU without native bf16 (AVX2 only: emulated, many times slower) warns once per
    labeler and names the setting; a CPU with native bf16, or float32, runs silently."""
    import warnings

    from nnunetv2_samssl.sam import branch

    monkeypatch.setattr(branch, "cpu_has_native_bf16", lambda: native)
    images, probs = scene()
    for cpu_bf16 in (True, False):
        labeler = SamPseudoLabeler(FakeSam(SPACE_3D, radius=3.0), mode="point", num_clicks=2, cpu_bf16=cpu_bf16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                labeler(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
        emulated = [w for w in caught if "without native bf16" in str(w.message)]
        assert len(emulated) == (1 if cpu_bf16 and not native else 0)
        if emulated:
            assert "sam_cpu_bf16=false" in str(emulated[0].message)


# ---------------------------------------------------------------------------------------------------- mask mode
def test_mask_mode_single_decoder_pass_with_prediction_as_mask_prompt():
    model = FakeSam(SPACE_3D)
    labeler = SamPseudoLabeler(model, mode="mask", num_clicks=5, mask_prompt_eps=1e-4)
    images, probs = scene()
    out = labeler(images, probs, patch_spacing=SPACING)
    assert len(model.calls) == 1 and out.stats["num_decoder_calls"] == 1
    call = model.calls[0]
    assert call["points"] is None and call["boxes"] is None
    assert call["mask"].shape == (1, 1, 16, 16, 16)
    bound = math.log((1 - 1e-4) / 1e-4)
    assert float(call["mask"].abs().max()) <= bound + 1e-3
    assert float(call["mask"].max()) > 2.0 and float(call["mask"].min()) < -2.0  # confident both ways
    # the fake returns the bright part of the mask prompt: the pseudo-label reproduces the prediction
    assert dice(out.hard_label[0] == 1, OBJECT) > 0.95


# ---------------------------------------------------------------------------------------------------- grid mode
def test_grid_mode_one_pass_with_positive_grid_on_object_and_negative_on_background():
    model = FakeSam(SPACE_3D, radius=4.0)  # each point speaks for its neighbourhood only
    labeler = SamPseudoLabeler(model, mode="grid", grid_density=4.0, grid_max_points=None)
    images, probs = scene()
    out = labeler(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 1 and out.stats["num_decoder_calls"] == 1
    call = model.calls[0]
    points, labels = call["points"][0], call["labels"][0]
    assert call["mask"] is None  # a zero mask prompt only for models trained with one (SAM-Med3D)
    positive, negative = points[labels == 1], points[labels == 0]
    assert len(positive) > 1 and len(negative) > 1 and out.stats["points_per_query"] == points.shape[0]
    # positives sit on the predicted object, negatives off it (model-space window of the object's query)
    size = SPACE_3D.size
    assert all(0 <= float(c) < s for p in points[labels >= 0] for c, s in zip(p, size))
    spacing = torch.tensor(sorted(set(float(d) for d in positive[:, 0])))
    assert len(spacing) > 1 and float((spacing[1:] - spacing[:-1]).min()) >= 1.0  # a grid, not a cluster
    assert dice(out.hard_label[0] == 1, OBJECT) > 0.9
    capped = SamPseudoLabeler(FakeSam(SPACE_3D), mode="grid", grid_density=4.0, grid_max_points=2)
    capped(images, probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
    labels_capped = capped.model.calls[0]["labels"][0]
    assert int((labels_capped == 1).sum()) == 2 and int((labels_capped == 0).sum()) == 2


# ---------------------------------------------------------------------------------------------------- unc mode
def test_unc_mode_uncertainty_map():
    images, _ = scene()
    fg = torch.full((2, *PATCH), 0.02)
    fg[0][OBJECT] = 0.95
    half = OBJECT.clone()
    half[:, :, :20] = False
    fg[0][half] = 0.7  # SAM says ~1 there, the student 0.7: some variance
    probs = two_class_probs(fg)
    model = FakeSam(SPACE_3D, radius=40.0)
    out = SamPseudoLabeler(model, mode="unc", num_clicks=3)(images, probs, patch_spacing=SPACING,
                                                            generator=torch.Generator().manual_seed(0))
    u = out.uncertainty
    assert u.shape == (2, *PATCH) and float(u.min()) >= 0.0 and float(u.max()) <= 0.25
    assert float(u[~out.valid].abs().max()) == 0.0
    expected = torch.tensor([0.7, SAM_INSIDE, SAM_INSIDE, SAM_INSIDE]).var(correction=0)  # student + 3 clicks
    assert abs(float(u[0, 8, 20, 24]) - float(expected)) < 0.1 * float(expected)
    confident = torch.tensor([0.95, SAM_INSIDE, SAM_INSIDE, SAM_INSIDE]).var(correction=0)
    assert abs(float(u[0, 8, 20, 16]) - float(confident)) < 0.1 * float(confident)
    assert float(u[0, 8, 20, 24]) > 3 * float(u[0, 8, 20, 16])
    assert len(model.calls) == 3


# ---------------------------------------------------------------------------------------------------- multi-class
def test_multi_class_queries_and_combination():
    shape = (16, 48, 48)  # at (3, 1.5, 1.5) mm both objects are 9 mm spheres (6 model voxels)
    first = ellipsoid(shape, (8, 14, 14), (3, 6, 6))
    second = ellipsoid(shape, (8, 28, 27), (3, 6, 6))
    images = torch.zeros(1, 1, *shape)
    images[0, 0][first | second] = 1.0
    probs = torch.full((1, 3, *shape), 0.02)
    probs[:, 0] = 0.96
    probs[0, :, first] = torch.tensor([0.03, 0.95, 0.02]).view(3, 1)
    probs[0, :, second] = torch.tensor([0.03, 0.02, 0.95]).view(3, 1)
    for roi, crops in (("union", 1), ("per_class", 2)):
        model = FakeSam(SPACE_3D, radius=9.0)
        labeler = SamPseudoLabeler(model, mode="point", num_clicks=2, roi=roi, positive_selection="interior",
                                   encoder_batch_size=64)  # one encoder batch, as on a GPU
        out = labeler(images, probs, patch_spacing=(3.0, 1.5, 1.5), generator=torch.Generator().manual_seed(0))
        assert out.stats["num_crops"] == crops and out.stats["num_queries"] == 2
        assert model.encoded == [crops]
        assert model.calls[0]["points"].shape[0] == 2  # both classes decoded in one batched call
        assert dice(out.hard_label[0] == 1, first) > 0.9 and dice(out.hard_label[0] == 2, second) > 0.9
        assert torch.allclose(out.probabilities.sum(1), torch.ones(1, *shape), atol=1e-5)


def test_overlapping_classes_are_resolved_by_max_then_shared():
    q = torch.tensor([[0.9, 0.9], [0.2, 0.6], [0.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 4)
    p = combine_class_probabilities(q)[0].T
    expected = torch.tensor([[0.1, 0.45, 0.45], [0.4, 0.15, 0.45], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(p, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- other inputs
def test_tiles_share_one_encoder_call():
    """The tiles of a case are gathered into one encoder batch (one call with the chunk size of a GPU)."""
    shape = (24, 96, 96)  # 32 x 64 x 64 model voxels at 1.5 mm: several 32^3 tiles
    obj = ball(shape, (12, 48, 48), 40) & ball(shape, (12, 48, 48), 100)
    obj[:2] = obj[-2:] = False
    images = obj.float()[None, None]
    probs = two_class_probs(torch.where(obj, 0.95, 0.02)[None])
    model = FakeSam(SPACE_3D, radius=60.0)
    out = SamPseudoLabeler(model, mode="point", num_clicks=2, encoder_batch_size=64)(
        images, probs, patch_spacing=(2.0, 1.0, 1.0),
                                                              generator=torch.Generator().manual_seed(0))
    assert out.stats["num_crops"] > 1 and model.encoded == [int(out.stats["num_crops"])]
    assert bool(out.valid[0][obj].all())
    assert dice(out.hard_label[0] == 1, obj) > 0.97


def test_box_only_model_gets_a_box_from_confident_foreground():
    shape = (64, 64)
    obj = ball(shape, (30, 26), 12)
    images = obj.float()[None, None]
    fg = torch.where(obj, 0.95, 0.02)
    fg[ball(shape, (30, 40), 4) & ~obj] = 0.55  # an uncertain bump the box should not stretch to
    probs = two_class_probs(fg[None])
    model = FakeSam(SPACE_2D_BOXES)
    out = SamPseudoLabeler(model, mode="point", num_clicks=5, box_margin=2)(images, probs, patch_spacing=(1.0, 1.0))
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["points"] is None and call["mask"] is None and call["boxes"].shape == (1, 4)
    assert dice(out.hard_label[0] == 1, obj) > 0.95
    with pytest.warns(UserWarning, match="no mask prompts"):
        SamPseudoLabeler(FakeSam(SPACE_2D_BOXES), mode="mask")


def test_slice_wise_2d_model_on_3d_patches():
    shape = (10, 40, 40)
    obj = ball(shape, (4.5, 20, 20), 3.5) | ball(shape, (4.5, 20, 20), 0)
    images = obj.float()[None, None]
    probs = two_class_probs(torch.where(obj, 0.95, 0.02)[None])
    model = FakeSam(SPACE_2D, radius=100.0)
    out = SamPseudoLabeler(model, mode="point", num_clicks=2, encoder_batch_size=64)(  # one batch, as on a GPU
        images, probs, patch_spacing=(3.0, 1.0, 1.0),
                                                              generator=torch.Generator().manual_seed(0))
    slices = obj.flatten(1).any(1)
    assert out.stats["num_crops"] == int(slices.sum()) and model.encoded == [int(slices.sum())]
    assert torch.equal(out.valid[0].flatten(1).any(1), slices)
    assert dice(out.hard_label[0] == 1, obj) > 0.95


def test_outputs_detached_model_frozen_and_label_free_api():
    images, probs = scene()
    probs = probs.clone().requires_grad_(True)
    model = FakeSam(SPACE_3D)
    labeler = SamPseudoLabeler(model, mode="unc", num_clicks=2)
    out = labeler(images, probs, probs.detach() * 0.9 + 0.05, patch_spacing=SPACING)
    assert not out.probabilities.requires_grad and not out.uncertainty.requires_grad
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    names = {n.lower() for n in inspect.signature(SamPseudoLabeler.__call__).parameters}
    assert not names & {"label", "labels", "target", "gt", "seg", "ground_truth"}


def test_deep_supervision_scales_of_the_pseudo_label():
    images, probs = scene()
    out = SamPseudoLabeler(FakeSam(SPACE_3D), mode="mask")(images, probs, patch_spacing=SPACING)
    levels = out.at_scales([[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    assert [tuple(v.shape) for v, _ in levels] == [(2, 2, 16, 40, 40), (2, 2, 8, 20, 20), (2, 2, 4, 10, 10)]
    assert [tuple(m.shape) for _, m in levels] == [(2, 16, 40, 40), (2, 8, 20, 20), (2, 4, 10, 10)]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="mode"):
        SamPseudoLabeler(FakeSam(SPACE_3D), mode="boxes")
    points_only = InputSpace(3, (32, 32, 32), (1.5, 1.5, 1.5), 1, (16, 16, 16), frozenset({"points"}))
    with pytest.raises(ValueError, match="masks"):
        SamPseudoLabeler(FakeSam(points_only), mode="mask")
    images, probs = scene()
    with pytest.raises(ValueError, match="teacher_probs"):
        SamPseudoLabeler(FakeSam(SPACE_3D), prompt_source="teacher")(images, probs, patch_spacing=SPACING)
    with pytest.raises(ValueError, match="K>=2"):
        SamPseudoLabeler(FakeSam(SPACE_3D))(images, probs[:, 1:], patch_spacing=SPACING)


def test_explicit_box_prompts_on_a_model_that_accepts_everything():
    shape = (64, 64)
    obj = ball(shape, (30, 26), 12)
    images = obj.float()[None, None]
    probs = two_class_probs(torch.where(obj, 0.95, 0.02)[None])
    model = FakeSam(SPACE_2D)  # points, boxes and masks, like the LiteMedSAM backend
    SamPseudoLabeler(model, mode="point", prompt_kind="boxes", num_clicks=4)(images, probs, patch_spacing=(1.0, 1.0))
    assert len(model.calls) == 1 and model.calls[0]["points"] is None and model.calls[0]["boxes"] is not None
    model = FakeSam(SPACE_2D)
    out = SamPseudoLabeler(model, mode="mask", prompt_kind="boxes")(images, probs, patch_spacing=(1.0, 1.0))
    call = model.calls[0]
    assert len(model.calls) == 1 and call["points"] is None
    assert call["boxes"].shape == (1, 4) and call["mask"].shape == (1, 1, 32, 32)
    assert dice(out.hard_label[0] == 1, obj) > 0.95


def test_max_crops_caps_the_encoder_batch():
    """Slice-wise mode with a cap: at most ``max_crops`` slices are encoded, the rest stay invalid."""
    from nnunetv2_samssl.sam.branch import SamPseudoLabeler
    from nnunetv2_samssl.sam.interface import InputSpace, PromptableModel

    class Counting(PromptableModel):
        input_space = InputSpace(2, (16, 16), None, 1, (16, 16), frozenset({"points", "boxes", "masks"}))

        def __init__(self):
            super().__init__()
            self.encoded = 0

        def normalize(self, images):
            return images[:, :1]

        def encode(self, images):
            self.encoded += images.shape[0]
            return images

        def decode(self, embeddings, points=None, point_labels=None, boxes=None, mask_logits=None):
            return torch.zeros(embeddings.shape[0], 1, 16, 16), torch.zeros(embeddings.shape[0], 1)

    model = Counting()
    probs = torch.zeros(1, 2, 10, 16, 16)
    probs[:, 1, :, 4:12, 4:12] = 1.0
    probs[:, 0] = 1 - probs[:, 1]
    labeler = SamPseudoLabeler(model, mode="point", num_clicks=1, max_crops=3)
    out = labeler(torch.randn(1, 1, 10, 16, 16), probs, patch_spacing=(2.0, 1.0, 1.0),
                  generator=torch.Generator().manual_seed(0))
    assert model.encoded == 3 and out.stats["num_crops"] == 3
    covered_slices = out.valid[0].flatten(1).any(1)
    assert int(covered_slices.sum()) == 3


# ---------------------------------------------------------------------------------------------------- SAM-Med3D loop
def test_sam_med3d_click_loop_is_upstreams_loop_zero_mask_prompt_first():
    """SAM-Med3D is trained (and run by its inference code and SemiSAM's) with a mask prompt on every decode:
    zeros at the first click, then the previous low-res logits, all points so far kept. The branch's 10-click
    loop on a tiny random SAM-Med3D equals that loop written with the raw prompt encoder and mask decoder."""
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable

    torch.manual_seed(0)
    model = SAMMed3DPromptable.from_checkpoint(None, config="tiny", random_init=True)
    calls = []
    decode = model.decode

    def spy(embeddings, points=None, point_labels=None, boxes=None, mask_logits=None):
        out = decode(embeddings, points, point_labels, boxes, mask_logits)
        calls.append(dict(embeddings=embeddings, points=points, labels=point_labels, mask=mask_logits, out=out[0]))
        return out

    model.decode = spy
    images, probs = scene(batch=1)
    SamPseudoLabeler(model, mode="point", num_clicks=10)(images, probs, patch_spacing=SPACING,
                                                        generator=torch.Generator().manual_seed(0))
    assert len(calls) == 10
    low_res = (calls[0]["embeddings"].shape[0], 1, *model.input_space.low_res_size)
    assert calls[0]["mask"] is not None and calls[0]["mask"].shape == low_res and not calls[0]["mask"].any()

    # the reference: upstream's interaction loop (SAM-Med3D train.py / infer_utils), same clicks
    sam = model.model
    previous = torch.zeros(low_res)
    with torch.no_grad():
        for i, call in enumerate(calls):
            assert call["points"].shape[1] == calls[0]["points"].shape[1] + i  # one new click per pass, all kept
            sparse, dense, valid = sam.prompt_encoder(points=(call["points"], call["labels"]), masks=previous,
                                                      batch_size=call["embeddings"].shape[0])
            previous, _ = sam.mask_decoder(image_embeddings=call["embeddings"],
                                           image_pe=sam.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False, sparse_valid=valid)
            torch.testing.assert_close(call["out"], previous, rtol=1e-5, atol=1e-5)


def test_2d_models_keep_their_first_pass_without_a_mask_prompt():
    model = FakeSam(SPACE_2D, radius=3.0)
    images = torch.zeros(1, 1, 32, 32)
    images[0, 0, 10:20, 10:20] = 1.0
    fg = torch.full((1, 32, 32), 0.02)
    fg[0, 10:20, 10:20] = 0.95
    SamPseudoLabeler(model, mode="point", num_clicks=3)(images, two_class_probs(fg), patch_spacing=(1.0, 1.0),
                                                       generator=torch.Generator().manual_seed(0))
    assert model.calls[0]["mask"] is None and model.calls[1]["mask"] is not None


def test_entropy_gated_prompts_are_the_same_with_or_without_a_teacher_map():
    """One definition of prompt uncertainty: online SemiSAM has the teacher's map of every patch, the whole-case
    (cached) refresh only computes it when a setting needs it. With the default entropy measure the prompts
    and pseudo-labels must not depend on it; the disagreement measure does use it."""
    images, probs = scene(batch=1)
    teacher = probs.flip(1)  # the opposite prediction: disagreement 0.8 on every voxel

    def run(measure, teacher_probs):
        model = FakeSam(SPACE_3D, radius=3.0)
        out = SamPseudoLabeler(model, mode="point", num_clicks=3, uncertainty_measure=measure)(
            images, probs, teacher_probs, patch_spacing=SPACING, generator=torch.Generator().manual_seed(0))
        return [(c["points"], c["labels"]) for c in model.calls], out.probabilities

    calls_without, probs_without = run("entropy", None)
    calls_with, probs_with = run("entropy", teacher)
    assert len(calls_with) == len(calls_without) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(calls_with, calls_without))
    assert torch.equal(probs_with, probs_without)
    calls_max, _ = run("max", teacher)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(calls_max, calls_without))


# ---------------------------------------------------------------------------------------------------- whole windows
def test_whole_windows_do_not_follow_the_prediction_and_reuse_embeddings():
    """``windows='whole'``: each slice with something predicted gets a window on the whole slice, the same
    whatever the prediction; a second call finds the embeddings in the cache and labels bit-for-bit as an
    uncached call; ``roi`` windows follow the prediction."""
    from nnunetv2_samssl.sam.embedding_cache import EmbeddingCache

    shape = (6, 40, 48)
    obj = ball(shape, (2.5, 20, 30), 8)
    images = torch.zeros(1, 1, *shape)
    images[0, 0][obj] = 1.0
    small = two_class_probs(torch.where(obj & ball(shape, (2.5, 20, 30), 4), 0.95, 0.02)[None])
    large = two_class_probs(torch.where(obj, 0.95, 0.02)[None])
    spacing = (3.0, 1.0, 1.0)

    def run(probs, windows, cache=None):
        model = FakeSam(SPACE_2D, radius=100.0)
        labeler = SamPseudoLabeler(model, mode="mask")
        geometry = []
        original = labeler._plan_queries

        def plan(*args):
            result = original(*args)
            geometry.append(torch.cat([result[0].offset, result[0].scale], 1))
            return result
        labeler._plan_queries = plan
        out = labeler(images, probs, patch_spacing=spacing, windows=windows, embedding_cache=cache,
                      case_key=None if cache is None else "case_0")
        return out, geometry[0], sum(model.encoded)

    slices_small = int(small[0, 1].flatten(1).gt(0.5).any(1).sum())
    roi_a, geometry_a, _ = run(small, "roi")
    roi_b, geometry_b, _ = run(large, "roi")
    assert geometry_a.shape == geometry_b.shape and not torch.allclose(geometry_a, geometry_b)
    whole_a, geometry_a, encoded = run(small, "whole")
    assert encoded == slices_small
    assert torch.allclose(geometry_a, geometry_a[:1].expand_as(geometry_a))  # the same window on every slice
    # the whole 40 x 48 slice at 1 mm fills the 64-pixel window along its longest side: 0.75 voxels per pixel
    assert torch.allclose(geometry_a[0, 2:], torch.tensor([0.75, 0.75]))

    cache = EmbeddingCache(budget_mib=64)
    first, _, encoded_first = run(small, "whole", cache)
    assert encoded_first == slices_small and cache.misses == slices_small and cache.hits == 0
    again, _, encoded_again = run(large, "whole", cache)  # another prediction, the same windows
    assert cache.hits == slices_small and encoded_again == cache.misses - slices_small
    uncached, _, _ = run(large, "whole")
    assert torch.equal(again.probabilities, uncached.probabilities) and torch.equal(again.valid, uncached.valid)
    assert torch.equal(first.probabilities, whole_a.probabilities)
    with pytest.raises(ValueError, match="windows='whole' and a case_key"):
        SamPseudoLabeler(FakeSam(SPACE_2D))(images, small, patch_spacing=spacing, embedding_cache=cache,
                                             case_key="case_0")


def test_embedding_cache_keeps_exact_encoder_outputs_within_its_budget():
    from nnunetv2_samssl.sam.embedding_cache import EmbeddingCache, window_keys

    images = torch.randn(5, 2, 4, 4)
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        return x * 3.0

    keys = window_keys("a", torch.arange(5), None, torch.zeros(5, 2), torch.ones(5, 2))
    assert len(set(keys)) == 5
    cache = EmbeddingCache(budget_mib=3 * images[0].numel() * 4 / 2 ** 20)  # room for exactly 3 entries
    out = cache.embeddings(keys, lambda index: images[index], encode, torch.device("cpu"))
    assert torch.equal(out, images * 3.0) and calls == [5] and len(cache) == 3 and cache.refused == 2
    out = cache.embeddings(keys[::-1], lambda index: images.flip(0)[index], encode, torch.device("cpu"))
    assert torch.equal(out, images.flip(0) * 3.0) and calls == [5, 2] and cache.hits == 3
    # keys of another case, or of a moved window, do not hit
    other = window_keys("b", torch.arange(1), None, torch.zeros(1, 2), torch.ones(1, 2))
    moved = window_keys("a", torch.arange(1), None, torch.full((1, 2), 0.01), torch.ones(1, 2))
    assert other[0] not in keys and moved[0] not in keys
    assert EmbeddingCache(0).budget_bytes == 0
