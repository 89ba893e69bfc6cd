"""What the network's output channels mean: nnU-Net's softmax classes or its sigmoid regions.

Label-based training (the default): ``K`` channels, softmax, channel 0 background, targets are class labels.
Region-based training (``regions_class_order`` in ``dataset.json``, e.g. BraTS' whole tumour / tumour core /
enhancing tumour): ``R`` channels, one independent sigmoid per region, no background channel, targets are
``R`` binary masks (nested or overlapping), and nnU-Net turns region predictions into a label map by painting
``regions_class_order[i]`` wherever region ``i`` exceeds 0.5, in order.

Everything of this package that reads or makes targets (consistency, SAM prompts and pseudo-labels, the losses,
the cached maps, the diagnostics) goes through one :class:`LabelSpace`, so it never branches on the mode itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LabelSpace:
    """The meaning of the output channels.

    Attributes:
        num_channels: segmentation heads (``K`` classes or ``R`` regions).
        regions: the label values of each region, or ``None`` for label-based training.
        regions_class_order: the label painted for each region (nnU-Net's), region-based only.
    """

    num_channels: int
    regions: Optional[Tuple[Tuple[int, ...], ...]] = None
    regions_class_order: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.regions is not None:
            if len(self.regions) != self.num_channels:
                raise ValueError(f"{len(self.regions)} regions for {self.num_channels} output channels")
            if self.regions_class_order is None or len(self.regions_class_order) != len(self.regions):
                raise ValueError("region-based training needs one regions_class_order entry per region")
        elif self.num_channels < 2:
            raise ValueError(f"label-based training needs at least 2 classes, got {self.num_channels}")

    @classmethod
    def from_label_manager(cls, label_manager) -> "LabelSpace":
        """The space of an nnU-Net ``LabelManager``."""
        if not label_manager.has_regions:
            return cls(label_manager.num_segmentation_heads)
        regions = tuple(tuple(int(v) for v in ((r,) if isinstance(r, int) else r))
                        for r in label_manager.foreground_regions)
        return cls(len(regions), regions, tuple(int(c) for c in label_manager.regions_class_order))

    @property
    def has_regions(self) -> bool:
        return self.regions is not None

    @property
    def num_labels(self) -> int:
        """Label values of a label map in this space (``0 .. num_labels - 1``)."""
        return max(self.regions_class_order) + 1 if self.has_regions else self.num_channels

    @property
    def unknown_label(self) -> int:
        """A label value no label map of the dataset uses (cached pseudo-labels: "no pseudo-label here")."""
        return self.num_labels

    # ------------------------------------------------------------------ probabilities and targets
    def probabilities(self, logits: Tensor) -> Tensor:
        """``(B, channels, *s)`` float32: softmax over classes, or an independent sigmoid per region."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.has_regions else torch.softmax(logits, 1)

    def foreground(self, probs: Tensor) -> Tensor:
        """The channels that are objects SAM can be prompted for: classes ``1 ..`` or every region."""
        return probs if self.has_regions else probs[:, 1:]

    def predicted_foreground(self, probs: Tensor) -> Tensor:
        """``(B, F, *s)`` bool: where each foreground channel is predicted (argmax / sigmoid > 0.5)."""
        if self.has_regions:
            return probs > 0.5
        classes = torch.arange(1, probs.shape[1], device=probs.device).view(1, -1, *([1] * (probs.dim() - 2)))
        return probs.argmax(1, keepdim=True) == classes

    def hard(self, probs: Tensor) -> Tensor:
        """Hard targets: class labels ``(B, *s)`` (long), or binary region masks ``(B, R, *s)`` (float)."""
        return (probs > 0.5).float() if self.has_regions else probs.argmax(1)

    def to_label_map(self, probs: Tensor) -> Tensor:
        """``(B, *s)`` long label map, the way nnU-Net turns probabilities into a segmentation."""
        if not self.has_regions:
            return probs.argmax(1)
        labels = torch.zeros((probs.shape[0], *probs.shape[2:]), dtype=torch.long, device=probs.device)
        for channel, label in enumerate(self.regions_class_order):
            labels[probs[:, channel] > 0.5] = label
        return labels

    def region_masks(self, labels: Tensor) -> Tensor:
        """``(B, R, *s)`` bool region membership of a label map ``(B, *s)`` (region-based only)."""
        members = [torch.isin(labels, torch.tensor(r, device=labels.device)) for r in self.regions]
        return torch.stack(members, 1)

    def foreground_dice(self, prediction: Tensor, reference: Tensor) -> float:
        """Mean foreground Dice of two label maps ``(B, *s)`` (reference -1 = no label): over classes
        ``1 .. K-1``, or over regions."""
        from nnunetv2_samssl.evaluation.metrics import mean_foreground_dice
        if not self.has_regions:
            return mean_foreground_dice(prediction, reference, self.num_channels)
        known = reference >= 0
        pred, ref = self.region_masks(prediction) & known.unsqueeze(1), self.region_masks(reference)
        axes = (0, *range(2, pred.dim()))
        tp = (pred & ref).sum(axes).float()
        total = pred.sum(axes).float() + ref.sum(axes).float()
        present = total > 0
        if not bool(present.any()):
            return float("nan")
        return float((2 * tp[present] / total[present]).mean())

