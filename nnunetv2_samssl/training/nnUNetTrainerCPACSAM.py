"""CPAC-SAM on nnU-Net: cross prompting between two branches, prototype-guided grid prompts, prompt consistency.

  loss = L_sup(A) + L_sup(B)                                   nnU-Net's loss on labeled patches, both branches
       + w_s  L_sam_sup                                        promptable model, label-derived prompts (2 sets)
       + w_c(t) 0.5 [DiceCE(A_u, P_B) + DiceCE(B_u, P_A)]      P_X: promptable model prompted by branch X
       + w_p(t) L_prompt_consistency                           both prompt sets of each P_X pulled to P_X

The two branches are two decoders on one nnU-Net encoder (:class:`~nnunetv2_samssl.networks.dual_decoder.
DualDecoderNetwork`, built by :meth:`build_network_architecture`, so ``nnUNetv2_predict`` builds the same
network and predicts with the mean of both branches from the image alone). The promptable model is trained
(mask decoder with one output per class, class point embeddings, optionally LoRA on the image encoder; a part
of :attr:`parts` with its own AdamW, saved in the checkpoint without its frozen weights and never in
``network_weights``). Warm-up: the cross and consistency terms start after ``cpac_warmup`` of the training.
One update per iteration over all three losses (the public code takes three optimizer steps per iteration).
Settings: ``trainer_configs/cpac_sam.yaml``. The promptable-model side: :mod:`nnunetv2_samssl.pseudo_labels.cpac`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.config.settings import CPAC_LAYOUT
from nnunetv2_samssl.networks.dual_decoder import DualDecoderNetwork
from nnunetv2_samssl.pseudo_labels.base import UnlabeledBatch, as_scales
from nnunetv2_samssl.pseudo_labels.cpac import CrossPrompting
from nnunetv2_samssl.pseudo_labels.loss import PseudoLabelLoss
from nnunetv2_samssl.pseudo_labels.sam_online import build_promptable
from nnunetv2_samssl.sam.trainable import ClassPromptedSegmenter
from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase, split_outputs

UNLABELED_KEYS = ("cpac_consistency_loss", "cpac_points_unlabeled", "cpac_valid_fraction_a", "cpac_valid_fraction_b",
                  "cpac_reliable_fraction_a", "cpac_reliable_fraction_b", "cpac_pseudo_dice_from_a",
                  "cpac_pseudo_dice_from_b")
PANELS = {"CPAC-SAM losses": ["sup_loss", "cpac_sam_sup_loss", "cpac_cross_loss", "cpac_consistency_loss"],
          "CPAC-SAM weights": ["cpac_cross_weight", "cpac_consistency_weight"],
          "CPAC-SAM pseudo-labels": ["cpac_valid_fraction_a", "cpac_valid_fraction_b", "cpac_reliable_fraction_a",
                                     "cpac_reliable_fraction_b", "cpac_pseudo_dice_from_a", "cpac_pseudo_dice_from_b"]}


class nnUNetTrainerCPACSAM(nnUNetTrainerSSLBase):
    settings_layout = CPAC_LAYOUT
    default_config = "cpac_sam"
    log_panels = PANELS

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """nnU-Net's network with a second decoder (also what ``nnUNetv2_predict`` builds for this trainer)."""
        network = super(nnUNetTrainerCPACSAM, nnUNetTrainerCPACSAM).build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        return DualDecoderNetwork(network)

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        super().initialize()  # the dual network, nnU-Net's SGD over both branches, the student part
        if self.label_space.has_regions:
            raise ConfigError("nnUNetTrainerCPACSAM trains label-based datasets: its promptable model predicts one "
                              "class per voxel from class-labelled points; this dataset is region-based "
                              "(regions_class_order). Use nnUNetTrainerSemiSAM or nnUNetTrainerMeanTeacher.")
        s = self.settings
        c = s.cpac
        num_classes = self.label_manager.num_segmentation_heads
        channel_names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        model = build_promptable(s.sam_model, self.device, channel_names)
        segmenter = ClassPromptedSegmenter(model, num_classes, lora_rank=c.cpac_lora_rank,
                                           train_prompt_encoder=c.cpac_train_prompt_encoder).to(self.device)
        self.cpac = CrossPrompting(
            segmenter, num_classes, self.configuration_manager.spacing,
            densities=(c.cpac_density_1, c.cpac_density_2), feature_source=c.cpac_feature_source,
            momentum=c.cpac_prototype_momentum, max_points_per_class=c.cpac_max_points_per_class,
            max_crops=c.cpac_max_crops, slice_axis=c.cpac_slice_axis,
            deep_supervision_scales=self._get_deep_supervision_scales() if self.enable_deep_supervision else None,
        ).to(self.device)
        params = [p for p in self.cpac.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.cpac_sam_lr, weight_decay=c.cpac_sam_weight_decay)
        scheduler = PolyLRScheduler(optimizer, c.cpac_sam_lr, self.num_epochs)
        self.parts.add("sam", self.cpac, optimizer, scheduler, compact=True)
        self.cross_loss = PseudoLabelLoss("dice_ce", num_classes, self.deep_supervision_weights(), "valid")
        rank = dist.get_rank() if self.is_ddp else 0
        self.prompt_generator = torch.Generator(device=self.device).manual_seed(12345 + rank)
        self.finish_initialize()

    def wants_hidden_labels(self) -> bool:
        return True  # labeled-subset mode: the pseudo-labels' Dice is logged (never a target)

    def synchronize_gradients(self) -> None:
        """The promptable model is not wrapped in DDP (its calls are not one ``forward``): average its gradients."""
        if not self.is_ddp:
            return
        world = dist.get_world_size()
        for p in self.cpac.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world

    def prepare_for_speed_benchmark(self) -> None:
        """Speed benchmarks time steps after the warm-up (the timed steps are the first ones of a training, when
        the cross terms would still be off)."""
        self._timing_after_warmup = True

    # ------------------------------------------------------------------ schedule
    def cross_weights(self):
        """``(w_c, w_p)`` of this step: 0 during the warm-up, then the settings' values (the public code's step)."""
        c = self.settings.cpac
        if self.global_step < c.cpac_warmup * self.total_steps and not getattr(self, "_timing_after_warmup", False):
            return 0.0, 0.0
        return c.cpac_cross_weight, c.cpac_consistency_weight

    # ------------------------------------------------------------------ one iteration
    def train_step(self, batch: dict) -> dict:
        data, target = self.labeled_on_device(batch)
        unlabeled = self.next_unlabeled_batch()
        b_l = data.shape[0]
        c = self.settings.cpac
        w_cross, w_consistency = self.cross_weights()
        network_features = c.cpac_feature_source == "network"
        wide = self.learns_unannotated  # unannotated voxels of labeled patches get the cross terms too
        masks = self.unannotated_masks(target, unlabeled.images.shape[0]) if wide else None

        self.parts.zero_grad()
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            outputs = self.network(torch.cat((data, unlabeled.images)), branches=True, features=network_features)
            out_a, out_b = outputs[0], outputs[1]
            features = outputs[2] if network_features else None
            a_l, a_u = split_outputs(out_a, b_l)
            b_l_out, b_u = split_outputs(out_b, b_l)
            sup = self.loss(a_l, target) + self.loss(b_l_out, target)
            full_target = as_scales(target)[0]
            sam_sup, metrics = self.cpac.labeled(
                data, full_target, None if features is None else (features[0][:b_l], features[1][:b_l]),
                generator=self.prompt_generator)
            loss = sup + c.cpac_sam_supervised_weight * sam_sup
            cross = consistency = None
            if w_cross > 0 or w_consistency > 0:
                images = torch.cat((data, unlabeled.images)) if wide else unlabeled.images
                branch_a, branch_b = (out_a, out_b) if wide else (a_u, b_u)
                probs = [torch.softmax(as_scales(o)[0].detach().float(), 1) for o in (branch_a, branch_b)]
                feats = None
                if features is not None:
                    feats = tuple(f if wide else f[b_l:] for f in features)
                hidden = self.hidden_labels_for(unlabeled, b_l, wide)
                result = self.cpac.unlabeled(images, probs[0], probs[1], feats, generator=self.prompt_generator,
                                             hidden_labels=hidden)
                if masks is not None:
                    for t in result.targets.values():
                        t.valid = [v & m for v, m in zip(t.valid, masks)]
                cross = 0.5 * (self.cross_loss(branch_a, result.targets["a"])
                               + self.cross_loss(branch_b, result.targets["b"]))
                consistency = result.consistency
                loss = loss + w_cross * cross + w_consistency * consistency
                metrics.update(result.metrics)
        self.backward_and_step(loss)
        self.iteration_in_epoch += 1
        out = {"loss": loss.detach().cpu().numpy(), "sup_loss": sup.detach().cpu().numpy(),
               "cpac_cross_loss": np.nan if cross is None else float(cross.detach()),
               "cpac_cross_weight": w_cross, "cpac_consistency_weight": w_consistency}
        out.update({k: np.nan for k in UNLABELED_KEYS})  # every step logs every key (nnU-Net collates the first's)
        out.update(metrics)
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    def hidden_labels_for(self, unlabeled: UnlabeledBatch, b_l: int, wide: bool) -> Optional[torch.Tensor]:
        """Hidden labels (diagnostics only) aligned with the patches the unlabeled terms see."""
        hidden = unlabeled.hidden_labels
        if hidden is None or not wide:
            return hidden
        return torch.cat((hidden.new_full((b_l, *hidden.shape[1:]), -1), hidden))
