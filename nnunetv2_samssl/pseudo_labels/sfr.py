"""SFR pseudo-labels: a prompt-free 2D segmenter applied to nnU-Net patches and cases through stitching.

Data path (both stages)::

    patches (B, C, *patch)  (2D configuration: the batch's patches are the slices of one stack;
                             3D: the slices of each patch along sfr_slice_axis)
      -> slices larger than the backend's input are scaled down to fit one tile (bilinear; labels nearest)
      -> stitch onto canvases of the backend's input size (sam.stitching: no slice dropped, padding = ignore)
      -> PromptFreeSegmenter (frozen image encoder + LoRA, K-class mask decoder) -> canvas logits (N, K, H, W)
      -> un-stitch (and scale back) -> logits (B, K, *patch)

:class:`OnlineSfrSource` labels the unlabeled patches of every step; :class:`CachedSfrSource` labels every
unlabeled case whole once, before the first epoch, and serves the hard maps through the unlabeled loader (the
cached machinery of :class:`~nnunetv2_samssl.pseudo_labels.sam_cached.CachedSamSource`). Both read images only.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunetv2_samssl.pseudo_labels.base import (NetworkOutputs, PseudoLabelSource, PseudoTargets, SourceContext,
                                                StepInfo, UnlabeledBatch)
from nnunetv2_samssl.pseudo_labels.sam_cached import CachedSamSource
from nnunetv2_samssl.sam import stitching
from nnunetv2_samssl.sam.space import downsample_to_scales

Tensor = torch.Tensor
IGNORE = -1  # stitched labels: padding, empty tiles and the dataset's ignore label


class StitchedSegmenter:
    """A :class:`~nnunetv2_samssl.sam.trainable.PromptFreeSegmenter` on nnU-Net patches (see the module docstring).

    Args:
        segmenter: the prompt-free segmenter (2D backend).
        patch_ndim: 2 (nnU-Net 2d configuration) or 3.
        slice_axis: 3D: the spatial axis of the patch whose slices are stitched.
        max_canvases: canvases per forward pass (bounds memory on whole cases).
    """

    def __init__(self, segmenter, patch_ndim: int, slice_axis: int = 0, max_canvases: int = 16):
        if segmenter.input_space.ndim != 2:
            raise ValueError("SFR stitches slices for a 2D promptable model; SAM-Med3D is 3D (choose litemedsam or "
                             "a sam2d_vit_* backend)")
        if patch_ndim not in (2, 3):
            raise ValueError(f"patch_ndim must be 2 or 3, got {patch_ndim}")
        self.segmenter = segmenter
        self.patch_ndim = patch_ndim
        self.slice_axis = slice_axis
        self.max_canvases = max_canvases
        self.canvas = tuple(segmenter.input_space.size)

    # ------------------------------------------------------------------ geometry
    def as_slices(self, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """``(B, C, *patch)`` -> slices ``(N, C, h, w)`` and what :meth:`from_slices` needs to undo it."""
        if self.patch_ndim == 2:
            return x, tuple(x.shape)
        moved = x.movedim(2 + self.slice_axis, 2)  # (B, C, S, h, w)
        b, c, s = moved.shape[:3]
        return moved.transpose(1, 2).reshape(b * s, c, *moved.shape[3:]), tuple(moved.shape)

    def from_slices(self, slices: Tensor, shape: Tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`as_slices` for slices ``(N, K, h, w)`` (any channel count)."""
        if self.patch_ndim == 2:
            return slices
        b, _, s = shape[:3]
        out = slices.reshape(b, s, slices.shape[1], *slices.shape[2:]).transpose(1, 2)
        return out.movedim(2, 2 + self.slice_axis)

    def fitted_size(self, slice_shape: Sequence[int]) -> Tuple[int, int]:
        """The slice size on the canvas: unchanged when it fits, else scaled down (aspect kept) to one tile."""
        h, w = slice_shape
        scale = min(1.0, self.canvas[0] / h, self.canvas[1] / w)
        return (h, w) if scale == 1.0 else (max(1, int(h * scale)), max(1, int(w * scale)))

    # ------------------------------------------------------------------ stitched batches
    def canvases(self, slices: Tensor, labels: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Optional[Tensor], stitching.StitchLayout]:
        """Slices ``(N, C, h, w)`` (and labels ``(N, h, w)``, ``IGNORE`` = no label) -> canvases ``(M, C, H, W)``,
        canvas labels ``(M, H, W)`` (padding ``IGNORE``) and the layout."""
        size = self.fitted_size(slices.shape[2:])
        if size != tuple(slices.shape[2:]):
            slices = F.interpolate(slices.float(), size=size, mode="bilinear", align_corners=False)
            if labels is not None:
                labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        layout = stitching.plan_stitch(size, slices.shape[0], self.canvas)
        fill = float(slices.amin()) if slices.numel() else 0.0
        images = stitching.stitch_slices(slices.float(), layout, fill_value=fill)
        canvas_labels = None if labels is None else stitching.stitch_label_slices(labels.long(), layout, IGNORE)
        return images, canvas_labels, layout

    def slice_logits(self, slices: Tensor) -> Tensor:
        """Class logits ``(N, K, h, w)`` of slices ``(N, C, h, w)``."""
        images, _, layout = self.canvases(slices)
        logits = torch.cat([self.segmenter(images[i:i + self.max_canvases])
                            for i in range(0, images.shape[0], self.max_canvases)])
        out = stitching.unstitch_slices(logits, layout)
        if tuple(out.shape[2:]) != tuple(slices.shape[2:]):
            out = F.interpolate(out, size=tuple(slices.shape[2:]), mode="bilinear", align_corners=False)
        return out

    def logits(self, images: Tensor) -> Tensor:
        """Class logits ``(B, K, *patch)`` of nnU-Net patches ``(B, C, *patch)``."""
        slices, shape = self.as_slices(images)
        return self.from_slices(self.slice_logits(slices), shape)

    def label_case(self, image: Tensor, chunk: int = 64) -> Tensor:
        """Softmax ``(K, *shape)`` of a whole preprocessed case ``(C, *shape)``: slices along the patch's slice
        axis (2D configurations: the case's first spatial axis), ``chunk`` slices at a time."""
        axis = 0 if self.patch_ndim == 2 else self.slice_axis
        volume = image.movedim(1 + axis, 0)  # (S, C, h, w)
        probs = torch.cat([torch.softmax(self.slice_logits(volume[i:i + chunk]).float(), 1)
                           for i in range(0, volume.shape[0], chunk)])  # (S, K, h, w)
        return probs.movedim(0, 1 + axis)


