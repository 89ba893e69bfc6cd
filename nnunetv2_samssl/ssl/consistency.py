"""Consistency losses between a student's logits and a (detached) teacher's logits.

All take logits ``(B, K, *spatial)`` from both networks and return a scalar; the teacher side is
always detached. Region-based outputs (independent sigmoids) use the sigmoid counterpart of each form
(:func:`consistency_loss`). Deep-supervision lists are handled by :func:`deep_supervision_consistency`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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


def hard_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax (hard pseudo-labels, FixMatch's form)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(1))


CONSISTENCY_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "softmax_mse": softmax_mse,
    "softmax_mse_halved": softmax_mse_halved,
    "softmax_kl": softmax_kl,
    "cross_entropy": soft_cross_entropy,
    "hard_cross_entropy": hard_cross_entropy,
}


# region-based training: every channel is an independent sigmoid region, so each form compares the per-region
# Bernoulli distributions (p, 1 - p) instead of one softmax over channels
def sigmoid_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between per-region sigmoid probabilities."""
    return F.mse_loss(torch.sigmoid(student_logits.float()), torch.sigmoid(teacher_logits.detach().float()))


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Binary KL(teacher || student) per region and voxel, averaged over both."""
    s, t = student_logits.float(), teacher_logits.detach().float()
    p_t = torch.sigmoid(t)
    return (p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))).mean()


def sigmoid_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the student's regions against the teacher's soft region probabilities."""
    return F.binary_cross_entropy_with_logits(student_logits.float(), torch.sigmoid(teacher_logits.detach().float()))


REGION_CONSISTENCY_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "softmax_mse": sigmoid_mse,
    "softmax_mse_halved": lambda s, t: 0.5 * sigmoid_mse(s, t),
    "softmax_kl": sigmoid_kl,
    "cross_entropy": sigmoid_cross_entropy,
    "hard_cross_entropy": lambda s, t: F.binary_cross_entropy_with_logits(s.float(), (t.detach() > 0).float()),
}


# the same forms per voxel, (B, *spatial): their mean over all voxels is the scalar form above
def _softmax_pair(s: torch.Tensor, t: torch.Tensor):
    return torch.log_softmax(s.float(), 1), torch.log_softmax(t.detach().float(), 1)


