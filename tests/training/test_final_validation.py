"""``final_validation``: nnU-Net's validation after the last epoch, skipped on request, never under ``--val``."""
import os
import sys

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from trainer_helpers import make_trainer
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