def sfr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """SFR's loss ``0.5 (CE + Dice)`` over the labelled canvas pixels: ``logits (M, K, H, W)``, ``labels (M, H, W)``
    with ``IGNORE`` on padding, empty tiles and unannotated voxels (nnU-Net's soft Dice form, background
    excluded, batch Dice)."""
    from nnunetv2_samssl.ssl.sam_losses import dice_ce_loss
    valid = labels != IGNORE
    target = F.one_hot(labels.clamp_min(0), logits.shape[1]).movedim(-1, 1).float()
    return 0.5 * dice_ce_loss(logits, target, valid, normalization="valid")


class OnlineSfrSource(PseudoLabelSource):
    """The fine-tuned model's hard pseudo-labels of every step's unlabeled patches (SFR's re-training)."""

    name = "sam"
    log_panels = {"SFR pseudo-labels": ["sam_time_s"]}

    def __init__(self, stitched: StitchedSegmenter, context: SourceContext, weight: float, all_scales: bool):
        self.stitched, self.context, self.weight, self.all_scales = stitched, context, weight, all_scales

    @torch.no_grad()
    def pseudo_labels(self, batch: UnlabeledBatch, outputs: NetworkOutputs, step: StepInfo
                      ) -> Optional[PseudoTargets]:
        start = time.perf_counter()
        self.stitched.segmenter.eval()
        probs = torch.softmax(self.stitched.logits(batch.images).float(), 1)
        valid = torch.ones((probs.shape[0], *probs.shape[2:]), dtype=torch.bool, device=probs.device)
        scales = self.context.deep_supervision_scales
        pairs = downsample_to_scales(probs, valid, scales) if scales is not None and self.all_scales \
            else [(probs, valid)]
        targets = [p.argmax(1) for p, _ in pairs]  # SFR's hard pseudo-labels
        return PseudoTargets(targets, [v for _, v in pairs], self.weight, None,
                             {"sam_time_s": time.perf_counter() - start})


class CachedSfrSource(CachedSamSource):
    """SFR pseudo-labels of whole unlabeled cases, made once before the first epoch and carried through nnU-Net's
    augmentation by the unlabeled loader (remade on ``--c`` only if the checkpoint's generation is gone)."""

    log_panels = {"SFR pseudo-labels": ["sam_valid_fraction", "sam_pseudo_dice"]}

    def __init__(self, stitched: StitchedSegmenter, context: SourceContext, weight: float, all_scales: bool,
                 diagnostics: bool = False, total_epochs: int = 1):
        from nnunetv2_samssl.config.settings import PseudoLabelLossSettings
        loss = PseudoLabelLossSettings(sam_loss="dice_ce", sam_loss_scales="all" if all_scales else "full_res",
                                       sam_target="hard", sam_loss_normalization="valid", sam_weight=weight,
                                       sam_weight_schedule="constant", sam_rampdown=1.0)
        super().__init__(None, loss, context, refresh_epochs=0, diagnostics=diagnostics, windows="roi",
                         embedding_cache_mib=0)
        self.stitched = stitched
        self.total_epochs = total_epochs

    def on_epoch_start(self, epoch: int) -> None:
        if self._stale or self.generation is None:
            self.refresh(epoch)

    def label_case(self, image: Tensor, case: Optional[str] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        self.stitched.segmenter.eval()
        probs = self.stitched.label_case(image.to(self.context.device))
        labels = probs.argmax(0)
        return labels, torch.ones_like(labels, dtype=torch.bool), None

    def timed_periodic_work(self):
        """Speed benchmarks: the labelling is done once per training, so it serves every epoch."""
        return self.refresh(0), self.total_epochs
