"""SemiSAM on nnU-Net: Mean Teacher + one SAM pseudo-label source.

  loss = L_sup + lambda_c(t) L_con(student_u, teacher_u) + lambda_s(t) L_sam(student_u, SAM(x_u, prompts(student_u)))

The source is chosen by ``sam_pseudo_labels``: ``online`` (SAM on every step's patches, the papers;
:class:`~nnunetv2_samssl.pseudo_labels.sam_online.OnlineSamSource`) or ``cached`` (whole cases every k epochs,
carried through the augmentation; :class:`~nnunetv2_samssl.pseudo_labels.sam_cached.CachedSamSource`), optionally
narrowed by SFR+ confidence selection (``pseudo_label_selection``;
:class:`~nnunetv2_samssl.pseudo_labels.selection.SelectedSource`). Prompts come from the networks' predictions
only; the hidden labels of labeled-subset cases feed logged diagnostics at most.
Settings: ``trainer_configs/semisam.yaml``.
"""
from __future__ import annotations

from nnunetv2_samssl.config.settings import SEMISAM_LAYOUT
from nnunetv2_samssl.pseudo_labels.sam_cached import CachedSamSource
from nnunetv2_samssl.pseudo_labels.sam_online import OnlineSamSource, build_sam_labeler, needs_teacher
from nnunetv2_samssl.pseudo_labels.selection import SelectedSource
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnunet_seam import geometry_only_view


class nnUNetTrainerSemiSAM(nnUNetTrainerMeanTeacher):
    settings_layout = SEMISAM_LAYOUT
    default_config = "semisam"

    def initialize_sources(self) -> None:
        s = self.settings
        channel_names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        labeler = build_sam_labeler(s.sam_model, s.sam_labeler, self.device, channel_names)
        self.sam_model = labeler.model
        context = self.source_context()
        diagnostics = s.sam_source.sam_diagnostics in ("auto", True)
        if s.sam_source.sam_pseudo_labels == "cached":
            source = CachedSamSource(labeler, s.sam_loss, context, s.sam_source.sam_cache_refresh_epochs,
                                     diagnostics=diagnostics, needs_teacher=needs_teacher(s.sam_labeler),
                                     windows=s.sam_source.sam_cache_windows,
                                     embedding_cache_mib=s.sam_source.sam_embedding_cache_mib)
        else:
            source = OnlineSamSource(labeler, s.sam_loss, context, every=s.sam_source.sam_every,
                                     diagnostics=diagnostics)
        if s.selection.pseudo_label_selection != "none":
            source = SelectedSource(source, s.selection.pseudo_label_selection, s.selection.pseudo_label_threshold,
                                    s.selection.pseudo_label_selection_level)
        self.sam_source = source
        self.add_source(source, s.sam_loss.sam_loss, s.sam_loss.sam_loss_scales, s.sam_loss.sam_loss_normalization)

    def unlabeled_transforms(self, transforms):
        """``sam_view: unscaled`` (online mode): SAM sees the unlabeled patches at the configuration's spacing and
        with nnU-Net's normalised intensities, so the unlabeled stream skips nnU-Net's zoom and intensity
        augmentation (the student sees the same patches; labeled batches keep nnU-Net's full augmentation).
        Cached pseudo-labels are made on whole, un-augmented cases anyway."""
        source = self.settings.sam_source
        if source.sam_pseudo_labels == "online" and source.sam_view == "unscaled":
            return geometry_only_view(transforms)
        return transforms
