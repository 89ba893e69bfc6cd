"""The strong student view (photometric, voxel-aligned) and hard / confidence-selected consistency targets."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from nnunetv2_samssl.ssl.consistency import consistency_loss, teacher_confidence
from nnunetv2_samssl.ssl.views import StrongPhotometricView, gaussian_blur, student_view
from trainer_helpers import make_trainer, seed_everything


def _patch(shape=(2, 2, 12, 14, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 1


@pytest.mark.parametrize("shape", [(2, 2, 12, 14, 10), (3, 1, 20, 24)])
def test_strong_view_changes_intensities_and_keeps_each_channels_mean_and_std(shape):
    x = _patch(shape)
    y = StrongPhotometricView()(x, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    dims = tuple(range(2, x.dim()))
    assert torch.allclose(y.mean(dims), x.mean(dims), atol=1e-4)
    assert torch.allclose(y.std(dims), x.std(dims), atol=1e-4)
    assert (y - x).abs().mean() > 0.05 * x.std()
    # strength 0 is the identity; the same generator state gives the same view
    assert torch.equal(StrongPhotometricView(strength=0.0)(x), x)
    again = StrongPhotometricView()(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, again)


def test_strong_view_moves_no_voxel():
    """Gamma and bias keep each voxel's intensity order locally; blur keeps a bright point where it is."""
    x = _patch((1, 1, 16, 16, 16)).abs()
    curve_only = StrongPhotometricView(p_gamma=1.0, p_bias=0.0, p_blur=0.0, p_noise=0.0)
    y = curve_only(x, generator=torch.Generator().manual_seed(3))
    # a monotone curve: the voxel order is unchanged
    assert torch.equal(torch.argsort(x.flatten()), torch.argsort(y.flatten()))
    point = torch.zeros(1, 1, 15, 15, 15)
    point[0, 0, 4, 9, 6] = 10.0
    blurred = StrongPhotometricView(p_gamma=0.0, p_bias=0.0, p_blur=1.0, p_noise=0.0)(
        point, generator=torch.Generator().manual_seed(0))
    assert np.unravel_index(int(blurred.argmax()), blurred.shape) == (0, 0, 4, 9, 6)


def test_strength_scales_the_perturbation():
    x = _patch((4, 1, 16, 16, 16))
    dist = [float((StrongPhotometricView(strength=s)(x, generator=torch.Generator().manual_seed(2)) - x).abs().mean())
            for s in (0.25, 1.0)]
    assert dist[0] < dist[1]


def test_gaussian_blur_matches_scipy_per_channel_sigma():
    x = _patch((2, 2, 11, 13, 9), seed=4)
    sigma = torch.tensor([[0.0, 0.7], [1.3, 0.4]])
    y = gaussian_blur(x, sigma)
    for b in range(2):
        for c in range(2):
            s = float(sigma[b, c])
            ref = x[b, c].numpy() if s == 0 else ndimage.gaussian_filter(
                x[b, c].numpy(), s, mode="nearest", truncate=3 * 1.3 / s + 1e-9)
            np.testing.assert_allclose(y[b, c].numpy(), ref, atol=1e-4)


def test_student_view_setting():
    assert student_view("weak", 1.0) is None
    assert student_view("strong", 0.5) == StrongPhotometricView(strength=0.5)
    with pytest.raises(ValueError, match="student_view"):
        student_view("medium", 1.0)


