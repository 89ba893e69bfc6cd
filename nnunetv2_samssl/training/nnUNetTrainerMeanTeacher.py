"""Mean Teacher on nnU-Net: supervised nnU-Net loss + ramped-up student/teacher consistency on unlabeled patches.

Pieces: EMA teacher (``ssl.ema``, a non-trainable part of :attr:`parts`), sigmoid ramp-up (``ssl.ramps``),
consistency loss (``ssl.consistency``), unlabeled stream, step and checkpoints (``training.ssl_trainer``).
Settings: ``trainer_configs/mean_teacher.yaml`` (``settings.mean_teacher``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.pseudo_labels.base import HIDDEN_DICE_PANEL, NetworkOutputs, UnlabeledBatch, hidden_label_dice
from nnunetv2_samssl.ssl.consistency import consistency_loss, deep_supervision_consistency
from nnunetv2_samssl.ssl.ema import EMATeacher, unwrap
from nnunetv2_samssl.ssl.mixing import BoxMix
from nnunetv2_samssl.ssl.ramps import sigmoid_rampup
from nnunetv2_samssl.ssl.views import student_view
from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase

Outputs = Union[torch.Tensor, List[torch.Tensor]]


def teacher_input_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``x + clip(N(0, std^2), -clip, clip)`` (the anchors' teacher perturbation)."""
    if std == 0:
        return x
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


