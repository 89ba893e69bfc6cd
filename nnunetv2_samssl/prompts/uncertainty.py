"""Voxel-wise uncertainty maps computed from a segmentation model's own probabilities.

Everything here reads softmax probabilities only (never labels) and returns one value per voxel, batched
over any number of leading samples. Shapes: probabilities ``(B, K, *spatial)`` with the class axis at
``dim=1`` (a single channel ``K = 1`` is read as the foreground probability of a binary problem).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Tensor = torch.Tensor

__all__ = ["predictive_entropy", "probability_variance", "student_teacher_disagreement", "prompt_uncertainty",
           "UNCERTAINTY_MEASURES"]

UNCERTAINTY_MEASURES = ("entropy", "disagreement", "max")


def _as_distribution(probs: Tensor, dim: int) -> Tensor:
    if probs.shape[dim] == 1:
        return torch.cat([1.0 - probs, probs], dim)
    return probs


def predictive_entropy(probs: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Entropy of the class distribution per voxel, normalised by ``log K`` to ``[0, 1]``.

    Args:
        probs: ``(B, K, *spatial)`` probabilities summing to 1 over ``dim`` (``K = 1``: foreground probability).
    Returns:
        ``(B, *spatial)`` float32; 0 for a one-hot voxel, 1 for the uniform distribution.
    """
    p = _as_distribution(probs.float(), dim)
    num_classes = p.shape[dim]
    entropy = -(p * torch.log(p.clamp_min(eps))).sum(dim)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def probability_variance(maps: Union[Tensor, Sequence[Tensor]], dim: int = 0) -> Tensor:
    """Population variance (divisor M) over M probability maps of the same shape, per element.

    With maps in ``[0, 1]`` the result lies in ``[0, 0.25]``. Used for SemiSAM+'s ``unc`` map (the student's
    map and the SAM map of every click) and for student/teacher variance.

    Args:
        maps: a stacked tensor with the M maps along ``dim`` or a sequence of equally shaped tensors.
    """
    stacked = torch.stack(list(maps), dim) if not torch.is_tensor(maps) else maps
    return stacked.float().var(dim=dim, correction=0)


def student_teacher_disagreement(student: Tensor, teacher: Tensor, dim: int = 1) -> Tensor:
    """Disagreement between two class distributions per voxel: ``0.5 * sum_k (s_k - t_k)^2`` in ``[0, 1]``.

    This is twice the class-summed variance of the two maps, scaled so that two different one-hot
    predictions give 1 and identical predictions give 0.

    Args:
        student, teacher: ``(B, K, *spatial)`` probabilities.
    Returns:
        ``(B, *spatial)`` float32.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s = _as_distribution(student.float(), dim)
    t = _as_distribution(teacher.float(), dim)
    return (0.5 * (s - t).pow(2).sum(dim)).clamp(0.0, 1.0)


def prompt_uncertainty(prompt_probs: Tensor, measure: str = "entropy", student: Optional[Tensor] = None,
                       teacher: Optional[Tensor] = None, dim: int = 1, regions: bool = False) -> Tensor:
    """The uncertainty map that gates prompt selection, in ``[0, 1]`` per voxel.

    One definition for every way pseudo-labels are made (per patch or per whole case): the entropy is that of
    the probabilities the prompts come from, whatever other maps exist; only the measures that name the teacher
    use it.

    Args:
        prompt_probs: ``(B, K, *spatial)`` the prompt source's probabilities (the student's by default).
        measure: ``"entropy"``: normalised entropy of ``prompt_probs``; ``"disagreement"``:
            :func:`student_teacher_disagreement` (needs ``student`` and ``teacher``); ``"max"``: the larger of
            the two.
        student, teacher: ``(B, K, *spatial)`` probabilities, for the measures that compare them.
        regions: the ``K`` channels are independent sigmoid regions (nnU-Net's region-based training): the
            measure of each region's binary distribution, the largest over regions.
    Returns:
        ``(B, *spatial)`` float32.
    """
    if regions:
        def per_region(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x.movedim(dim, 1).reshape(-1, 1, *x.movedim(dim, 1).shape[2:])
        b, r = prompt_probs.shape[0], prompt_probs.shape[dim]
        each = prompt_uncertainty(per_region(prompt_probs), measure, per_region(student), per_region(teacher))
        return each.view(b, r, *each.shape[1:]).amax(1)
    if measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")
    if measure in ("disagreement", "max") and (teacher is None or student is None):
        raise ValueError(f"uncertainty measure {measure!r} needs student and teacher probabilities; pass "
                         "teacher_probs or use measure='entropy'")
    if measure == "entropy":
        return predictive_entropy(prompt_probs, dim)
    disagreement = student_teacher_disagreement(student, teacher, dim)
    if measure == "disagreement":
        return disagreement
    return torch.maximum(predictive_entropy(prompt_probs, dim), disagreement)
