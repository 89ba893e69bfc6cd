"""SAM pseudo-label losses: values, masking of invalid voxels, and gradients that point the right way."""
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_samssl.ssl.sam_losses import (SamPseudoLabelLoss, dice_ce_loss, soft_mse_loss,
                                            uncertainty_weighted_mse_loss)


def setup(seed=0, shape=(2, 3, 6, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g).requires_grad_(True)
    target = torch.softmax(3 * torch.randn(shape, generator=g), 1)
    valid = torch.rand((shape[0], *shape[2:]), generator=g) > 0.3
    uncertainty = 0.25 * torch.rand((shape[0], *shape[2:]), generator=g)
    return logits, target, valid, uncertainty


LOSSES = {
    "soft_mse": lambda l, t, v, u: soft_mse_loss(l, t, v),
    "dice_ce": lambda l, t, v, u: dice_ce_loss(l, t, v),
    "uncertainty_mse": lambda l, t, v, u: uncertainty_weighted_mse_loss(l, t, u, v),
}


def test_soft_mse_value():
    logits, target, valid, _ = setup()
    d = (torch.softmax(logits, 1) - target).pow(2).mean(1)
    assert torch.allclose(soft_mse_loss(logits, target, valid), d[valid].mean())
    assert torch.allclose(soft_mse_loss(logits, target), d.mean())


def test_uncertainty_weighted_value_and_not_a_constant():
    logits, target, valid, u = setup()
    d = (torch.softmax(logits, 1) - target).pow(2).mean(1)
    expected = (d * u)[valid].mean() / (u[valid].mean() + 1e-8) + u[valid].mean()
    value = uncertainty_weighted_mse_loss(logits, target, u, valid)
    assert torch.allclose(value, expected)
    # constant U reduces to the plain MSE plus that constant
    constant = torch.full_like(u, 0.1)
    assert torch.allclose(uncertainty_weighted_mse_loss(logits, target, constant, valid),
                          soft_mse_loss(logits, target, valid) + 0.1, atol=1e-6)
    # the value follows the student (the sum(x)/(sum(x)+eps) normalisation would pin it to ~1)
    better = uncertainty_weighted_mse_loss(torch.log(target + 1e-6), target, u, valid)
    assert better.item() < value.item() - 1e-3
    defective = value.sum() / (value.sum() + 1e-16)
    assert abs(defective.item() - 1.0) < 1e-6
    assert float(torch.autograd.grad(defective, logits)[0].abs().max()) < 1e-6  # ... and kill the gradient


@pytest.mark.parametrize("name", list(LOSSES))
def test_invalid_voxels_do_not_matter(name):
    logits, target, valid, u = setup(1)
    poison = torch.zeros_like(target)
    poison[:, 0] = 1.0
    poisoned = torch.where(valid.unsqueeze(1), target, poison)  # only invalid voxels change
    u_poisoned = u.clone()
    u_poisoned[~valid] = 0.25
    a = LOSSES[name](logits, target, valid, u)
    b = LOSSES[name](logits, poisoned, valid, u_poisoned)
    assert torch.allclose(a, b)
    grad = torch.autograd.grad(a, logits)[0]
    assert float(grad.abs().sum(1)[~valid].max()) == 0.0  # no gradient through invalid voxels
    assert float(grad.abs().sum()) > 0.0


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_points_towards_the_pseudo_label(name):
    logits, target, valid, u = setup(2)
    hard = target.argmax(1)
    loss = LOSSES[name](logits, target, valid, u)
    grad = torch.autograd.grad(loss, logits)[0]
    assert float(grad.abs().sum()) > 0.0
    # a step against the gradient lowers the loss and raises the pseudo-label class probability
    stepped = (logits - 5.0 * grad / grad.abs().max()).detach()
    assert LOSSES[name](stepped, target, valid, u).item() < loss.item()
    before = torch.softmax(logits.detach(), 1).gather(1, hard.unsqueeze(1))[:, 0][valid].mean()
    after = torch.softmax(stepped, 1).gather(1, hard.unsqueeze(1))[:, 0][valid].mean()
    assert float(after) > float(before)
    # per voxel: the logit of the pseudo-label class is pushed up wherever the student is far below it
    p = torch.softmax(logits.detach(), 1)
    far = valid & (p.gather(1, hard.unsqueeze(1))[:, 0] < target.gather(1, hard.unsqueeze(1))[:, 0] - 0.3)
    target_grad = grad.gather(1, hard.unsqueeze(1))[:, 0]
    assert bool(far.any()) and float((target_grad[far] < 0).float().mean()) > 0.95


def test_uncertainty_weights_the_gradient():
    logits = torch.zeros(1, 2, 2, 1, requires_grad=True)
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1)
    u = torch.tensor([0.2, 0.05]).view(1, 2, 1)
    grad = torch.autograd.grad(uncertainty_weighted_mse_loss(logits, target, u), logits)[0]
    ratio = grad[0, 1, 0, 0] / grad[0, 1, 1, 0]
    assert torch.allclose(ratio, torch.tensor(4.0))  # weight proportional to U
    assert float(grad[0, 1].max()) < 0  # foreground logit pushed up at both voxels


