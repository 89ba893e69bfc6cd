"""SemiSAM on nnU-Net: Mean Teacher + a frozen promptable model whose pseudo-labels supervise the student.

  loss = L_sup + lambda_c(t) L_con(student_u, teacher_u) + lambda_s(t) L_sam(student_u, SAM(x_u, prompts(student_u)))

Pieces: everything of :mod:`nnUNetTrainerMeanTeacher`, the promptable backend (``sam.registry``), the SAM
branch (``sam.branch.SamPseudoLabeler``: space mapping, uncertainty-aware prompts, click loop) and the
pseudo-label losses (``ssl.sam_losses``). Prompts come from the student's (or teacher's) prediction only;
the hidden labels of labeled-subset cases feed logged diagnostics at most.
Settings: ``trainer_configs/semisam.yaml``.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch

from nnunetv2_samssl.config.schema import SEMISAM_SCHEMA
from nnunetv2_samssl.ssl.ramps import sigmoid_rampdown
from nnunetv2_samssl.ssl.sam_losses import SamPseudoLabelLoss
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import Outputs, nnUNetTrainerMeanTeacher


def multiclass_dice(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice over classes present in either map; voxels with reference < 0 are ignored.

    Args:
        prediction: ``(B, *spatial)`` integer labels. reference: ``(B, *spatial)`` integer labels (-1 = unknown).
    """
    known = reference >= 0
    dices = []
    for c in range(1, num_classes):
        p, r = (prediction == c) & known, (reference == c) & known
        denominator = p.sum() + r.sum()
        if denominator > 0:
            dices.append(float(2 * (p & r).sum()) / float(denominator))
    return float(sum(dices) / len(dices)) if dices else float("nan")


class nnUNetTrainerSemiSAM(nnUNetTrainerMeanTeacher):
    config_schema = SEMISAM_SCHEMA
    default_config = "semisam"
    log_panels = {"Mean Teacher losses": ["sup_loss", "consistency_loss"],
                  "SAM loss": ["sam_loss"],
                  "SSL weights": ["consistency_weight", "sam_weight"],
                  "Dice vs hidden labels (logged only)": ["sam_pseudo_dice", "prompt_dice"],
                  "SAM branch": ["sam_time_s", "sam_valid_fraction"]}

    def initialize(self):
        super().initialize()
        from nnunetv2_samssl.sam.branch import SamPseudoLabeler
        from nnunetv2_samssl.sam.registry import build_promptable_model
        cfg = self.ssl_config
        backend_kwargs = {"random_init": cfg["sam_random_init"]}
        if cfg["sam_backend"].startswith("sam_med3d"):
            backend_kwargs["allow_pickle"] = cfg["sam_checkpoint_allow_pickle"]
        self.sam_model = build_promptable_model(cfg["sam_backend"], cfg["sam_checkpoint"], self.device,
                                                **backend_kwargs)
        roi_margin = cfg["sam_roi_margin"]
        if roi_margin is None:
            roi_margin = 0.05 if self.sam_model.input_space.spacing_mm is not None else 0.3
        prompt_kind = cfg["sam_prompt_kind"]
        if prompt_kind == "auto" and cfg["sam_backend"] == "litemedsam":
            prompt_kind = "boxes"
        self.sam_labeler = SamPseudoLabeler(
            self.sam_model, cfg["sam_prompt_mode"], num_clicks=cfg["sam_num_clicks"],
            num_positive=cfg["sam_num_positive"], num_negative=cfg["sam_num_negative"],
            uncertainty_threshold=cfg["sam_uncertainty_threshold"],
            uncertainty_measure=cfg["sam_uncertainty_measure"], prompt_source=cfg["sam_prompt_source"],
            prompt_kind=prompt_kind, slice_axis=cfg["sam_slice_axis"], max_crops=cfg["sam_max_crops"],
            roi_margin=roi_margin, box_margin=cfg["sam_box_margin"])
        scale_weights = self.deep_supervision_weights() if cfg["sam_loss_scales"] == "all" else None
        self.sam_loss = SamPseudoLabelLoss(cfg["sam_loss"], scale_weights)
        self.sam_generator = torch.Generator(device=self.device).manual_seed(12345 + self.local_rank)

    def wants_hidden_label_diagnostics(self) -> bool:
        return self.ssl_config["sam_diagnostics"] in ("auto", True)

    # ------------------------------------------------------------------ schedule
    def sam_weight(self) -> float:
        """lambda_s(t): strong SAM guidance early, vanishing late."""
        w, t, total = self.ssl_config["sam_weight"], self.global_step, self.total_steps
        if self.ssl_config["sam_weight_schedule"] == "exp_decay":
            return w * math.exp(-5.0 * t / max(total, 1))
        return w * sigmoid_rampdown(t, total, self.ssl_config["sam_rampdown"] * total)

    def runs_sam_now(self) -> bool:
        return self.global_step % self.ssl_config["sam_every"] == 0

    # ------------------------------------------------------------------ one iteration
    def ssl_losses(self, x_u: torch.Tensor, student_u: Outputs, teacher_u: Outputs,
                   hidden_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        terms = super().ssl_losses(x_u, student_u, teacher_u, hidden_labels)
        nan = torch.tensor(float("nan"))
        if not self.runs_sam_now():
            terms.update(sam_loss=nan, sam_weight=nan, sam_time_s=nan, sam_valid_fraction=nan,
                         sam_pseudo_dice=nan, prompt_dice=nan)
            return terms
        full_res = lambda o: o[0] if isinstance(o, (list, tuple)) else o  # noqa: E731
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        student_probs = torch.softmax(full_res(student_u).detach().float(), 1)
        teacher_probs = torch.softmax(full_res(teacher_u).float(), 1)
        pseudo = self.sam_labeler(x_u, student_probs, teacher_probs,
                                  patch_spacing=self.configuration_manager.spacing, generator=self.sam_generator)
        if isinstance(student_u, (list, tuple)) and self.ssl_config["sam_loss_scales"] == "all":
            scaled = pseudo.at_scales(self._get_deep_supervision_scales())
            sam_loss = self.sam_loss(list(student_u), [p for p, _ in scaled], [v for _, v in scaled])
        else:
            sam_loss = self.sam_loss(full_res(student_u), pseudo.probabilities, pseudo.valid, pseudo.uncertainty)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        w = self.sam_weight()
        terms.update(sam_term=w * sam_loss, sam_loss=sam_loss.detach(), sam_weight=torch.tensor(w),
                     sam_time_s=torch.tensor(time.perf_counter() - start),
                     sam_valid_fraction=pseudo.valid.float().mean())
        if hidden_labels is not None:  # diagnostics only: nothing below reaches a loss
            reference = hidden_labels[:, 0].long()
            k = student_probs.shape[1]
            terms["sam_pseudo_dice"] = torch.tensor(multiclass_dice(pseudo.hard_label, reference, k))
            terms["prompt_dice"] = torch.tensor(multiclass_dice(student_probs.argmax(1), reference, k))
        else:
            terms.update(sam_pseudo_dice=nan, prompt_dice=nan)
        return terms
