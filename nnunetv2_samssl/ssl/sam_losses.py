"""Losses between the student's logits and SAM pseudo-labels on unlabeled patches.

All take the student's logits ``(B, K, *spatial)``, the SAM pseudo-label probabilities ``(B, K, *spatial)``
(detached here), and a validity mask ``(B, *spatial)`` (bool, voxels SAM covered; ``None`` for all): invalid
voxels contribute neither to the value nor to the gradient. With no valid voxel at all the loss is a zero that
still belongs to the graph, so ``backward()`` works and leaves zero gradients.

Forms:

* ``soft_mse``: mean squared error between the student's softmax and the SAM probabilities (SemiSAM's
  consistency form), averaged over classes and valid voxels.
* ``dice_ce``: cross-entropy plus soft Dice against the hard pseudo-label ``argmax`` (nnU-Net's loss form).
* ``uncertainty_mse``: SemiSAM+'s uncertainty-weighted form
  ``mean(d * U) / (mean(U) + eps) + mean(U)`` with ``d`` the per-voxel squared softmax difference and ``U`` the
  voxel-wise ``unc`` map, means over valid voxels. ``U`` is treated as a constant (detached), so ``mean(U)``
  shifts the value but carries no gradient; the gradient comes from the weighted term, i.e. the MSE with each
  voxel weighted by ``U / mean(U)``. The public code's extra normalisation ``sum(x) / (sum(x) + eps)`` is
  deliberately absent: it is ~1 for any positive ``x`` and removes the gradient.

Region-based training (``activation="sigmoid"``): the channels are independent regions, the student's
probabilities are per-channel sigmoids, ``dice_ce`` becomes binary cross-entropy plus soft Dice on every region
against ``target > 0.5`` (nnU-Net's ``DC_and_BCE_loss`` form), and the MSE forms compare sigmoids.

Deep supervision: :class:`SamPseudoLabelLoss` accepts lists (full resolution first, nnU-Net's order) for every
argument, e.g. from :func:`nnunetv2_samssl.sam.space.downsample_to_scales`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = ["soft_mse_loss", "dice_ce_loss", "uncertainty_weighted_mse_loss", "SamPseudoLabelLoss",
           "SAM_LOSS_FORMS"]

SAM_LOSS_FORMS = ("soft_mse", "dice_ce", "uncertainty_mse")


def _check(student_logits: Tensor, target_probs: Tensor, valid: Optional[Tensor]) -> Tensor:
    if student_logits.shape != target_probs.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and target_probs "
                         f"{tuple(target_probs.shape)} must both be (B, K, *spatial)")
    spatial_shape = (student_logits.shape[0], *student_logits.shape[2:])
    if valid is None:
        return torch.ones(spatial_shape, dtype=torch.bool, device=student_logits.device)
    if tuple(valid.shape) != spatial_shape:
        raise ValueError(f"valid must be (B, *spatial) = {spatial_shape}, got {tuple(valid.shape)}")
    return valid.bool()


NORMALIZATIONS = ("patch", "valid")
ACTIVATIONS = ("softmax", "sigmoid")


def _activate(logits: Tensor, activation: str) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return torch.sigmoid(logits.float()) if activation == "sigmoid" else torch.softmax(logits.float(), 1)


def _masked_mean(values: Tensor, valid: Tensor, normalization: str = "valid") -> Tensor:
    """Mean of ``values (B, *spatial)`` where invalid voxels count 0: divided by the number of ``valid`` voxels
    (``"valid"``) or by all voxels of the patch (``"patch"``, the anchors' form: the loss then scales with the
    covered fraction). A graph-connected zero when none is valid."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    weight = valid.to(values.dtype)
    count = weight.sum().clamp_min(1.0) if normalization == "valid" else float(weight.numel())
    return (values * weight).sum() / count


def _squared_softmax_difference(student_logits: Tensor, target_probs: Tensor, activation: str = "softmax") -> Tensor:
    """``(B, *spatial)`` mean over channels of ``(softmax(student) - target)^2`` (sigmoid for regions)."""
    probs = _activate(student_logits, activation)
    return (probs - target_probs.detach().float()).pow(2).mean(1)


def soft_mse_loss(student_logits: Tensor, target_probs: Tensor, valid: Optional[Tensor] = None,
                  normalization: str = "valid", activation: str = "softmax") -> Tensor:
    """Softmax (sigmoid) MSE to the SAM probabilities over valid voxels (see module docstring), averaged over the
    valid voxels or the whole patch (``normalization``). Returns a scalar."""
    valid = _check(student_logits, target_probs, valid)
    return _masked_mean(_squared_softmax_difference(student_logits, target_probs, activation), valid, normalization)


