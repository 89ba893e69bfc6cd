"""Uncertainty maps and prediction-driven point prompts (SemiSAM points, click loop helper)."""
import inspect
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunetv2_samssl.prompts import (SemiSAMPointSampler, foreground_class_queries, next_click, predictive_entropy,
                                     probability_variance, prompt_uncertainty, semisam_points,
                                     student_teacher_disagreement)
from nnunetv2_samssl.prompts.semisam_points import dilate, erode, erosion_depth
from nnunetv2_samssl.sam.branch import SamPseudoLabeler
from sam_fakes import SPACE_3D, FakeSam

LABEL_LIKE = {"label", "labels", "target", "targets", "gt", "ground_truth", "seg", "segmentation", "y"}


def ball(shape, centre, radius):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def binary_probs(foreground_prob):
    """(B, *S) foreground probability -> (B, 2, *S) softmax-like probabilities."""
    return torch.stack([1 - foreground_prob, foreground_prob], 1)


def at(tensor, coords):
    """tensor (*S) values at integer coords (N, ndim)."""
    return tensor[tuple(coords.long().unbind(-1))]


# ---------------------------------------------------------------------------------------------------- uncertainty
def test_entropy_is_normalised():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]]).T.reshape(1, 3, 3, 1)
    entropy = predictive_entropy(probs)
    assert entropy.shape == (1, 3, 1)
    assert torch.allclose(entropy[0, :, 0], torch.tensor([0.0, 1.0, math.log(2) / math.log(3)]), atol=1e-5)
    single = predictive_entropy(torch.tensor([0.5, 1.0, 0.0]).view(1, 1, 3, 1))  # K = 1: binary foreground
    assert torch.allclose(single[0, :, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)


def test_disagreement_and_variance_ranges():
    s = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    t = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    assert torch.allclose(student_teacher_disagreement(s, s), torch.zeros(1, 4, 4))
    assert torch.allclose(student_teacher_disagreement(s, t), torch.ones(1, 4, 4))
    maps = torch.rand(5, 2, 8, 8)
    var = probability_variance(maps)
    assert var.shape == (2, 8, 8) and float(var.min()) >= 0 and float(var.max()) <= 0.25
    assert torch.allclose(probability_variance([torch.zeros(3), torch.ones(3)]), torch.full((3,), 0.25))
    p9, p1 = binary_probs(torch.full((1, 4, 4), 0.9)), binary_probs(torch.full((1, 4, 4), 0.1))
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)  # 0.469
    assert torch.allclose(prompt_uncertainty(p9, "entropy", p9, p1), torch.full((1, 4, 4), entropy))  # teacher unused
    assert torch.allclose(prompt_uncertainty(p9, "max", p9, p1), torch.full((1, 4, 4), 0.64))  # 0.5 * 2 * 0.8^2
    assert torch.allclose(prompt_uncertainty(p1, "max", p9, p9), torch.full((1, 4, 4), entropy))
    with pytest.raises(ValueError, match="teacher"):
        prompt_uncertainty(s, measure="disagreement", student=s)


# ---------------------------------------------------------------------------------------------------- morphology
def test_dilation_and_depth_match_scipy():
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(ndimage.binary_opening(rng.random((2, 20, 24, 18)) > 0.55, np.ones((1, 3, 3, 3))))
    for radius in [(1, 1, 1), (2, 1, 0), (3, 2, 1)]:
        ours = dilate(mask, radius)
        structure = np.ones([2 * r + 1 for r in radius], dtype=bool)
        ref = np.stack([ndimage.binary_dilation(m, structure) for m in mask.numpy()])
        assert np.array_equal(ours.numpy(), ref)
    ours = erosion_depth(mask, max_depth=4)
    padded = np.pad(mask.numpy(), ((0, 0), (1, 1), (1, 1), (1, 1)))  # the border counts as background
    ref = np.stack([ndimage.distance_transform_cdt(m, metric="chessboard")[1:-1, 1:-1, 1:-1] for m in padded])
    assert np.array_equal(ours.numpy(), np.minimum(ref, 4).astype(np.float32))
    assert np.array_equal(erode(mask).numpy(), ref >= 2)
    # 2D, and axes of length 1 and 2 (every voxel is on the border there)
    for shape in [(3, 17, 11), (2, 1, 9, 9), (2, 2, 9, 9)]:
        mask = torch.from_numpy(rng.random(shape) > 0.2)
        cube = np.ones((3,) * (len(shape) - 1), dtype=bool)
        ref = np.stack([ndimage.binary_erosion(m, cube, border_value=0) for m in mask.numpy()])
        assert np.array_equal(erode(mask).numpy(), ref)


