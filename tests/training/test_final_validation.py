"""``final_validation``: nnU-Net's validation after the last epoch, skipped on request, never under ``--val``."""
import os
import sys

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from trainer_helpers import make_trainer
from nnunetv2_samssl.ssl.ema import unwrap
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerLabeledSubset, nnUNetTrainerMeanTeacher])
def test_final_validation_false_skips_nnunets_validation_and_val_still_runs_it(nnunet_env, monkeypatch,
                                                                               trainer_class):
    calls = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: calls.append(save_probabilities))
    as_nnunet = make_trainer(trainer_class, nnunet_env, num_labeled=2)
    as_nnunet.initialize()  # Mean Teacher validates with the teacher's weights: swapped in around nnU-Net's call
    as_nnunet.perform_actual_validation(True)
    assert calls == [True]  # the default validates, as nnU-Net does

    skipping = make_trainer(trainer_class, nnunet_env, num_labeled=2, final_validation=False)
    skipping.initialize()
    skipping.perform_actual_validation(True)
    assert calls == [True]
    with open(skipping.log_file) as f:
        assert "final_validation is false" in f.read()

    monkeypatch.setattr(sys, "argv", [os.path.join("venv", "bin", "nnUNetv2_train"), "1", "3d_fullres", "0", "--val"])
    skipping.perform_actual_validation(False)
    assert calls == [True, False]  # nnUNetv2_train ... --val asks for the validation: it runs


def test_mean_teacher_validates_with_the_teacher_and_swaps_nothing_when_skipped(nnunet_env, monkeypatch):
    seen = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.append(
                            {k: v.clone() for k, v in unwrap(self.network).state_dict().items()}))
    for final_validation in (True, False):
        trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, num_labeled=2, predict_with="teacher",
                               final_validation=final_validation)
        trainer.initialize()
        with torch.no_grad():
            for p in trainer.teacher.module.parameters():
                p.add_(1.0)  # teacher and student differ
        student = unwrap(trainer.network)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        loads = []
        original_load = student.load_state_dict
        monkeypatch.setattr(student, "load_state_dict", lambda sd, *a, **k: loads.append(1) or original_load(sd, *a, **k))
        trainer.perform_actual_validation(False)
        after = student.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the student's weights come back
        if final_validation:
            teacher = trainer.teacher.state_dict()
            assert all(torch.equal(seen[-1][k], teacher[k]) for k in teacher)  # nnU-Net validated the teacher
            assert len(loads) == 2
        else:
            assert len(seen) == 1 and loads == []  # skipped: nothing validated, no weights copied in and out