def dice_ce_loss(student_logits: Tensor, target_probs: Tensor, valid: Optional[Tensor] = None, *,
                 weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True,
                 include_background: bool = False, smooth: float = 1e-5, normalization: str = "valid",
                 activation: str = "softmax") -> Tensor:
    """Cross-entropy + soft Dice against the hard pseudo-label ``argmax(target_probs)`` over valid voxels.

    Args:
        normalization: the cross-entropy is averaged over the valid voxels or the whole patch (Dice is a ratio
            of valid-voxel sums either way).
        batch_dice: pool Dice statistics over the batch (nnU-Net's ``batch_dice``) or per sample.
        include_background: include class 0 in the Dice average (nnU-Net excludes it).
        smooth: added to numerator and denominator of every Dice term.
        activation: ``"sigmoid"`` for regions: binary cross-entropy per region and Dice over every region.
    Returns:
        ``weight_ce * CE + weight_dice * (1 - mean Dice)``, a scalar.
    """
    valid = _check(student_logits, target_probs, valid)
    logits = student_logits.float()
    num_classes = logits.shape[1]
    probs = _activate(logits, activation)
    if activation == "sigmoid":
        one_hot = (target_probs.detach() > 0.5).to(probs.dtype)
        voxel_ce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").mean(1)
        include_background = True  # every region channel is an object
    else:
        hard = target_probs.detach().argmax(1)
        voxel_ce = F.cross_entropy(logits, hard, reduction="none")
        one_hot = F.one_hot(hard, num_classes).movedim(-1, 1).to(probs.dtype)
    ce = _masked_mean(voxel_ce, valid, normalization)

    mask = valid.unsqueeze(1).to(probs.dtype)
    axes = (0, *range(2, logits.dim())) if batch_dice else tuple(range(2, logits.dim()))
    intersection = (probs * one_hot * mask).sum(axes)
    denominator = ((probs + one_hot) * mask).sum(axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth).clamp_min(1e-8)
    if not include_background and num_classes > 1:
        dice = dice[..., 1:]
    dice_loss = 1.0 - dice.mean()
    dice_loss = dice_loss * valid.any().to(dice_loss.dtype)  # no valid voxel: no Dice term (no host sync)
    return weight_ce * ce + weight_dice * dice_loss


def uncertainty_weighted_mse_loss(student_logits: Tensor, target_probs: Tensor, uncertainty: Tensor,
                                  valid: Optional[Tensor] = None, eps: float = 1e-8,
                                  normalization: str = "valid", activation: str = "softmax") -> Tensor:
    """SemiSAM+'s ``mean(d * U) / (mean(U) + eps) + mean(U)`` over valid voxels (see module docstring).

    Args:
        uncertainty: ``(B, *spatial)`` non-negative ``unc`` map (detached; negative values are clamped to 0).
    Returns:
        a scalar.
    """
    valid = _check(student_logits, target_probs, valid)
    if tuple(uncertainty.shape) != tuple(valid.shape):
        raise ValueError(f"uncertainty must be (B, *spatial) = {tuple(valid.shape)}, got {tuple(uncertainty.shape)}")
    u = uncertainty.detach().float().clamp_min(0.0)
    d = _squared_softmax_difference(student_logits, target_probs, activation)
    mean_u = _masked_mean(u, valid, normalization)
    return _masked_mean(d * u, valid, normalization) / (mean_u + eps) + mean_u


MaybeList = Union[Tensor, Sequence[Tensor], None]


class SamPseudoLabelLoss(nn.Module):
    """The SAM pseudo-label loss of a trainer, one of :data:`SAM_LOSS_FORMS`, with optional deep supervision.

    Args:
        form: ``"soft_mse"``, ``"dice_ce"`` or ``"uncertainty_mse"``.
        deep_supervision_weights: per-scale weights (normalised to sum 1) used when lists are passed;
            ``None`` uses the first (full-resolution) entry only.
        **form_kwargs: passed to the loss function (e.g. ``batch_dice`` for ``dice_ce``, ``eps``).
    """

    def __init__(self, form: str = "soft_mse", deep_supervision_weights: Optional[Sequence[float]] = None,
                 **form_kwargs):
        super().__init__()
        if form not in SAM_LOSS_FORMS:
            raise ValueError(f"SAM loss form must be one of {SAM_LOSS_FORMS}, got {form!r}")
        self.form = form
        self.deep_supervision_weights = None if deep_supervision_weights is None else \
            [float(w) for w in deep_supervision_weights]
        self.form_kwargs = form_kwargs

    def _single(self, logits: Tensor, target: Tensor, valid: Optional[Tensor], uncertainty: Optional[Tensor]):
        if self.form == "soft_mse":
            return soft_mse_loss(logits, target, valid, **self.form_kwargs)
        if self.form == "dice_ce":
            return dice_ce_loss(logits, target, valid, **self.form_kwargs)
        if uncertainty is None:
            raise ValueError("form='uncertainty_mse' needs the uncertainty map (SamPseudoLabel.uncertainty from "
                             "the 'unc' prompt mode)")
        return uncertainty_weighted_mse_loss(logits, target, uncertainty, valid, **self.form_kwargs)

    def forward(self, student_logits: MaybeList, target_probs: MaybeList, valid: MaybeList = None,
                uncertainty: MaybeList = None) -> Tensor:
        """Args: tensors as in the module docstring, or equally long lists of them (deep supervision)."""
        if torch.is_tensor(student_logits):
            return self._single(student_logits, target_probs, valid, uncertainty)
        n = len(student_logits)

        def at(x, i):
            return None if x is None else x[i]

        if self.deep_supervision_weights is None:
            return self._single(student_logits[0], target_probs[0], at(valid, 0), at(uncertainty, 0))
        if len(self.deep_supervision_weights) < n:
            raise ValueError(f"{n} deep-supervision outputs but only {len(self.deep_supervision_weights)} weights")
        weights = self.deep_supervision_weights[:n]
        total = sum(weights)
        terms = [w / total * self._single(student_logits[i], target_probs[i], at(valid, i), at(uncertainty, i))
                 for i, w in enumerate(weights) if w != 0]
        return torch.stack(terms).sum()
