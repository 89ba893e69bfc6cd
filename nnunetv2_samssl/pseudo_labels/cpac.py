"""CPAC-SAM's promptable branch: cross prompting, prototype-guided grid prompts, prompt consistency.

One training step (all in the promptable model's input space, :mod:`nnunetv2_samssl.sam.space`)::

    labeled patches + labels
      -> crops (model space) -> image embeddings (encoder once)
      -> class prototypes <- EMA of the embedding (or nnU-Net decoder feature) averaged over each labeled class
      -> label-derived grid prompts, two densities -> K-class prompted logits (decoder, one batched call)
      -> supervised loss 0.2 CE + 0.8 Dice per set, averaged over the two sets            [trains the promptable model]

    unlabeled patches, softmax of branch A and of branch B (detached)
      -> crops -> image embeddings (encoder once, shared by both branches' prompts)
      -> per prompting branch X: its predicted class in model space; the nearest-prototype class;
         reliable region = where they agree; per class (background included) an adaptive regular grid
         (prompts.grid_prompts), two densities
      -> 2 branches x 2 densities = 4 prompt sets decoded in one batched call
      -> per X: P_X = argmax of the mean softmax of its two sets (detached)
           prompt consistency: 0.5 (CE + Dice)(set 1, P_X) + 0.5 (CE + Dice)(set 2, P_X)  [trains the promptable model]
           P_X mapped back onto the patch: the pseudo-label of the OTHER branch (0.5 (CE + Dice) in the trainer)

No label of an unlabeled case is read on this path: prompts come from the branches' predictions and the
prototypes from labeled patches. The hidden labels of labeled-subset cases feed the logged pseudo-label Dice only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_samssl.prompts.grid_prompts import (ClassPrototypes, GridPrompts, class_masks, reliable_region,
                                                  two_density_prompts)
from nnunetv2_samssl.pseudo_labels.base import PseudoTargets
from nnunetv2_samssl.sam.space import ModelBatch, SamSpaceMapper, downsample_to_scales
from nnunetv2_samssl.ssl.sam_losses import dice_ce_loss

Tensor = torch.Tensor


def pad_and_concatenate(prompt_sets: Sequence[GridPrompts]) -> Tuple[Tensor, Tensor]:
    """Point sets of possibly different lengths -> ``points (sum Q, N, d)`` and ``labels (sum Q, N)``, padded
    with label ``-1``."""
    longest = max(max(p.points.shape[1] for p in prompt_sets), 1)
    points, labels = [], []
    for p in prompt_sets:
        missing = longest - p.points.shape[1]
        points.append(F.pad(p.points, (0, 0, 0, missing)))
        labels.append(F.pad(p.labels, (0, missing), value=-1))
    return torch.cat(points), torch.cat(labels)


def pseudo_label_dice(labels: Tensor, valid: Tensor, reference: Tensor, num_classes: int) -> float:
    """Mean foreground Dice of ``labels (B, *patch)`` against ``reference (B, *patch)`` over ``valid`` voxels of
    samples whose reference is known (``reference >= 0`` somewhere); NaN when none is."""
    known = (reference >= 0).flatten(1).any(1)
    if not bool(known.any()):
        return float("nan")
    keep = valid & known.view(-1, *([1] * (valid.dim() - 1)))
    dices = []
    for k in range(1, num_classes):
        a, b = (labels == k) & keep, (reference == k) & keep
        total = int(a.sum()) + int(b.sum())
        if total:
            dices.append(2.0 * int((a & b).sum()) / total)
    return float(sum(dices) / len(dices)) if dices else float("nan")


@dataclass
class UnlabeledResult:
    """What :meth:`CrossPrompting.unlabeled` returns.

    Attributes:
        consistency: the prompt-consistency loss (with gradient into the promptable model).
        targets: ``{"a": ..., "b": ...}``: each branch's pseudo-targets (made from the OTHER branch's prompts),
            per deep-supervision scale, hard labels with their valid voxels.
        metrics: detached values to log.
    """

    consistency: Tensor
    targets: Dict[str, PseudoTargets]
    metrics: Dict[str, float] = field(default_factory=dict)


class CrossPrompting(nn.Module):
    """The promptable model, its class prototypes and the CPAC-SAM losses on it (see the module docstring).

    Args:
        segmenter: a :class:`~nnunetv2_samssl.sam.trainable.ClassPromptedSegmenter`.
        num_classes: ``K`` (background included).
        patch_spacing: the nnU-Net configuration's spacing (tensor axis order).
        densities: the two grid densities.
        feature_source: ``"sam"`` (one prototype set on the image embedding) or ``"network"`` (one per branch,
            on the decoder features the trainer passes).
        momentum: EMA momentum of the prototypes.
        max_points_per_class, max_crops, slice_axis: see ``CpacSettings``.
        deep_supervision_scales: nnU-Net's, or ``None`` (targets at full resolution only).
    """

    def __init__(self, segmenter: nn.Module, num_classes: int, patch_spacing: Sequence[float], *,
                 densities: Sequence[float] = (8.0, 16.0), feature_source: str = "sam", momentum: float = 0.9,
                 max_points_per_class: Optional[int] = None, max_crops: Optional[int] = None, slice_axis: int = 0,
                 deep_supervision_scales: Optional[Sequence] = None):
        super().__init__()
        if feature_source not in ("sam", "network"):
            raise ValueError(f"feature_source must be 'sam' or 'network', got {feature_source!r}")
        self.segmenter = segmenter
        self.num_classes = int(num_classes)
        self.densities = tuple(float(d) for d in densities)
        self.feature_source = feature_source
        self.max_points_per_class = max_points_per_class
        self.max_crops = max_crops
        self.deep_supervision_scales = deep_supervision_scales
        names = ("sam",) if feature_source == "sam" else ("a", "b")
        self.prototypes = nn.ModuleDict({n: ClassPrototypes(self.num_classes, momentum) for n in names})
        space = segmenter.input_space
        # the whole patch is the window: every class (background included) gets prompts anywhere in it
        self.mapper = SamSpaceMapper(space, patch_spacing, roi_margin=0.0, slice_axis=slice_axis)

    # ------------------------------------------------------------------ geometry
    def crops(self, images: Tensor, generator: Optional[torch.Generator]) -> ModelBatch:
        """The model inputs covering the patches (``max_crops`` of them at most, a random subset)."""
        crops = self.mapper.to_model(images.detach().float(), None, keep_empty=True)
        if self.max_crops is not None and crops.num_queries > self.max_crops:
            device = generator.device if generator is not None else images.device
            subset = torch.randperm(crops.num_queries, generator=generator, device=device)[:self.max_crops]
            crops = crops.select(subset.sort().values.to(images.device))
        return crops

    def labels_to_model(self, crops: ModelBatch, labels: Tensor, size: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """Label maps ``(B, *patch)`` (values outside ``[0, K)``, e.g. the ignore label, are unknown) -> model-space
        labels ``(Q, *size)`` (majority class of the area each cell covers) and their validity (known, inside)."""
        k = self.num_classes
        known = (labels >= 0) & (labels < k)
        one_hot = F.one_hot(torch.where(known, labels, torch.full_like(labels, k)).long(), k + 1)
        areas = crops.patch_to_model(one_hot.movedim(-1, 1).float(), size=size)
        best = areas.argmax(1)
        return best.clamp_max(k - 1), (best < k) & crops.inside_patch(size)

    def prototype_classes(self, crops: ModelBatch, embeddings: Tensor, name: str,
                          features: Optional[Tensor]) -> Optional[Tensor]:
        """Nearest-prototype class of every model-input cell ``(Q, *size)``, or ``None`` before any prototype."""
        prototypes = self.prototypes[name]
        if not prototypes.ready:
            return None
        size = tuple(self.segmenter.input_space.size)
        if self.feature_source == "sam":
            nearest = prototypes.nearest_class(embeddings.float())  # (Q, *grid)
            return F.interpolate(nearest[:, None].float(), size=size, mode="nearest")[:, 0].long()
        nearest = prototypes.nearest_class(features.float())  # (B, *patch)
        one_hot = F.one_hot(nearest.clamp_min(0), self.num_classes).movedim(-1, 1).float()
        return crops.patch_to_model(one_hot, size=size).argmax(1)

    def prompts(self, masks: Tensor, generator: Optional[torch.Generator]) -> List[GridPrompts]:
        return two_density_prompts(masks, self.densities, generator=generator,
                                   max_points_per_class=self.max_points_per_class)

    def decode_sets(self, embeddings: Tensor, prompt_sets: Sequence[GridPrompts]) -> List[Tensor]:
        """Low-res logits ``(Q, K, *low_res)`` of every prompt set, decoded in one batched call."""
        points, labels = pad_and_concatenate(prompt_sets)
        repeated = embeddings.repeat(len(prompt_sets), *([1] * (embeddings.dim() - 1)))
        logits = self.segmenter.decode(repeated, points, labels)
        return list(logits.float().split(embeddings.shape[0]))

    # ------------------------------------------------------------------ labeled patches
    def labeled(self, images: Tensor, labels: Tensor, features: Optional[Tuple[Tensor, Tensor]] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, float]]:
        """The supervised loss of the promptable model prompted from the labels (two grid densities, 0.2 CE +
        0.8 Dice each, averaged), after updating the prototypes with this batch.

        Args:
            images: ``(b, C, *patch)`` labeled patches; labels ``(b, 1, *patch)`` or ``(b, *patch)``.
            features: ``network`` source: the branches' full-resolution decoder features ``(b, F, *patch)``.
        """
        labels = labels[:, 0] if labels.dim() == images.dim() else labels
        crops = self.crops(images, generator)
        space = self.segmenter.input_space
        embeddings = self.segmenter.encode(crops.images)
        grid = tuple(embeddings.shape[2:])
        with torch.no_grad():
            known = (labels >= 0) & (labels < self.num_classes)
            if self.feature_source == "sam":
                weights = crops.patch_to_model(class_masks(labels, self.num_classes).float(), size=grid)
                weights = weights * crops.inside_patch(grid).unsqueeze(1)
                self.prototypes["sam"].update(embeddings.detach(), weights)
            else:
                masks = class_masks(labels, self.num_classes).float()
                for name, feats in zip(("a", "b"), features):
                    self.prototypes[name].update(feats.detach(), masks, known)
            model_labels, model_valid = self.labels_to_model(crops, labels, space.size)
            low_labels, low_valid = self.labels_to_model(crops, labels, space.low_res_size)
            prompt_sets = self.prompts(class_masks(model_labels, self.num_classes, model_valid), generator)
        logits = self.decode_sets(embeddings, prompt_sets)
        target = F.one_hot(low_labels, self.num_classes).movedim(-1, 1).float()
        losses = [dice_ce_loss(lg, target, low_valid, weight_ce=0.2, weight_dice=0.8) for lg in logits]
        loss = sum(losses) / len(losses)
        return loss, {"cpac_sam_sup_loss": float(loss.detach()),
                      "cpac_points_labeled": float(prompt_sets[-1].num_points().float().mean())}

    # ------------------------------------------------------------------ unlabeled patches
    def unlabeled(self, images: Tensor, probs_a: Tensor, probs_b: Tensor,
                  features: Optional[Tuple[Tensor, Tensor]] = None, generator: Optional[torch.Generator] = None,
                  hidden_labels: Optional[Tensor] = None) -> UnlabeledResult:
        """Cross prompting on unlabeled patches.

        Args:
            images: ``(B, C, *patch)``; probs_a / probs_b: the branches' softmax ``(B, K, *patch)`` (detached here).
            features: ``network`` source: each branch's decoder features on these patches.
            hidden_labels: labeled-subset diagnostics only: ``(B, 1, *patch)`` labels, ``-1`` where unknown.
        """
        crops = self.crops(images, generator)
        space = self.segmenter.input_space
        embeddings = self.segmenter.encode(crops.images)
        with torch.no_grad():
            inside = crops.inside_patch()
            prompt_sets, reliable = [], []
            # one prototype set on the shared image embedding, or one per branch on its own decoder features
            shared = self.prototype_classes(crops, embeddings, "sam", None) if self.feature_source == "sam" else None
            for name, probs in (("b", probs_b), ("a", probs_a)):  # B's prompts make A's target and vice versa
                predicted = crops.patch_to_model(probs.detach().float()).argmax(1)
                nearest = shared if self.feature_source == "sam" else self.prototype_classes(
                    crops, embeddings, name, features[0 if name == "a" else 1])
                region = inside if nearest is None else reliable_region(nearest, predicted, inside)
                reliable.append(float(region.float().sum() / inside.float().sum().clamp_min(1.0)))
                prompt_sets += self.prompts(class_masks(predicted, self.num_classes, region), generator)
        logits = self.decode_sets(embeddings, prompt_sets)
        inside_low = crops.inside_patch(space.low_res_size)
        consistency = logits[0].new_zeros(())
        targets: Dict[str, PseudoTargets] = {}
        metrics: Dict[str, float] = {}
        for i, (prompter, target_branch) in enumerate((("b", "a"), ("a", "b"))):
            first, second = logits[2 * i], logits[2 * i + 1]
            with torch.no_grad():
                mean = 0.5 * (torch.softmax(first, 1) + torch.softmax(second, 1))
                pseudo = F.one_hot(mean.argmax(1), self.num_classes).movedim(-1, 1).float()
                has_points = (prompt_sets[2 * i].num_points() > 0).view(-1, *([1] * len(space.size)))
                valid_low = inside_low & has_points
            for lg in (first, second):
                consistency = consistency + 0.5 * dice_ce_loss(lg, pseudo, valid_low)
            with torch.no_grad():
                patch_probs, patch_valid = self.to_patch(mean * valid_low.unsqueeze(1), valid_low, crops)
                targets[target_branch] = self.pseudo_targets(patch_probs, patch_valid)
                metrics[f"cpac_valid_fraction_{target_branch}"] = float(patch_valid.float().mean())
                metrics[f"cpac_reliable_fraction_{prompter}"] = reliable[i]
                if hidden_labels is not None:
                    metrics[f"cpac_pseudo_dice_from_{prompter}"] = pseudo_label_dice(
                        patch_probs.argmax(1), patch_valid, hidden_labels[:, 0], self.num_classes)
        metrics["cpac_consistency_loss"] = float(consistency.detach())
        metrics["cpac_points_unlabeled"] = float(prompt_sets[1].num_points().float().mean())
        return UnlabeledResult(consistency, targets, metrics)

    def to_patch(self, probs: Tensor, valid: Tensor, crops: ModelBatch) -> Tuple[Tensor, Tensor]:
        """Model-space probabilities ``(Q, K, *grid)`` (zero where ``valid (Q, *grid)`` is false) -> patch
        probabilities ``(B, K, *patch)`` (mean over the crops covering a voxel) and validity ``(B, *patch)``."""
        q, k = probs.shape[:2]
        queries = crops.select(torch.arange(q, device=probs.device).repeat_interleave(k),
                               channel_index=torch.arange(k, device=probs.device).repeat(q), num_channels=k,
                               with_images=False)
        values, _ = self.mapper.to_patch(probs.reshape(q * k, 1, *probs.shape[2:]), queries)
        weight, covered = self.mapper.to_patch(valid.float().unsqueeze(1), crops.select(
            torch.arange(q, device=probs.device), channel_index=torch.zeros(q, dtype=torch.long, device=probs.device),
            num_channels=1, with_images=False))
        patch_valid = covered[:, 0] & (weight[:, 0] > 0.5)
        return values / weight.clamp_min(1e-6), patch_valid

    def pseudo_targets(self, probs: Tensor, valid: Tensor) -> PseudoTargets:
        """Hard targets per deep-supervision scale (full resolution first)."""
        scales = self.deep_supervision_scales
        pairs = downsample_to_scales(probs, valid, scales) if scales is not None else [(probs, valid)]
        return PseudoTargets([p.argmax(1) for p, _ in pairs], [v for _, v in pairs], 1.0)

    # ------------------------------------------------------------------ checkpoints
    def compact_state_dict(self) -> Dict[str, Tensor]:
        """What training changes: the promptable model's trained tensors and the prototypes (the frozen weights
        come from the backend's checkpoint)."""
        from nnunetv2_samssl.sam.trainable import trainable_state_dict
        state = {f"segmenter.{k}": v for k, v in trainable_state_dict(self.segmenter).items()}
        state.update({f"prototypes.{k}": v for k, v in self.prototypes.state_dict().items()})
        return state

    def load_compact_state_dict(self, state: Dict[str, Tensor]) -> None:
        from nnunetv2_samssl.sam.trainable import load_trainable_state_dict
        load_trainable_state_dict(self.segmenter, {k[len("segmenter."):]: v for k, v in state.items()
                                                   if k.startswith("segmenter.")})
        self.prototypes.load_state_dict({k[len("prototypes."):]: v for k, v in state.items()
                                         if k.startswith("prototypes.")})
