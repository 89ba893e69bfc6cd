"""Mean Teacher on nnU-Net: supervised nnU-Net loss + ramped-up student/teacher consistency on unlabeled patches.

Pieces: EMA teacher (``ssl.ema``), sigmoid ramp-up (``ssl.ramps``), consistency loss (``ssl.consistency``),
unlabeled stream and checkpoints (``training.ssl_trainer``). Settings: ``trainer_configs/mean_teacher.yaml``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import autocast

from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_samssl.ssl.consistency import CONSISTENCY_LOSSES, deep_supervision_consistency
from nnunetv2_samssl.ssl.ema import EMATeacher, unwrap
from nnunetv2_samssl.ssl.ramps import sigmoid_rampup
from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase

Outputs = Union[torch.Tensor, List[torch.Tensor]]


def split_outputs(outputs: Outputs, n_first: int) -> Tuple[Outputs, Outputs]:
    """Splits a network output (or a deep-supervision list) along the batch axis at ``n_first``."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:n_first], outputs[n_first:]
    return [o[:n_first] for o in outputs], [o[n_first:] for o in outputs]


def teacher_input_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``x + clip(N(0, std^2), -clip, clip)`` (the anchors' teacher perturbation)."""
    if std == 0:
        return x
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


class nnUNetTrainerMeanTeacher(nnUNetTrainerSSLBase):
    default_config = "mean_teacher"
    log_panels = {"Mean Teacher losses": ["sup_loss", "consistency_loss"],
                  "SSL weights": ["consistency_weight"]}

    def initialize(self):
        super().initialize()
        self.teacher = EMATeacher(self.network, self.ssl_config["ema_decay"])
        if self._do_i_compile():
            self.teacher.compile()
        self.consistency_fn = CONSISTENCY_LOSSES[self.ssl_config["consistency_loss"]]

    # ------------------------------------------------------------------ schedule
    def consistency_weight(self) -> float:
        """lambda_c(t) = consistency_weight * r(t, consistency_rampup * T)."""
        length = self.ssl_config["consistency_rampup"] * self.total_steps
        return self.ssl_config["consistency_weight"] * sigmoid_rampup(self.global_step, length)

    def consistency_scale_weights(self):
        return self.deep_supervision_weights() if self.ssl_config["consistency_scales"] == "all" else None

    # ------------------------------------------------------------------ one iteration
    def teacher_predict(self, x_u: torch.Tensor) -> Outputs:
        noisy = teacher_input_noise(x_u, self.ssl_config["teacher_noise_std"], self.ssl_config["teacher_noise_clip"])
        return self.teacher(noisy)

    def ssl_losses(self, x_u: torch.Tensor, student_u: Outputs, teacher_u: Outputs,
                   hidden_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Unlabeled-data loss terms, each already multiplied by its weight (keys end in ``_term``); other keys are
        detached metrics. ``hidden_labels`` may only feed logged diagnostics, never a term."""
        consistency = deep_supervision_consistency(self.consistency_fn, student_u, teacher_u,
                                                   self.consistency_scale_weights())
        w = self.consistency_weight()
        return {"consistency_loss": consistency.detach(), "consistency_weight": torch.tensor(w),
                "consistency_term": w * consistency}

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        x_u, hidden_labels = self.next_unlabeled_batch()

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            with torch.no_grad():
                teacher_u = self.teacher_predict(x_u)
            # one fused student forward over labeled and unlabeled patches (instance norm is per sample,
            # so this equals two separate forwards)
            student_l, student_u = split_outputs(self.network(torch.cat((data, x_u))), data.shape[0])
            sup = self.loss(student_l, target)
            terms = self.ssl_losses(x_u, student_u, teacher_u, hidden_labels)
            loss = sup + sum(v for k, v in terms.items() if k.endswith("_term"))
        self.backward_and_step(loss)
        out = {"loss": loss.detach().cpu().numpy(), "sup_loss": sup.detach().cpu().numpy()}
        out.update({k: v.detach().float().cpu().numpy() for k, v in terms.items() if not k.endswith("_term")})
        return out

    def after_optimizer_step(self) -> None:
        # the anchors count iterations from 1 when they update the teacher
        self.teacher.update(self.network, self.global_step + 1)

    # ------------------------------------------------------------------ checkpoints and prediction
    def prediction_weights(self) -> Dict[str, torch.Tensor]:
        if self.ssl_config["predict_with"] == "teacher":
            return self.teacher.state_dict()
        return super().prediction_weights()

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {"teacher_weights": self.teacher.state_dict()}

    def load_extra_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        if "teacher_weights" not in state:
            raise RuntimeError("This checkpoint has no teacher weights, so Mean Teacher training cannot resume from "
                               "it. Start a new training without --c (use -pretrained_weights to initialise "
                               "the student from it).")
        self.teacher.load_state_dict(state["teacher_weights"])

    def validation_step(self, batch: dict) -> dict:
        """Online validation (pseudo Dice, hence ``checkpoint_best``) of the weights ``predict_with`` selects."""
        if self.ssl_config["predict_with"] != "teacher":
            return super().validation_step(batch)
        student, self.network = self.network, self.teacher.module
        try:
            return super().validation_step(batch)
        finally:
            self.network = student

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, run with the weights ``predict_with`` selects."""
        if self.ssl_config["predict_with"] != "teacher":
            return super().perform_actual_validation(save_probabilities)
        student = unwrap(self.network)
        saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
        student.load_state_dict(self.teacher.state_dict())
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            student.load_state_dict(saved)
