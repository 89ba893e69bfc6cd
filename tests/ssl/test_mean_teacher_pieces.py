import math

import pytest
import torch
from torch import nn

from nnunetv2_samssl.ssl.consistency import (CONSISTENCY_LOSSES, deep_supervision_consistency, softmax_mse)
from nnunetv2_samssl.ssl.ema import EMATeacher
from nnunetv2_samssl.ssl.ramps import sigmoid_rampdown, sigmoid_rampup


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(1000, 100) == 1.0
    assert sigmoid_rampup(-5, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(3, 0) == 1.0
    # SemiSAM's ramp-down: strong early, vanishing at the end
    assert sigmoid_rampdown(0, 100, 100) == 1.0
    assert sigmoid_rampdown(100, 100, 100) == pytest.approx(math.exp(-5))


def test_ema_update_matches_formula_and_skips_gradients():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True), nn.BatchNorm3d(2))
    teacher = EMATeacher(student, max_decay=0.99)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[2].running_mean.add_(2.0)
        student[2].num_batches_tracked.add_(7)
    alpha = teacher.update(student, step=9)
    assert alpha == pytest.approx(0.9)  # min(1 - 1/10, 0.99)
    for k, v in student.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(teacher.state_dict()[k], alpha * before[k] + (1 - alpha) * v)
        else:
            assert torch.equal(teacher.state_dict()[k], v)
    assert teacher.update(student, step=10 ** 6) == 0.99


def test_first_update_copies_the_student():
    student = nn.Linear(3, 2)
    teacher = EMATeacher(student, 0.99)
    with torch.no_grad():
        student.weight.mul_(3)
    teacher.update(student, step=0)  # alpha = 0
    torch.testing.assert_close(teacher.module.weight, student.weight)


@pytest.mark.parametrize("name", sorted(CONSISTENCY_LOSSES))
def test_consistency_losses_zero_at_agreement_and_pull_student_to_teacher(name):
    fn = CONSISTENCY_LOSSES[name]
    torch.manual_seed(1)
    teacher = torch.randn(2, 3, 4, 4, 4) * 3
    student = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    loss = fn(student, teacher)
    loss.backward()
    assert student.grad.abs().sum() > 0
    # a small step against the gradient lowers the loss
    with torch.no_grad():
        stepped = student - 0.5 * student.grad / student.grad.norm()
    assert fn(stepped, teacher) < loss
    if name not in ("cross_entropy", "hard_cross_entropy"):  # CE forms are minimal, not zero, at agreement
        assert fn(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    else:  # ... but lower at agreement than with the classes permuted
        assert fn(teacher.clone(), teacher) < fn(teacher.roll(1, dims=1), teacher)


def test_teacher_side_gets_no_gradient():
    t = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    s = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    softmax_mse(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_deep_supervision_consistency_weights():
    torch.manual_seed(0)
    s = [torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4)]
    t = [torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4)]
    full = deep_supervision_consistency(softmax_mse, s, t, None)
    assert full == softmax_mse(s[0], t[0])
    both = deep_supervision_consistency(softmax_mse, s, t, [2.0, 2.0])
    torch.testing.assert_close(both, 0.5 * (softmax_mse(s[0], t[0]) + softmax_mse(s[1], t[1])))
