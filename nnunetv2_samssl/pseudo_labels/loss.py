"""The loss between the student's outputs and a source's :class:`PseudoTargets`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nnunetv2_samssl.pseudo_labels.base import Outputs, PseudoTargets, as_scales
from nnunetv2_samssl.ssl.sam_losses import SamPseudoLabelLoss


class PseudoLabelLoss:
    """One of :data:`~nnunetv2_samssl.ssl.sam_losses.SAM_LOSS_FORMS` applied to pseudo-targets.

    Hard targets enter as one-hot probabilities. With per-scale targets (more than one entry) the loss is the
    deep-supervision weighted sum over those scales (``deep_supervision_weights``, nnU-Net's); with one entry it
    acts on the full-resolution output only (and takes the targets' uncertainty map, if any). ``normalization``:
    voxels without a target count 0 and the mean is over the whole patch (``"patch"``, the anchors') or over the
    voxels with a target (``"valid"``). ``regions``: the channels are sigmoid regions and the targets region
    probabilities or masks (see :mod:`~nnunetv2_samssl.pseudo_labels.label_space`).
    """

    def __init__(self, form: str, num_classes: int, deep_supervision_weights: Optional[Sequence[float]] = None,
                 normalization: str = "valid", regions: bool = False):
        self.num_classes = num_classes
        self.loss = SamPseudoLabelLoss(form, deep_supervision_weights, normalization=normalization,
                                       activation="sigmoid" if regions else "softmax")

    def probabilities(self, target: torch.Tensor, hard: bool) -> torch.Tensor:
        return F.one_hot(target, self.num_classes).movedim(-1, 1).float() if hard else target

    def __call__(self, student: Outputs, targets: PseudoTargets) -> torch.Tensor:
        probs = [self.probabilities(t, targets.hard) for t in targets.targets]
        outputs = as_scales(student)
        if len(probs) > 1:
            return self.loss(outputs[:len(probs)], probs, targets.valid)
        return self.loss(outputs[0], probs[0], targets.valid[0], targets.uncertainty)