def _sigmoid_bce(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(s.float(), torch.sigmoid(t.detach().float()), reduction="none")


VOXEL_FORMS: Dict[Tuple[str, bool], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ("softmax_mse", False): lambda s, t: (torch.softmax(s.float(), 1) - torch.softmax(t.detach().float(), 1)
                                          ).pow(2).mean(1),
    ("softmax_kl", False): lambda s, t: (lambda ls, lt: (lt.exp() * (lt - ls)).sum(1))(*_softmax_pair(s, t)),
    ("cross_entropy", False): lambda s, t: (lambda ls, lt: -(lt.exp() * ls).sum(1))(*_softmax_pair(s, t)),
    ("softmax_mse", True): lambda s, t: (torch.sigmoid(s.float()) - torch.sigmoid(t.detach().float())
                                         ).pow(2).mean(1),
    ("softmax_kl", True): lambda s, t: (_sigmoid_bce(s, t) - _sigmoid_bce(t.detach(), t)).mean(1),
    ("cross_entropy", True): lambda s, t: _sigmoid_bce(s, t).mean(1),
    ("hard_cross_entropy", False): lambda s, t: F.cross_entropy(s.float(), t.detach().argmax(1), reduction="none"),
    ("hard_cross_entropy", True): lambda s, t: F.binary_cross_entropy_with_logits(
        s.float(), (t.detach() > 0).float(), reduction="none").mean(1),
}


def teacher_confidence(teacher_logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """``(B, *spatial)``: the teacher's probability of its most likely class (softmax), or for regions the least
    confident region's ``max(p, 1 - p)``."""
    t = teacher_logits.detach().float()
    if regions:
        p = torch.sigmoid(t)
        return torch.maximum(p, 1 - p).amin(1)
    return torch.softmax(t, 1).amax(1)


def _checked_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the consistency threshold must be in [0, 1], got {threshold}")
    return float(threshold)


class ConsistencyForm:
    """A ``consistency_loss`` form: ``form(student_logits, teacher_logits)`` is the mean over all voxels,
    ``form(..., mask=m)`` the mean over the voxels where ``m`` ``(B, *spatial)`` is true (a graph-connected zero
    when none is).

    With ``threshold`` > 0 only voxels where the teacher is confident (:func:`teacher_confidence` at least
    ``threshold``) contribute; the others count as zero in the mean, as in FixMatch, so the term shrinks while
    the teacher is unsure. :attr:`last_confident_fraction` holds the fraction of voxels (within the mask) that
    passed at the last call."""

    def __init__(self, name: str, regions: bool, threshold: float = 0.0):
        table = REGION_CONSISTENCY_LOSSES if regions else CONSISTENCY_LOSSES
        if name not in table:
            raise ValueError(f"consistency_loss must be one of {sorted(table)}, got {name!r}")
        self.name, self.regions, self.threshold = name, regions, _checked_threshold(threshold)
        self.last_confident_fraction: Optional[torch.Tensor] = None
        self.scalar = table[name]
        halved = name == "softmax_mse_halved"
        self.voxel = VOXEL_FORMS[("softmax_mse" if halved else name, regions)]
        self.factor = 0.5 if halved else 1.0

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None and self.threshold == 0:
            return self.scalar(student_logits, teacher_logits)
        weight = torch.ones(student_logits.shape[:1] + student_logits.shape[2:], device=student_logits.device) \
            if mask is None else mask.to(torch.float32)
        values = self.voxel(student_logits, teacher_logits)
        if self.threshold > 0:
            confident = (teacher_confidence(teacher_logits, self.regions) >= self.threshold).to(torch.float32)
            self.last_confident_fraction = ((confident * weight).sum() / weight.sum().clamp_min(1.0)).detach()
            values = values * confident
        return self.factor * (values * weight).sum() / weight.sum().clamp_min(1.0)


class PseudoLabelDiceCE:
    """``hard_dice_ce``: the teacher's argmax (regions: its thresholded sigmoids) as a label map for nnU-Net's own
    supervised loss (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, as nnU-Net's trainer builds it; regions:
    its sigmoid Dice plus binary cross-entropy, as ``DC_and_BCE_loss``), with the voxels below ``threshold`` or
    outside the mask as nnU-Net's ignore label. Unlike the voxel-wise forms its soft Dice weighs each class by its
    own size, so the few confident voxels of a small structure count as much as the confident background.

    The Dice is per rank (``ddp=False``): the term is a per-rank unlabeled loss like the other forms. Where no voxel
    passes, the Dice of an empty target and prediction is constant and no gradient flows."""

    IGNORE = -100

    def __init__(self, regions: bool, threshold: float = 0.0, batch_dice: bool = False):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        self.name, self.regions, self.threshold = "hard_dice_ce", regions, _checked_threshold(threshold)
        self.last_confident_fraction: Optional[torch.Tensor] = None
        dice = {"batch_dice": batch_dice, "smooth": 1e-5, "ddp": False}
        if regions:  # nnU-Net's region Dice; the BCE averaged over kept voxels and regions (DC_and_BCE_loss with
            # an ignore label sums it over the regions instead, a scale that would jump with the threshold)
            self.dice = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, **dice, do_bg=True)
        else:  # ignored voxels get cross-entropy's own ignore index
            self.loss = DC_and_CE_loss({**dice, "do_bg": False}, {}, ignore_label=self.IGNORE,
                                       dice_class=MemoryEfficientSoftDiceLoss)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = teacher_logits.detach()
        keep = torch.ones(t.shape[:1] + t.shape[2:], dtype=torch.bool, device=t.device) if mask is None \
            else mask.to(torch.bool)
        if self.threshold > 0:
            confident = teacher_confidence(t, self.regions) >= self.threshold
            self.last_confident_fraction = ((confident & keep).sum() / keep.sum().clamp_min(1)).detach().float()
            keep = keep & confident
        if self.regions:
            target, kept = (t > 0).float(), keep[:, None]
            bce = F.binary_cross_entropy_with_logits(student_logits.float(), target, reduction="none")
            bce = (bce * kept).sum() / (kept.sum() * t.shape[1]).clamp_min(1)
            return bce + self.dice(student_logits, target, loss_mask=kept)
        labels = t.argmax(1)
        target = torch.where(keep, labels, torch.full_like(labels, self.IGNORE))[:, None]
        return self.loss(student_logits, target)


def consistency_loss(name: str, regions: bool, threshold: float = 0.0, batch_dice: bool = False):
    """The consistency form ``name`` (a ``consistency_loss`` setting) for label- or region-based outputs, on the
    voxels where the teacher's confidence reaches ``threshold`` (0: all); ``batch_dice`` (the configuration's,
    as nnU-Net's supervised loss) only matters for ``hard_dice_ce``."""
    if name == "hard_dice_ce":
        return PseudoLabelDiceCE(regions, threshold, batch_dice)
    return ConsistencyForm(name, regions, threshold)


Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def deep_supervision_consistency(loss_fn: Callable[..., torch.Tensor],
                                 student: Outputs, teacher: Outputs,
                                 weights: Optional[Sequence[float]] = None,
                                 masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Applies ``loss_fn`` to a single output or to each deep-supervision scale.

    Args:
        student, teacher: a tensor, or lists of tensors ordered from full resolution down (nnU-Net's order).
        weights: per-scale weights (need not sum to 1; they are normalised); ``None`` uses the full
            resolution output only.
        masks: optional voxel masks ``(B, *scale)`` per scale (a :class:`ConsistencyForm` averages over them).
    """
    def one(i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(s, t) if masks is None else loss_fn(s, t, mask=masks[i])

    if isinstance(student, torch.Tensor):
        return one(0, student, teacher)
    if weights is None:
        return one(0, student[0], teacher[0])
    total = float(sum(weights))
    terms: List[torch.Tensor] = [w / total * one(i, s, t)
                                 for i, (s, t, w) in enumerate(zip(student, teacher, weights)) if w != 0]
    return torch.stack(terms).sum()