# ---------------------------------------------------------------------------------------------------- SemiSAM points
def make_prediction():
    """A confident object with an uncertain rim, plus an uncertain blob; probabilities only."""
    shape = (24, 32, 32)
    core = ball(shape, (12, 16, 16), 6)
    rim = ball(shape, (12, 16, 16), 8) & ~core
    doubtful = ball(shape, (4, 4, 4), 3)
    fg = torch.full(shape, 0.02)
    fg[core] = 0.97
    fg[rim] = 0.6
    fg[doubtful] = 0.55
    return binary_probs(fg.unsqueeze(0)), core, rim, doubtful


def test_points_lie_in_the_intended_regions():
    probs, core, rim, doubtful = make_prediction()
    uncertainty = predictive_entropy(probs)
    predicted = probs.argmax(1)[0] == 1
    sampler = SemiSAMPointSampler(num_positive=20, num_negative=20, uncertainty_threshold=0.5, band_radius=3)
    prompts = sampler(probs, uncertainty, generator=torch.Generator().manual_seed(0))
    assert prompts.points.shape == (1, 40, 3) and prompts.labels.shape == (1, 40)
    assert prompts.sample_index.tolist() == [0] and prompts.class_index.tolist() == [1]
    positives = prompts.points[0][prompts.labels[0] == 1]
    negatives = prompts.points[0][prompts.labels[0] == 0]
    assert len(positives) == 20 and len(negatives) == 20
    assert bool(at(core, positives).all())  # predicted foreground with low uncertainty: the core, never the rim
    assert bool((at(uncertainty[0], positives) < 0.5).all())
    band = dilate(predicted[None], 3)[0] & ~predicted
    assert bool(at(band, negatives).all())  # within 3 voxels of the predicted object ...
    assert not bool(at(predicted, negatives).any())  # ... confidently background
    assert bool((at(uncertainty[0], negatives) < 0.5).all())
    assert not bool(at(doubtful, torch.cat([positives, negatives])).any())


def test_padding_when_nothing_is_eligible():
    shape = (1, 10, 10)
    points, labels = semisam_points(torch.zeros(shape, dtype=torch.bool), torch.zeros(shape), num_positive=2,
                                    num_negative=3)
    assert labels.tolist() == [[-1] * 5] and float(points.abs().sum()) == 0.0
    # no background band (object fills the image): positives present, negatives padded
    points, labels = semisam_points(torch.ones(shape, dtype=torch.bool), torch.zeros(shape), num_positive=2,
                                    num_negative=2)
    assert labels.tolist() == [[1, 1, -1, -1]]
    # a sample without predicted foreground produces no query at all
    probs = binary_probs(torch.full((2, 8, 8), 0.01))
    probs[1, :, 2:5, 2:5] = torch.tensor([0.1, 0.9]).view(2, 1, 1)
    prompts = SemiSAMPointSampler(num_positive=1)(probs)
    assert prompts.sample_index.tolist() == [1]


def test_fallback_uses_least_uncertain_foreground():
    shape = (1, 12, 12)
    foreground = torch.zeros(shape, dtype=torch.bool)
    foreground[0, 3:9, 3:9] = True
    uncertainty = torch.full(shape, 0.9)
    uncertainty[0, 5, 6] = 0.6
    uncertainty[0, 4, 4] = 0.7
    uncertainty[0, 0, 0] = 0.0  # confident but not foreground: never a positive
    points, labels = semisam_points(foreground, uncertainty, num_positive=2, uncertainty_threshold=0.5)
    assert labels.tolist() == [[1, 1]]
    assert points[0].tolist() == [[5.0, 6.0], [4.0, 4.0]]
    _, labels = semisam_points(foreground, uncertainty, num_positive=2, uncertainty_threshold=0.5, fallback=False)
    assert labels.tolist() == [[-1, -1]]


