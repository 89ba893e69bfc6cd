"""SAM pseudo-labels made on the unlabeled patches of every step (SemiSAM / SemiSAM+, the papers' way).

Data path: student / teacher softmax of the patch -> :class:`~nnunetv2_samssl.sam.branch.SamPseudoLabeler`
(uncertainty-aware prompts, model space, click loop) -> pseudo-label probabilities on the patch grid, valid
where SAM covered the patch, at every deep-supervision scale when the loss asks for them -> hard labels (their
argmax: SAM's output binarised at 0.5 for one class, as the anchors do) or the soft probabilities
(``sam_target``). Weight
``lambda_s(t)`` (:func:`sam_weight`): strong guidance early, vanishing late.
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Optional, Tuple, Union

import torch

from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.config.settings import PseudoLabelLossSettings, SamLabelerSettings, SamModelSettings
from nnunetv2_samssl.pseudo_labels.base import (HIDDEN_DICE_PANEL, NetworkOutputs, PseudoLabelSource,
                                                PseudoTargets, SourceContext, StepInfo, UnlabeledBatch,
                                                hidden_label_dice)
from nnunetv2_samssl.ssl.ramps import sigmoid_rampdown

SAM_PANELS = {HIDDEN_DICE_PANEL: ["sam_pseudo_dice", "prompt_dice"],
              "SAM branch": ["sam_time_s", "sam_valid_fraction"]}


def sam_weight(settings: PseudoLabelLossSettings, step: StepInfo) -> float:
    """lambda_s(t) = w r(T - t, L T) (sigmoid ramp-down), or w exp(-5 t / T) (the SemiSAM paper's print)."""
    w, t, total = settings.sam_weight, step.step, step.total
    if settings.sam_weight_schedule == "exp_decay":
        return w * math.exp(-5.0 * t / max(total, 1))
    if settings.sam_weight_schedule == "constant":
        return w
    return w * sigmoid_rampdown(t, total, settings.sam_rampdown * total)


def resolve_image_channel(value: Union[int, str], channel_names: Mapping[str, str],
                          backend_is_2d: bool) -> Union[int, Tuple[int, int, int]]:
    """The setting ``sam_image_channel`` -> a channel index (or the R, G, B indices for ``'rgb'``).

    Args:
        value: an index, a ``channel_names`` entry of dataset.json, ``'rgb'``, or ``'auto'`` (the default):
            ``'rgb'`` for a 2D backend when the channels include R, G and B (nnU-Net's natural-image
            convention), else channel 0.
        channel_names: dataset.json's ``{"0": "T1", "1": "T1c", ...}``.
        backend_is_2d: 2D backends take three channels; SAM-Med3D takes one.
    """
    names = [channel_names[k] for k in sorted(channel_names, key=int)]
    where = f"the dataset's channels (dataset.json channel_names) are {names}"
    if isinstance(value, str) and value.lower() == "auto":
        is_rgb = all(c in [n.upper() for n in names] for c in "RGB")
        value = "rgb" if backend_is_2d and is_rgb else 0
    if isinstance(value, int):
        if value >= len(names):
            raise ConfigError(f"Setting sam_image_channel={value} is not a channel index: {where}.")
        return value
    if value.lower() == "rgb":
        upper = [n.upper() for n in names]
        if not backend_is_2d:
            raise ConfigError("Setting sam_image_channel: rgb feeds three channels, but SAM-Med3D sees one: name one "
                              f"channel instead; {where}.")
        if not all(c in upper for c in "RGB"):
            raise ConfigError(f"Setting sam_image_channel: rgb needs channels named R, G and B; {where}.")
        return tuple(upper.index(c) for c in "RGB")
    if value in names:
        return names.index(value)
    raise ConfigError(f"Setting sam_image_channel={value!r} names no channel: {where} (or give an index, rgb or "
                      f"auto).")


def build_promptable(model_settings: SamModelSettings, device: torch.device,
                     channel_names: Optional[Mapping[str, str]] = None):
    """The promptable model named by the settings (weights from ``sam_checkpoint``); ``channel_names``
    (dataset.json) resolve the setting ``sam_image_channel``."""
    from nnunetv2_samssl.sam import registry

    kwargs: dict = {"random_init": model_settings.sam_random_init}
    kwargs["image_channel"] = resolve_image_channel(model_settings.sam_image_channel, channel_names or {"0": "0"},
                                                    not model_settings.sam_backend.startswith("sam_med3d"))
    if model_settings.sam_backend.startswith("sam_med3d"):
        kwargs["allow_pickle"] = model_settings.sam_checkpoint_allow_pickle
    return registry.build_promptable_model(model_settings.sam_backend, model_settings.sam_checkpoint, device,
                                           **kwargs)


def build_sam_labeler(model_settings: SamModelSettings, labeler_settings: SamLabelerSettings,
                      device: torch.device, channel_names: Optional[Mapping[str, str]] = None):
    """The promptable model named by the settings, frozen, behind a :class:`SamPseudoLabeler`.
    ``channel_names`` (dataset.json) resolve the setting ``sam_image_channel``."""
    from nnunetv2_samssl.sam.branch import SamPseudoLabeler

    model = build_promptable(model_settings, device, channel_names)
    return SamPseudoLabeler.from_settings(model, labeler_settings)


def needs_teacher(labeler_settings: SamLabelerSettings) -> bool:
    return labeler_settings.prompt_source != "student" or labeler_settings.uncertainty_measure != "entropy"


class SamSource(PseudoLabelSource):
    """What the SAM sources share: the SAM branch, the loss-weight settings, the trainer's services, the prompt
    generator (seeded per DDP rank) and the hidden-label diagnostics (logged only)."""

    name = "sam"
    log_panels = SAM_PANELS

    def __init__(self, labeler, loss_settings: PseudoLabelLossSettings, context: SourceContext,
                 diagnostics: bool = False, seed: int = 12345):
        self.labeler = labeler
        self.loss_settings = loss_settings
        self.context = context
        self.diagnostics = diagnostics
        self.generator = torch.Generator(device=context.device).manual_seed(seed + context.rank)

    @property
    def regions(self) -> bool:
        return self.context.space.has_regions

    def label(self, images: torch.Tensor, student: torch.Tensor, teacher: Optional[torch.Tensor], **where):
        """The SAM branch on ``images`` prompted by the probabilities of the student (and teacher); ``where``:
        the labeler's ``windows``, ``embedding_cache`` and ``case_key``."""
        return self.labeler(images, student, teacher, patch_spacing=self.context.patch_spacing,
                            generator=self.generator, regions=self.regions, **where)

    def dice_diagnostics(self, reference: Optional[torch.Tensor], pseudo_label: torch.Tensor,
                         prompting: torch.Tensor) -> dict:
        """Foreground Dice (classes, or regions) of the pseudo-label and of the prompting prediction (label maps
        ``(B, *s)``) against hidden labels ``(B, *s)`` (-1 = none): logged, never a target. NaN without hidden
        labels."""
        return hidden_label_dice(self.context.space, reference, sam_pseudo_dice=pseudo_label, prompt_dice=prompting)


class OnlineSamSource(SamSource):
    """SemiSAM's SAM branch as a pseudo-label source.

    Args:
        labeler: the SAM branch.
        loss_settings: weight schedule and which scales the targets are made for.
        context: the trainer's services (device, spacing, deep-supervision scales).
        every: run SAM every this many steps (``sam_every``); other steps have no targets.
        diagnostics: score pseudo-labels and the prompting prediction against hidden labels (logged only).
    """

    def __init__(self, labeler, loss_settings: PseudoLabelLossSettings, context: SourceContext, every: int = 1,
                 diagnostics: bool = False, seed: int = 12345):
        super().__init__(labeler, loss_settings, context, diagnostics, seed)
        self.every = every

    def wants_hidden_labels(self) -> bool:
        return self.diagnostics

    def pseudo_labels(self, batch: UnlabeledBatch, outputs: NetworkOutputs, step: StepInfo
                      ) -> Optional[PseudoTargets]:
        if step.step % self.every != 0:
            return None
        device = self.context.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        student = outputs.probabilities("student")
        teacher = outputs.probabilities("teacher") if outputs.teacher is not None else None
        pseudo = self.label(batch.images, student, teacher)
        scales = self.context.deep_supervision_scales
        if scales is not None and self.loss_settings.sam_loss_scales == "all":
            pairs = pseudo.at_scales(scales)
            targets, valid = [p for p, _ in pairs], [v for _, v in pairs]
        else:
            targets, valid = [pseudo.probabilities], [pseudo.valid]
        space = self.context.space
        if self.loss_settings.sam_target == "hard":  # the anchors binarise SAM's output
            targets = [space.hard(t) for t in targets]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        metrics = {"sam_time_s": time.perf_counter() - start,
                   "sam_valid_fraction": float(pseudo.valid.float().mean())}
        reference = None if batch.hidden_labels is None else batch.hidden_labels[:, 0].long()
        metrics.update(self.dice_diagnostics(reference, space.to_label_map(pseudo.probabilities),
                                             space.to_label_map(student)))
        return PseudoTargets(targets, valid, sam_weight(self.loss_settings, step), pseudo.uncertainty, metrics)

