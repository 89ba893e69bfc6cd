"""The pseudo-label source interface: every way of making targets for unlabeled patches implements it.

A semi-supervised trainer composes its loss as

    L_sup(student(x_l), y_l) + lambda_c(t) L_con(student(x_u), teacher(x_u)) + sum over sources s of w_s(t) L_s

where each source ``s`` turns the unlabeled batch (and what the trainer's networks predicted on it) into
:class:`PseudoTargets`: targets (hard labels by default, probabilities where a method wants them), the
valid-voxel mask and the weight ``w_s(t)``. The trainer owns the loss form (``PseudoLabelLoss``) and never
branches on how the targets were made. Today's sources:

- :class:`~nnunetv2_samssl.pseudo_labels.sam_online.OnlineSamSource`: SAM on the patches of every step (SemiSAM);
- :class:`~nnunetv2_samssl.pseudo_labels.sam_cached.CachedSamSource`: SAM on whole cases every k epochs, maps
  carried through the augmentation by the unlabeled loader;
- :class:`~nnunetv2_samssl.pseudo_labels.selection.SelectedSource`: SFR+ confidence selection over any source.

Label rule: :attr:`UnlabeledBatch.hidden_labels` (labeled-subset cases only) may feed a source's logged
diagnostics, never its targets.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from nnunetv2_samssl.pseudo_labels.label_space import LabelSpace

Tensor = torch.Tensor
Outputs = Union[Tensor, List[Tensor]]

# progress.png panel of every Dice logged against hidden labels (SAM sources, Mean Teacher's teacher_diagnostics)
HIDDEN_DICE_PANEL = "Dice vs hidden labels (logged only)"


def hidden_label_dice(space: LabelSpace, reference: Optional[Tensor], **label_maps: Tensor) -> Dict[str, float]:
    """Foreground Dice (classes, or regions) of each label map ``(B, *s)`` against hidden labels ``(B, *s)`` (-1 =
    none), by key: logged, never a target. NaN for every key without a reference."""
    if reference is None:
        return {key: float("nan") for key in label_maps}
    return {key: space.foreground_dice(labels, reference) for key, labels in label_maps.items()}


def full_resolution(outputs: Outputs) -> Tensor:
    """The full-resolution output of a network output or deep-supervision list."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def as_scales(outputs: Outputs) -> List[Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


@dataclass
class UnlabeledBatch:
    """One unlabeled batch on the training device.

    Attributes:
        images: ``(b_u, C, *patch)`` augmented, nnU-Net-normalised patches.
        keys: case identifier of each sample.
        loader_maps: what the unlabeled loader carried as segmentation, one ``(b_u, 1, *scale)`` map per
            deep-supervision scale (cached pseudo-labels); ``None`` unless a source serves maps through the loader.
        hidden_labels: ``(b_u, 1, *patch)`` hidden labels of labeled-subset cases (-1 for other samples), or
            ``None``. For logged diagnostics only: never a target, a prompt or a loss.
    """

    images: Tensor
    keys: Sequence[str]
    loader_maps: Optional[List[Tensor]] = None
    hidden_labels: Optional[Tensor] = None


@dataclass
class NetworkOutputs:
    """What the trainer's networks predicted on the unlabeled batch: logits, deep-supervision lists where
    enabled (full resolution first). ``student`` carries the gradient; ``teacher`` is ``None`` without one.
    ``space`` says what the channels are (softmax classes unless given)."""

    student: Outputs
    teacher: Optional[Outputs] = None
    space: Optional[LabelSpace] = None

    def probabilities(self, which: str = "student") -> Tensor:
        """Detached full-resolution probabilities ``(b_u, channels, *patch)`` of the student or the teacher:
        softmax, or per-region sigmoid in a region space."""
        out = self.student if which == "student" else self.teacher
        if out is None:
            raise ValueError(f"no {which} outputs")
        logits = full_resolution(out).detach().float()
        return self.space.probabilities(logits) if self.space is not None else torch.softmax(logits, 1)