def test_no_valid_voxel_gives_a_differentiable_zero():
    logits, target, valid, u = setup(3)
    nothing = torch.zeros_like(valid)
    for name, fn in LOSSES.items():
        value = fn(logits, target, nothing, u)
        assert value.item() == 0.0, name
        grad, = torch.autograd.grad(value, logits)
        assert float(grad.abs().sum()) == 0.0


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_dice_ce_matches_manual_computation(batch_dice, masked):
    """``dice_ce_loss`` against nnU-Net's own ``DC_and_CE_loss`` built as ``nnUNetTrainer._build_loss`` builds it
    for label (non-region) datasets: ``MemoryEfficientSoftDiceLoss`` with ``smooth=1e-5, do_bg=False`` and the
    configuration's ``batch_dice``, plain CE, weights 1 / 1 (``ddp=False``: single process). Target = the hard
    pseudo-label ``argmax``. The one deliberate difference: nnU-Net returns ``CE - Dice``, we return
    ``CE + (1 - Dice)``, so the values differ by exactly ``weight_dice * 1`` and the gradients are identical.
    Invalid voxels map onto nnU-Net's ignore label (``K``: excluded from CE and, through ``loss_mask``, from Dice).
    """
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, target, valid, _ = setup(4)
    num_classes = logits.shape[1]
    hard = target.argmax(1, keepdim=True)
    if not masked:
        valid = torch.ones_like(valid)
    nnunet_target = torch.where(valid.unsqueeze(1), hard, num_classes) if masked else hard
    reference_loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                    weight_ce=1, weight_dice=1, ignore_label=num_classes if masked else None,
                                    dice_class=MemoryEfficientSoftDiceLoss)
    reference = reference_loss(logits, nnunet_target.float()) + 1.0  # nnU-Net: CE - Dice; ours: CE + 1 - Dice
    ours = dice_ce_loss(logits, target, valid if masked else None, batch_dice=batch_dice)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_reference, = torch.autograd.grad(reference, logits)
    assert torch.allclose(grad_ours, grad_reference, rtol=1e-5, atol=1e-8)
    assert float(grad_ours.abs().max()) > 0.0


def test_module_forms_and_deep_supervision_lists():
    logits, target, valid, u = setup(5)
    loss = SamPseudoLabelLoss("soft_mse")
    assert torch.allclose(loss(logits, target, valid), soft_mse_loss(logits, target, valid))
    half = [x[..., ::2, ::2, ::2] for x in (logits, target)] + [valid[..., ::2, ::2, ::2], u[..., ::2, ::2, ::2]]
    ds = SamPseudoLabelLoss("uncertainty_mse", deep_supervision_weights=[1.0, 0.5])
    value = ds([logits, half[0]], [target, half[1]], [valid, half[2]], [u, half[3]])
    expected = (uncertainty_weighted_mse_loss(logits, target, u, valid) * 1.0
                + uncertainty_weighted_mse_loss(half[0], half[1], half[3], half[2]) * 0.5) / 1.5
    assert torch.allclose(value, expected)
    full_only = SamPseudoLabelLoss("dice_ce")([logits, half[0]], [target, half[1]], [valid, half[2]])
    assert torch.allclose(full_only, dice_ce_loss(logits, target, valid))
    with pytest.raises(ValueError, match="uncertainty"):
        SamPseudoLabelLoss("uncertainty_mse")(logits, target, valid)
    with pytest.raises(ValueError, match="form"):
        SamPseudoLabelLoss("sum_normalised")


def test_patch_normalization_is_the_anchors_whole_patch_mean():
    """The anchors average the SAM loss over the whole patch: uncovered voxels count 0, so the value is the
    covered-voxel mean times the covered fraction (the 'valid' form divides that fraction out)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    target = F.one_hot(torch.randint(0, 3, (2, 4, 5, 6)), 3).movedim(-1, 1).float()
    valid = torch.rand(2, 4, 5, 6) < 0.3
    squared = (torch.softmax(logits, 1) - target).pow(2).mean(1)
    anchors = (squared * valid).sum() / squared.numel()  # torch.mean((p - sam)^2) with 0 where not covered
    assert soft_mse_loss(logits, target, valid, normalization="patch") == pytest.approx(float(anchors), rel=1e-6)
    covered = squared[valid].mean()
    assert soft_mse_loss(logits, target, valid) == pytest.approx(float(covered), rel=1e-6)
    fraction = float(valid.float().mean())
    assert float(soft_mse_loss(logits, target, valid, normalization="patch")) == pytest.approx(
        fraction * float(soft_mse_loss(logits, target, valid)), rel=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        soft_mse_loss(logits, target, valid, normalization="voxel")
