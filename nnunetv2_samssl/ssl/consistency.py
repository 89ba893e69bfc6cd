"""Consistency losses between a student's logits and a (detached) teacher's logits.

All take logits ``(B, K, *spatial)`` from both networks and return a scalar; the teacher side is
always detached. Deep-supervision lists are handled by :func:`deep_supervision_consistency`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between softmax probabilities (the anchors' consistency loss)."""
    p_s = torch.softmax(student_logits.float(), 1)
    p_t = torch.softmax(teacher_logits.detach().float(), 1)
    return F.mse_loss(p_s, p_t)


def softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per voxel, averaged over voxels."""
    log_p_s = torch.log_softmax(student_logits.float(), 1)
    log_p_t = torch.log_softmax(teacher_logits.detach().float(), 1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's soft probabilities."""
    log_p_s = torch.log_softmax(student_logits.float(), 1)
    p_t = torch.softmax(teacher_logits.detach().float(), 1)
    return -(p_t * log_p_s).sum(1).mean()


def softmax_mse_halved(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``sum((p_s - p_t)^2) / (2 numel)``: half the softmax MSE, the consistency term of the original SemiSAM code."""
    return 0.5 * softmax_mse(student_logits, teacher_logits)


CONSISTENCY_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "softmax_mse": softmax_mse,
    "softmax_mse_halved": softmax_mse_halved,
    "softmax_kl": softmax_kl,
    "cross_entropy": soft_cross_entropy,
}

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def deep_supervision_consistency(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                 student: Outputs, teacher: Outputs,
                                 weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Applies ``loss_fn`` to a single output or to each deep-supervision scale.

    Args:
        student, teacher: a tensor, or lists of tensors ordered from full resolution down (nnU-Net's order).
        weights: per-scale weights (need not sum to 1; they are normalised); ``None`` uses the full
            resolution output only.
    """
    if isinstance(student, torch.Tensor):
        return loss_fn(student, teacher)
    if weights is None:
        return loss_fn(student[0], teacher[0])
    total = float(sum(weights))
    terms: List[torch.Tensor] = [w / total * loss_fn(s, t) for s, t, w in zip(student, teacher, weights) if w != 0]
    return torch.stack(terms).sum()