def test_interior_selection_picks_the_deepest_confident_voxel():
    shape = (1, 15, 15)
    foreground = torch.zeros(shape, dtype=torch.bool)
    foreground[0, 2:13, 2:13] = True
    points, labels = semisam_points(foreground, torch.zeros(shape), num_positive=1, positive_selection="interior",
                                    max_depth=10, generator=torch.Generator().manual_seed(3))
    assert points[0, 0].tolist() == [7.0, 7.0] and labels.tolist() == [[1]]


def test_deterministic_with_a_generator():
    probs, *_ = make_prediction()
    sampler = SemiSAMPointSampler(num_positive=3, num_negative=3, band_radius=2)
    a = sampler(probs, generator=torch.Generator().manual_seed(7))
    b = sampler(probs, generator=torch.Generator().manual_seed(7))
    c = sampler(probs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.points, c.points)


def test_one_query_per_sample_and_present_class():
    labels = torch.zeros(3, 6, 6, dtype=torch.long)
    labels[0, 1, 1] = 2
    labels[1, 2, 2] = 1
    labels[1, 3, 3] = 3
    sample_index, class_index = foreground_class_queries(labels, 4)
    assert sample_index.tolist() == [0, 1, 1] and class_index.tolist() == [2, 1, 3]
    probs = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float() * 0.9 + 0.025
    prompts = SemiSAMPointSampler(num_positive=1)(probs, generator=torch.Generator().manual_seed(0))
    assert prompts.class_index.tolist() == [2, 1, 3]
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert torch.equal(prompts.points[:, 0], expected)


# ---------------------------------------------------------------------------------------------------- no labels
@pytest.mark.parametrize("fn", [semisam_points, SemiSAMPointSampler.__call__, next_click, foreground_class_queries,
                                prompt_uncertainty, predictive_entropy])
def test_prompt_api_takes_no_label(fn):
    names = {n.lower() for n in inspect.signature(fn).parameters}
    assert not names & LABEL_LIKE


def _sam_branch_prompts(images, probs, hidden_label, seed):
    """Every prompt the SAM branch sends (points and point labels of each decoder call, recorded by FakeSam) and
    its pseudo-label probabilities, with ``hidden_label`` stashed on the labeler and on the model."""
    model = FakeSam(SPACE_3D, radius=4.0)  # small radius: SAM misses part of the object, so clicks follow
    labeler = SamPseudoLabeler(model, mode="point", num_clicks=3, num_positive=2, num_negative=2, negative_band=3)
    labeler.hidden_labels = model.hidden_labels = hidden_label  # where a diagnostics shortcut could stash it
    out = labeler(images, probs, patch_spacing=(1.5, 1.5, 1.5), generator=torch.Generator().manual_seed(seed))
    prompts = [(c["points"], c["labels"]) for c in model.calls]
    to_patch = labeler.mapper((1.5, 1.5, 1.5)).to_model(images, (probs.argmax(1) > 0).unsqueeze(1),
                                                         keep_empty=False).points_to_patch
    return prompts, out.probabilities, to_patch


def same_prompts(a, b):
    return len(a) == len(b) and all(torch.equal(pa, pb) and torch.equal(la, lb) for (pa, la), (pb, lb) in zip(a, b))