@dataclass
class PseudoTargets:
    """Targets of one source for one batch.

    Attributes:
        targets: per scale (full resolution first; one entry = full resolution only): hard labels
            ``(b_u, *scale)`` (long) or probabilities ``(b_u, K, *scale)`` summing to 1 over ``K``; in a region
            space ``(b_u, R, *scale)`` region probabilities (binary masks for hard targets).
        valid: per scale, ``(b_u, *scale)`` bool: voxels the targets speak for. Others get no loss.
        weight: the loss weight ``w(t)`` of this step.
        uncertainty: optional ``(b_u, *patch)`` voxel weights (SemiSAM+ ``unc``), full resolution.
        metrics: per-step values to log (detached scalars).
    """

    targets: List[Tensor]
    valid: List[Tensor]
    weight: float
    uncertainty: Optional[Tensor] = None
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def hard(self) -> bool:
        return self.targets[0].dim() == self.valid[0].dim()

    def hard_labels(self, scale: int = 0) -> Tensor:
        """``(b_u, *scale)`` labels (argmax of probabilities)."""
        t = self.targets[scale]
        return t if self.hard else t.argmax(1)


@dataclass
class StepInfo:
    """Where training stands: optimizer steps done (``step``) of ``total``."""

    step: int
    total: int


@dataclass
class SourceContext:
    """What a source may use of the trainer, given once at ``initialize``.

    Attributes:
        device, num_classes (segmentation heads K), patch_spacing (mm, tensor axis order), patch_size,
        patch_ndim (2 or 3), deep_supervision_scales (``None`` without deep supervision), output_folder,
        log (the trainer's log), rank / world_size / barrier (DDP; 0 / 1 / no-op otherwise), gather (DDP:
        ``value -> [value of every rank]``; ``[value]`` otherwise),
        predict_case: ``(which, image (C, *shape)) -> probabilities (channels, *shape)`` of the student or teacher
        on a whole case (nnU-Net's sliding window and output activation), on the device.
        space: what the output channels are (:class:`LabelSpace`; label-based with ``num_classes`` if ``None``).
    """

    device: torch.device
    num_classes: int
    patch_spacing: Sequence[float]
    patch_size: Sequence[int]
    patch_ndim: int
    deep_supervision_scales: Optional[Sequence]
    output_folder: str
    log: Callable[[str], None]
    predict_case: Callable[[str, Tensor], Tensor]
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    space: Optional[LabelSpace] = None
    gather: Callable[[Any], List[Any]] = lambda value: [value]

    def __post_init__(self):
        if self.space is None:
            self.space = LabelSpace(self.num_classes)


class PseudoLabelSource(abc.ABC):
    """One way of making pseudo-labels for unlabeled patches.

    Class attributes:
        name: prefix of the logged keys (``{name}_loss``, ``{name}_weight``) and of the loss term.
        log_panels: ``{panel title: [keys]}`` of the source's own per-step metrics, drawn in ``progress.png``.
        uses_loader_maps: the source serves its targets through the unlabeled loader (see :meth:`attach`).
    """

    name: str = "pseudo"
    log_panels: Mapping[str, Sequence[str]] = {}
    uses_loader_maps: bool = False

    @abc.abstractmethod
    def pseudo_labels(self, batch: UnlabeledBatch, outputs: NetworkOutputs, step: StepInfo
                      ) -> Optional[PseudoTargets]:
        """Targets for this batch, or ``None`` when the source has none this step (no loss, metrics NaN)."""

    # ---- optional hooks
    def attach(self, unlabeled_dataset: Any, demoted_cases: Sequence[str]) -> None:
        """Called once the unlabeled dataset exists, before its loader workers start."""

    def wants_hidden_labels(self) -> bool:
        """Whether the unlabeled batches should carry hidden labels (logged diagnostics only)."""
        return False

    def on_epoch_start(self, epoch: int) -> None:
        """Start of a training epoch (e.g. refresh cached pseudo-labels)."""

    def state_dict(self) -> Dict[str, Any]:
        """State to restore on resume, stored in the nnU-Net checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def metric_keys(self) -> List[str]:
        return [k for keys in self.log_panels.values() for k in keys]

    def timed_periodic_work(self):
        """For speed benchmarks: (seconds of one periodic job, training iterations it serves), or ``None``."""
        return None