class nnUNetTrainerMeanTeacher(nnUNetTrainerSSLBase):
    default_config = "mean_teacher"
    log_panels = {"Mean Teacher losses": ["sup_loss", "consistency_loss"],
                  "SSL weights": ["consistency_weight"]}
    teacher_diagnostics = False  # set by initialize (_wants_teacher_diagnostics)

    def initialize(self):
        super().initialize()
        mt = self.settings.mean_teacher
        self.teacher = EMATeacher(self.network, mt.ema_decay)
        if self._do_i_compile():
            self.teacher.compile()
        self.parts.add("teacher", self.teacher.module)  # averaged, not trained by gradients
        if mt.predict_with == "teacher":
            self.parts.set_predicting("teacher")
        # region-based datasets: the sigmoid counterpart of the form (each region its own Bernoulli)
        self.consistency_fn = consistency_loss(mt.consistency_loss, self.label_space.has_regions,
                                               mt.consistency_threshold, self.configuration_manager.batch_dice)
        self.strong_view = student_view(mt.student_view, mt.strong_view_strength)
        if mt.consistency_threshold > 0:
            losses = self.log_panels.get("Mean Teacher losses", [])
            self.log_panels = {**self.log_panels, "Mean Teacher losses": [*losses, "consistency_confident"]}
        self.initialize_sources()
        self._check_student_mix()
        self.teacher_diagnostics = self._wants_teacher_diagnostics()
        if self.teacher_diagnostics:
            dice = self.log_panels.get(HIDDEN_DICE_PANEL, [])
            self.log_panels = {**self.log_panels, HIDDEN_DICE_PANEL: [*dice, "teacher_dice", "student_dice"]}
        self.finish_initialize()

    def initialize_sources(self) -> None:
        """Hook: add pseudo-label sources (``add_source``). Mean Teacher has none."""

    def _check_student_mix(self) -> None:
        mt = self.settings.mean_teacher
        if mt.student_mix == "none":
            return
        if self.sources:
            raise ConfigError(f"student_mix={mt.student_mix} mixes the targets of Mean Teacher's own consistency term "
                              f"only; {self.__class__.__name__}'s pseudo-label sources "
                              f"({', '.join(s.name for s in self.sources)}) label the unmixed patches. Set "
                              f"student_mix: none, or train nnUNetTrainerMeanTeacher.")
        if self.learns_unannotated:
            raise ConfigError(f"student_mix={mt.student_mix} mixes unlabeled patches only, and learn_unannotated "
                              f"gives the consistency term the labeled patches too. Set one of student_mix: none "
                              f"or learn_unannotated: false.")

    def _wants_teacher_diagnostics(self) -> bool:
        """``teacher_diagnostics`` (auto: in labeled-subset mode): the hidden labels of the demoted cases are
        loaded for the logged Dice of the teacher and the student, never for a loss. Not with a source that
        serves its targets through the unlabeled loader (cached pseudo-labels): its batches carry those maps
        instead, and the source scores them on whole cases."""
        setting, subset = self.settings.mean_teacher.teacher_diagnostics, self.settings.labeled_subset
        if any(source.uses_loader_maps for source in self.sources):
            if setting is True:
                raise ConfigError("teacher_diagnostics=true needs hidden labels in the unlabeled batches, which carry "
                                  "cached pseudo-labels with this trainer's settings (their Dice is logged per "
                                  "refresh instead). Set teacher_diagnostics to auto or false.")
            return False
        if setting == "auto":
            return subset.num_labeled is not None or subset.labeled_cases is not None
        return bool(setting)

    def wants_hidden_labels(self) -> bool:
        return super().wants_hidden_labels() or self.teacher_diagnostics

    # ------------------------------------------------------------------ schedule
    def consistency_weight(self) -> float:
        """lambda_c(t) = consistency_weight * r(t, consistency_rampup * T)."""
        mt = self.settings.mean_teacher
        return mt.consistency_weight * sigmoid_rampup(self.global_step, mt.consistency_rampup * self.total_steps)

    def consistency_scale_weights(self):
        return self.deep_supervision_weights() if self.settings.mean_teacher.consistency_scales == "all" else None

    # ------------------------------------------------------------------ one iteration
    def teacher_outputs(self, batch: UnlabeledBatch) -> Outputs:
        mt = self.settings.mean_teacher
        return self.teacher(teacher_input_noise(batch.images, mt.teacher_noise_std, mt.teacher_noise_clip))

    def consistency_terms(self, outputs: NetworkOutputs,
                          masks: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        consistency = deep_supervision_consistency(self.consistency_fn, outputs.student, outputs.teacher,
                                                   self.consistency_scale_weights(), masks)
        w = self.consistency_weight()
        terms = {"consistency_loss": consistency.detach(), "consistency_weight": torch.tensor(w),
                 "consistency_term": w * consistency}
        if self.consistency_fn.threshold > 0:  # the fraction of voxels confident enough (last scale used)
            terms["consistency_confident"] = self.consistency_fn.last_confident_fraction
        return terms

    def mix_unlabeled(self, batch: UnlabeledBatch, teacher: Optional[Outputs]):
        """``student_mix: cutmix``: a box of the next patch (cyclically) pasted into each one; the teacher's
        outputs on the unmixed patches, the loader's maps and the hidden labels mixed with the same boxes. The
        keys keep naming the patch outside the box."""
        mt = self.settings.mean_teacher
        if mt.student_mix == "none":
            return batch, teacher
        mix = BoxMix.draw(batch.images.shape, mt.student_mix_volume, device=batch.images.device)
        maps = None if batch.loader_maps is None else [mix(m) for m in batch.loader_maps]
        hidden = None if batch.hidden_labels is None else mix(batch.hidden_labels)
        return UnlabeledBatch(mix(batch.images), list(batch.keys), maps, hidden), mix.outputs(teacher)

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.strong_view is None else self.strong_view(images)

    def unlabeled_diagnostics(self, batch: UnlabeledBatch, outputs: NetworkOutputs) -> Dict[str, float]:
        """Foreground Dice of the teacher's prediction (what the consistency targets come from) and of the
        student's (on what it sees: the strong view with ``student_view: strong``) against the hidden labels;
        NaN where no sample has one."""
        if not self.teacher_diagnostics:
            return {}
        hidden, space = batch.hidden_labels, self.label_space
        reference = hidden[:, 0].long() if hidden is not None and bool((hidden >= 0).any()) else None
        return hidden_label_dice(space, reference,
                                 teacher_dice=space.to_label_map(outputs.probabilities("teacher")),
                                 student_dice=space.to_label_map(outputs.probabilities("student")))

    def on_train_start(self):
        super().on_train_start()
        mt = self.settings.mean_teacher
        if mt.student_mix != "none" and self.unlabeled_batch_size < 2:
            raise ConfigError(f"student_mix={mt.student_mix} pastes boxes between the unlabeled patches of a step, "
                              f"and this rank gets {self.unlabeled_batch_size}. Set unlabeled_batch_size to at "
                              f"least 2 per GPU, or student_mix: none.")
        if not self.resumed:
            # nnU-Net loads -pretrained_weights into the student after initialize(), where the teacher was
            # copied: the teacher starts from the student's weights as they are now
            self.teacher.module.load_state_dict(unwrap(self.network).state_dict())

    def after_optimizer_step(self) -> None:
        # the anchors' update after optimizer step t (0-based): alpha = min(1 - 1/(t + 1), ema_decay), so the first
        # update copies the student (alpha = 0)
        self.teacher.update(self.network, self.global_step)

    # ------------------------------------------------------------------ validation with the predicting weights
    def validation_step(self, batch: dict) -> dict:
        """Online validation (pseudo Dice, hence ``checkpoint_best``) of the weights ``predict_with`` selects."""
        if self.settings.mean_teacher.predict_with != "teacher":
            return super().validation_step(batch)
        student, self.network = self.network, self.teacher.module
        try:
            return super().validation_step(batch)
        finally:
            self.network = student

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, run with the weights ``predict_with`` selects (no weights are swapped when
        ``final_validation`` skips it)."""
        if self.settings.mean_teacher.predict_with != "teacher" or self.skips_final_validation():
            return super().perform_actual_validation(save_probabilities)
        student = unwrap(self.network)
        saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
        student.load_state_dict(self.teacher.state_dict())
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            student.load_state_dict(saved)