def test_hidden_labels_cannot_influence_prompts():
    """The SAM branch's prompts (initial SemiSAM points via ``semisam_points``, then ``next_click`` clicks) are a
    function of (prediction, uncertainty, generator seed) only.

    The API has no label slot (``test_prompt_api_takes_no_label`` and the branch's signature test); this test
    covers what a signature cannot: the hidden label of the unlabeled case is within reach, on the labeler and the
    model, and the image shows the object the prediction missed. Four wildly different hidden labels (the missed
    object alone, the full truth, nothing, everything but the prediction) must give bit-identical prompts and
    pseudo-labels, no positive prompt may land on the missed object, and the same recording must change when the
    prediction or the seed changes, so identical prompts are not a sign of a probe that sees nothing. A sampler
    that mixed a label into its points or used it as the click reference would break the identity.
    """
    probs, core, rim, _ = make_prediction()
    shape = tuple(core.shape)
    missed = ball(shape, (18, 6, 26), 4)  # a true object the prediction does not see
    images = (core | rim | missed).float()[None, None]
    predicted = probs.argmax(1)[0] == 1
    labels = (missed, core | rim | missed, torch.zeros(shape, dtype=torch.bool), ~predicted)
    reference, reference_probs, to_patch = _sam_branch_prompts(images, probs, labels[0][None], seed=1)
    assert len(reference) == 3 and int((reference[-1][1] == 1).sum()) >= 3  # initial points plus clicks
    for label in labels[1:]:
        prompts, pseudo, _ = _sam_branch_prompts(images, probs, label[None], seed=1)
        assert same_prompts(prompts, reference)
        assert torch.equal(pseudo, reference_probs)
    points, point_labels = reference[-1]
    positives = to_patch(points)[0][point_labels[0] == 1].round()
    assert bool(at(predicted, positives).all()) and not bool(at(missed, positives).any())
    # the probe is sensitive to the legitimate inputs
    moved, _, _ = _sam_branch_prompts(images, probs.roll(3, -1), labels[0][None], seed=1)
    reseeded, _, _ = _sam_branch_prompts(images, probs, labels[0][None], seed=2)
    assert not same_prompts(moved, reference) and not same_prompts(reseeded, reference)


# ---------------------------------------------------------------------------------------------------- click loop
def test_next_click_false_negative_gives_positive_click_at_depth():
    shape = (2, 20, 20)
    reference = torch.zeros(shape, dtype=torch.bool)
    reference[:, 2:17, 2:17] = True  # the segmentation model's object
    prompted = reference.clone()
    prompted[0, 2:17, 2:9] = False  # SAM missed a 15 x 7 strip -> false negative
    prompted[1, 0:2, :] = True  # SAM leaks into 2 rows: small false positive ...
    prompted[1, 2:17, 2:17] = False  # ... and misses everything else -> larger false negative
    points, labels = next_click(prompted, reference, generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == [[1], [1]]
    assert points.shape == (2, 1, 2)
    assert points[0, 0, 1].item() == 5.0 and 5 <= points[0, 0, 0].item() <= 13  # centre line of the strip
    assert points[1, 0].tolist() == [9.0, 9.0]


def test_next_click_false_positive_gives_negative_click_and_agreement_pads():
    shape = (2, 16, 16)
    reference = torch.zeros(shape, dtype=torch.bool)
    reference[:, 4:8, 4:8] = True
    prompted = reference.clone()
    prompted[0, 9:15, 9:15] = True  # SAM adds a blob the model does not predict
    points, labels = next_click(prompted, reference)
    assert labels.tolist() == [[0], [-1]]
    assert 11 <= points[0, 0, 0].item() <= 12 and 11 <= points[0, 0, 1].item() <= 12
    assert points[1].abs().sum().item() == 0.0


def test_next_click_ignores_uncertain_and_outside_voxels():
    shape = (1, 16, 16)
    reference = torch.zeros(shape, dtype=torch.bool)
    reference[0, 2:12, 2:12] = True
    prompted = torch.zeros(shape, dtype=torch.bool)
    prompted[0, 13:16, 13:16] = True  # small false positive
    uncertainty = torch.zeros(shape)
    uncertainty[0, 2:12, 2:12] = 0.9  # the big false negative is where the model is unsure
    points, labels = next_click(prompted, reference, uncertainty=uncertainty, uncertainty_threshold=0.5)
    assert labels.tolist() == [[0]] and bool((points[0, 0] >= 13).all())
    region = torch.ones(shape, dtype=torch.bool)
    region[0, 12:, :] = False
    _, labels = next_click(prompted, reference, uncertainty=uncertainty, region=region)
    assert labels.tolist() == [[-1]]
