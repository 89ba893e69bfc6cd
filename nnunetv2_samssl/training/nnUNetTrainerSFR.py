"""SFR on nnU-Net: Stitching, Fine-tuning, Re-training (SFR and SFR+).

Stage 1 (``nnUNetv2_samssl_sfr_finetune -d D -c C -f F``, :mod:`nnunetv2_samssl.training.sfr_finetune`): a 2D
promptable model is fine-tuned, prompt-free, on stitched labeled patches of the fold (nnU-Net's own loader and
augmentation, labeled cases only): frozen image encoder with rank-r LoRA on q and v, a re-initialised K-class
mask decoder, ``0.5 (CE + Dice)``, AdamW. The result lands in ``<fold folder>/sfr_finetune/``.

Stage 2 (this trainer): Mean Teacher whose unlabeled patches also get the fine-tuned model's hard
pseudo-labels (stitch -> model -> un-stitch -> argmax) with ``sfr_weight x (CE + Dice)``; whole cases labelled
once and cached (default) or every step's patches online. SFR+ (``pseudo_label_selection``) keeps only the
confident voxels or cases and logs the selected fraction. The fine-tuned model serves the re-training only:
the checkpoints hold nnU-Net's network, and ``nnUNetv2_predict`` predicts with it alone.
Settings: ``trainer_configs/sfr.yaml``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.config.settings import SFR_LAYOUT
from nnunetv2_samssl.pseudo_labels.selection import SelectedSource
from nnunetv2_samssl.pseudo_labels.sfr import CachedSfrSource, OnlineSfrSource, StitchedSegmenter
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase

SFR_FOLDER = "sfr_finetune"
SFR_MODEL = "sfr_model.pth"


class nnUNetTrainerSFR(nnUNetTrainerMeanTeacher):
    settings_layout = SFR_LAYOUT
    default_config = "sfr"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._labeled_only = False

    # ------------------------------------------------------------------ the fine-tuned model
    @property
    def sfr_folder(self) -> str:
        return os.path.join(self.output_folder, SFR_FOLDER)

    def finetune_command(self) -> str:
        plans = "" if self.plans_manager.plans_name == "nnUNetPlans" else f" -p {self.plans_manager.plans_name}"
        return (f"nnUNetv2_samssl_sfr_finetune -d {self.plans_manager.dataset_name} -c {self.configuration_name} "
                f"-f {self.fold}{plans}")

    def model_meta(self) -> Dict[str, Any]:
        """What a fine-tuned model must agree on with these settings to be loaded."""
        s = self.settings
        return {"sam_backend": s.sam_model.sam_backend, "num_classes": self.label_manager.num_segmentation_heads,
                "sfr_lora_rank": s.sfr_finetune.sfr_lora_rank, "sfr_slice_axis": s.sfr_finetune.sfr_slice_axis,
                "configuration": self.configuration_name}

    def build_segmenter(self) -> StitchedSegmenter:
        """The 2D promptable model of ``sam_backend`` as a prompt-free K-class segmenter on stitched patches."""
        from nnunetv2_samssl.pseudo_labels.sam_online import resolve_image_channel
        from nnunetv2_samssl.sam import registry
        from nnunetv2_samssl.sam.trainable import PromptFreeSegmenter

        s = self.settings
        if self.label_space.has_regions:
            raise ConfigError("nnUNetTrainerSFR trains label-based datasets: its fine-tuned model predicts one class "
                              "per voxel; this dataset is region-based (regions_class_order). Use "
                              "nnUNetTrainerSemiSAM or nnUNetTrainerMeanTeacher.")
        if s.sam_model.sam_backend.startswith("sam_med3d"):
            raise ConfigError(f"SFR stitches slices for a 2D promptable model; sam_backend="
                              f"{s.sam_model.sam_backend} is 3D. Choose litemedsam or sam2d_vit_b/l/h.")
        channel_names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        model = registry.build_promptable_model(
            s.sam_model.sam_backend, s.sam_model.sam_checkpoint, self.device,
            random_init=s.sam_model.sam_random_init,
            image_channel=resolve_image_channel(s.sam_model.sam_image_channel, channel_names, True))
        segmenter = PromptFreeSegmenter.from_promptable(model, self.label_manager.num_segmentation_heads,
                                                        lora_rank=s.sfr_finetune.sfr_lora_rank).to(self.device)
        return StitchedSegmenter(segmenter, len(self.configuration_manager.patch_size),
                                 s.sfr_finetune.sfr_slice_axis)

    def load_finetuned(self) -> StitchedSegmenter:
        """Stage 1's model, frozen; a clear error naming the command to run when it is missing or does not match."""
        path = os.path.join(self.sfr_folder, SFR_MODEL)
        if not os.path.isfile(path):
            raise ConfigError(f"nnUNetTrainerSFR needs the model fine-tuned in stage 1 ({path} is missing). Run "
                              f"`{self.finetune_command()}` first, with the same settings (nnUNet_samssl_config / "
                              f"nnUNet_samssl_overrides).")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expected = self.model_meta()
        differ = {k: (saved["meta"].get(k), v) for k, v in expected.items() if saved["meta"].get(k) != v}
        if differ:
            raise ConfigError(f"The fine-tuned model {path} was made with other settings than this training "
                              + ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())
                              + f". Re-run `{self.finetune_command()}` or train with its settings.")
        stitched = self.build_segmenter()
        stitched.segmenter.load_trainable_state_dict(saved["trainable"])
        stitched.segmenter.requires_grad_(False)
        stitched.segmenter.eval()
        stitched.segmenter.merge_lora()  # inference only from here: one matmul per projection
        return stitched

    def prepare_for_speed_benchmark(self) -> None:
        """Speed benchmarks only (in their scratch results folder): stage 2 needs stage 1's model, whose weights do
        not change what a step costs, so the un-fine-tuned model (initial LoRA and decoder) stands in for it."""
        from nnunetv2_samssl.training.checkpointing import atomic_torch_save
        path = os.path.join(self.sfr_folder, SFR_MODEL)
        if os.path.isfile(path):
            return
        os.makedirs(self.sfr_folder, exist_ok=True)
        atomic_torch_save({"trainable": self.build_segmenter().segmenter.trainable_state_dict(),
                           "meta": self.model_meta(), "losses": []}, path)

    # ------------------------------------------------------------------ stage 2
    def initialize_sources(self) -> None:
        s = self.settings
        stitched = self.load_finetuned()
        context = self.source_context()
        all_scales = self.enable_deep_supervision
        if s.sfr_retrain.sfr_pseudo_labels == "cached":
            # Dice of the pseudo-labels of labeled-subset cases against their hidden labels: logged only
            source = CachedSfrSource(stitched, context, s.sfr_retrain.sfr_weight, all_scales, diagnostics=True,
                                     total_epochs=self.num_epochs)
        else:
            source = OnlineSfrSource(stitched, context, s.sfr_retrain.sfr_weight, all_scales)
        if s.selection.pseudo_label_selection != "none":
            source = SelectedSource(source, s.selection.pseudo_label_selection, s.selection.pseudo_label_threshold,
                                    s.selection.pseudo_label_selection_level)
        self.sfr_source = source
        self.add_source(source, "dice_ce", "all" if all_scales else "full_res", "valid")

    # ------------------------------------------------------------------ stage 1's data
    def labeled_dataloaders(self, batch_size: Optional[int] = None):
        """nnU-Net's training and validation loaders over the fold's labeled cases only (labeled-subset mode
        respected), with nnU-Net's augmentation: what stage 1 fine-tunes on (``batch_size`` patches a batch;
        ``None``: the plans')."""
        self._set_batch_size_and_oversample()  # nnU-Net's, as initialize() does (DDP share included)
        if batch_size is not None:
            self.batch_size = batch_size
        self._labeled_only = True
        try:
            return nnUNetTrainer.get_dataloaders(self)
        finally:
            self._labeled_only = False

    def get_tr_and_val_datasets(self):
        if self._labeled_only:
            return super(nnUNetTrainerSSLBase, self).get_tr_and_val_datasets()
        return super().get_tr_and_val_datasets()