# ---------------------------------------------------------------------------------------------- hard targets
def _logits(seed=0, shape=(2, 3, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


def test_hard_cross_entropy_is_cross_entropy_against_the_teachers_argmax():
    s, t = _logits(0), _logits(1)
    expected = F.cross_entropy(s, t.argmax(1))
    assert torch.allclose(consistency_loss("hard_cross_entropy", False)(s, t), expected)
    # the voxel form averages to the same number
    mask = torch.ones(s.shape[:1] + s.shape[2:], dtype=torch.bool)
    assert torch.allclose(consistency_loss("hard_cross_entropy", False)(s, t, mask=mask), expected)


def test_regions_hard_targets_are_the_teachers_thresholded_regions():
    s, t = _logits(2), _logits(3)
    expected = F.binary_cross_entropy_with_logits(s, (t > 0).float())
    assert torch.allclose(consistency_loss("hard_cross_entropy", True)(s, t), expected)


@pytest.mark.parametrize("form", ["hard_cross_entropy", "softmax_mse", "cross_entropy"])
def test_threshold_keeps_only_confident_voxels_and_counts_the_others_as_zero(form):
    s, t = _logits(4), _logits(5)
    fn = consistency_loss(form, False, threshold=0.7)
    confident = torch.softmax(t, 1).amax(1) >= 0.7
    assert 0 < confident.float().mean() < 1  # the test data has both kinds
    per_voxel = consistency_loss(form, False).voxel(s, t)
    expected = (per_voxel * confident).sum() / confident.numel()
    assert torch.allclose(fn(s, t), expected, atol=1e-6)
    assert float(fn.last_confident_fraction) == pytest.approx(float(confident.float().mean()))
    # only confident voxels matter: changing the student elsewhere leaves the loss unchanged
    s2 = torch.where(confident.unsqueeze(1), s, torch.randn_like(s))
    assert torch.allclose(fn(s2, t), fn(s, t), atol=1e-6)
    # with a mask: the mean over the mask's voxels
    mask = torch.zeros_like(confident)
    mask[0] = True
    expected = (per_voxel * confident * mask).sum() / mask.sum()
    assert torch.allclose(fn(s, t, mask=mask), expected, atol=1e-6)


def test_threshold_zero_is_every_voxel_and_region_confidence_is_the_least_confident_region():
    s, t = _logits(6), _logits(7)
    assert torch.equal(consistency_loss("hard_cross_entropy", False, 0.0)(s, t),
                       consistency_loss("hard_cross_entropy", False)(s, t))
    p = torch.sigmoid(t)
    assert torch.allclose(teacher_confidence(t, True), torch.maximum(p, 1 - p).min(1).values)
    with pytest.raises(ValueError, match="threshold"):
        consistency_loss("softmax_mse", False, 1.5)


# ---------------------------------------------------------------------------------- hard targets, nnU-Net's loss
def _nnunet_losses(regions=False):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    dice = {"batch_dice": True, "smooth": 1e-5, "ddp": False}
    if regions:
        return DC_and_BCE_loss({}, {**dice, "do_bg": True}, dice_class=MemoryEfficientSoftDiceLoss)
    return DC_and_CE_loss({**dice, "do_bg": False}, {}, dice_class=MemoryEfficientSoftDiceLoss)


def test_hard_dice_ce_is_nnunets_loss_on_the_teachers_argmax():
    s, t = _logits(8), _logits(9)
    fn = consistency_loss("hard_dice_ce", False, batch_dice=True)
    expected = _nnunet_losses()(s, t.argmax(1, keepdim=True))
    assert torch.allclose(fn(s, t), expected, atol=1e-6)
    # regions: nnU-Net's Dice + BCE on the teacher's regions
    fn = consistency_loss("hard_dice_ce", True, batch_dice=True)
    assert torch.allclose(fn(s, t), _nnunet_losses(True)(s, (t > 0).float()), atol=1e-6)


def test_hard_dice_ce_learns_only_from_confident_voxels_and_weighs_a_small_class_up():
    s, t = _logits(10), _logits(11)
    fn = consistency_loss("hard_dice_ce", False, threshold=0.7, batch_dice=True)
    confident = torch.softmax(t, 1).amax(1) >= 0.7
    assert 0 < confident.float().mean() < 1
    s = s.requires_grad_(True)
    fn(s, t).backward()
    grad = s.grad.abs().sum(1)
    assert float(grad[~confident].abs().max()) == 0.0 and float(grad[confident].min()) > 0
    assert float(fn.last_confident_fraction) == pytest.approx(float(confident.float().mean()))
    # outside a mask nothing counts either
    mask = torch.zeros_like(confident)
    mask[0] = True
    s.grad = None
    fn(s, t, mask=mask).backward()
    assert float(s.grad[1].abs().max()) == 0.0
    # a class of 4 voxels in 480: per voxel, its Dice gives the small class a larger gradient than the rest of the
    # patch gets (Dice + CE: 2.9 x); cross-entropy alone gives both the same
    t = torch.zeros(1, 2, 8, 6, 10)
    t[:, 0] = 5.0
    t[0, 1, :2, :2, :1] = 10.0
    student = torch.zeros_like(t, requires_grad=True)
    consistency_loss("hard_dice_ce", False, batch_dice=True)(student, t).backward()
    small = t[0, 1] > 5
    dice_ratio = float(student.grad[0, 1][small].abs().mean() / student.grad[0, 1][~small].abs().mean())
    student.grad = None
    consistency_loss("hard_cross_entropy", False)(student, t).backward()
    ce_ratio = float(student.grad[0, 1][small].abs().mean() / student.grad[0, 1][~small].abs().mean())
    assert ce_ratio == pytest.approx(1.0, rel=1e-3) and dice_ratio > 2.5


# ---------------------------------------------------------------------------------------------- in the trainer
@pytest.mark.parametrize("form", ["hard_cross_entropy", "hard_dice_ce"])
def test_student_sees_the_strong_view_and_the_teacher_the_weak_patch(nnunet_env, form):
    from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, student_view="strong", teacher_noise_std=0.0,
                           consistency_loss=form, consistency_threshold=0.5)
    trainer.on_train_start()
    seen = {}
    student_forward, teacher_forward = trainer.network.forward, trainer.teacher.module.forward
    trainer.network.forward = lambda x, *a, **k: (seen.__setitem__("student", x.clone()),
                                                  student_forward(x, *a, **k))[1]
    trainer.teacher.module.forward = lambda x, *a, **k: (seen.__setitem__("teacher", x.clone()),
                                                         teacher_forward(x, *a, **k))[1]
    batch = next(trainer.dataloader_train)
    unlabeled = trainer.next_unlabeled_batch()
    trainer.next_unlabeled_batch = lambda: unlabeled
    out = trainer.train_step(batch)
    b_l = batch["data"].shape[0]
    assert torch.equal(seen["teacher"], unlabeled.images)
    assert torch.equal(seen["student"][:b_l], batch["data"])  # labeled patches are not perturbed
    strong = seen["student"][b_l:]
    assert strong.shape == unlabeled.images.shape and not torch.equal(strong, unlabeled.images)
    assert 0.0 <= float(out["consistency_confident"]) <= 1.0
    trainer.on_train_end()
