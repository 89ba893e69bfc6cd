"""SFR+ confidence selection: a wrapper that keeps only the confident part of any source's pseudo-labels.

SFR+ (confidence estimation for selective re-training) uses only unlabeled voxels or cases whose pseudo-labels
are trustworthy. Here that is a wrapper over any :class:`PseudoLabelSource`: the wrapped source makes its
targets as before, the wrapper narrows their valid mask, scale by scale. Measures:

- ``confidence``: the teacher's softmax probability of the pseudo-label class (a hard target's class, or the
  argmax of soft targets) must reach ``threshold``;
- ``agreement``: the student's prediction (argmax) must equal the pseudo-label class.

Region-based outputs (independent sigmoids): ``confidence`` is the teacher's probability of each region's
pseudo-label (``p`` inside, ``1 - p`` outside), the smallest over regions; ``agreement`` needs every region of the
student (``p > 0.5``) to equal the pseudo-label's.

``level="voxel"`` selects voxels; ``level="case"`` keeps or drops each sample whole, by the mean of the measure
over its valid voxels (``>= threshold``). The fraction of the source's valid voxels that is kept is logged per
step as ``{name}_selected_fraction`` (drawn in ``progress.png``). Nothing here reads a label.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import torch

from nnunetv2_samssl.pseudo_labels.base import (NetworkOutputs, PseudoLabelSource, PseudoTargets, StepInfo,
                                                UnlabeledBatch, as_scales)

MEASURES = ("confidence", "agreement")
LEVELS = ("voxel", "case")


class SelectedSource(PseudoLabelSource):
    """``source`` with its valid voxels narrowed to the confident ones.

    Args:
        source: any pseudo-label source.
        measure: ``"confidence"`` (needs teacher outputs) or ``"agreement"``.
        threshold: in ``[0, 1]``; see the module docstring.
        level: ``"voxel"`` or ``"case"``.
    """

    def __init__(self, source: PseudoLabelSource, measure: str = "confidence", threshold: float = 0.9,
                 level: str = "voxel"):
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.source, self.measure, self.threshold, self.level = source, measure, threshold, level
        self.name = source.name
        self.uses_loader_maps = source.uses_loader_maps
        self.fraction_key = f"{source.name}_selected_fraction"
        self.log_panels = {**source.log_panels, "Pseudo-label selection (SFR+)": [self.fraction_key]}

    def score(self, targets: PseudoTargets, outputs: NetworkOutputs, scale: int) -> torch.Tensor:
        """``(b_u, *scale)`` per-voxel measure in ``[0, 1]`` at one target scale. Region-based outputs: the
        least confident region (``confidence``), every region agreeing (``agreement``)."""
        if outputs.space is not None and outputs.space.has_regions:
            return self._region_score(targets.targets[scale] > 0.5, outputs, scale)
        labels = targets.hard_labels(scale)
        if self.measure == "agreement":
            student = as_scales(outputs.student)[scale].detach()
            return (student.argmax(1) == labels).float()
        teacher = torch.softmax(self._teacher(outputs, scale), 1)
        return teacher.gather(1, labels.unsqueeze(1)).squeeze(1)

    def _region_score(self, masks: torch.Tensor, outputs: NetworkOutputs, scale: int) -> torch.Tensor:
        if self.measure == "agreement":
            student = as_scales(outputs.student)[scale].detach() > 0
            return (student == masks).all(1).float()
        teacher = torch.sigmoid(self._teacher(outputs, scale))
        return torch.where(masks, teacher, 1.0 - teacher).amin(1)

    @staticmethod
    def _teacher(outputs: NetworkOutputs, scale: int) -> torch.Tensor:
        if outputs.teacher is None:
            raise ValueError("confidence selection needs the teacher's outputs")
        return as_scales(outputs.teacher)[scale].detach().float()

    def select(self, targets: PseudoTargets, outputs: NetworkOutputs) -> PseudoTargets:
        valid: List[torch.Tensor] = []
        for scale, v in enumerate(targets.valid):
            score = self.score(targets, outputs, scale)
            if self.level == "voxel":
                keep = score >= self.threshold
            else:
                dims = tuple(range(1, v.dim()))
                mean = (score * v).sum(dims) / v.sum(dims).clamp_min(1)
                keep = (mean >= self.threshold).view(-1, *([1] * (v.dim() - 1))).expand_as(v)
            valid.append(v & keep)
        before = targets.valid[0].sum()
        fraction = float(valid[0].sum() / before) if before > 0 else float("nan")
        return PseudoTargets(targets.targets, valid, targets.weight, targets.uncertainty,
                             {**targets.metrics, self.fraction_key: fraction})

    # ------------------------------------------------------------------ the interface, delegated
    def pseudo_labels(self, batch: UnlabeledBatch, outputs: NetworkOutputs, step: StepInfo
                      ) -> Optional[PseudoTargets]:
        targets = self.source.pseudo_labels(batch, outputs, step)
        return None if targets is None else self.select(targets, outputs)

    def attach(self, unlabeled_dataset: Any, demoted_cases: Sequence[str]) -> None:
        self.source.attach(unlabeled_dataset, demoted_cases)

    def wants_hidden_labels(self) -> bool:
        return self.source.wants_hidden_labels()

    def on_epoch_start(self, epoch: int) -> None:
        self.source.on_epoch_start(epoch)

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.source.load_state_dict(state)

    def timed_periodic_work(self):
        return self.source.timed_periodic_work()
