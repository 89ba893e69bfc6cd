"""Cascade configurations are refused at start, with a message that says what to train instead."""
import json
import os

import pytest

from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM
from trainer_helpers import SAM, make_trainer, tiny_sam  # noqa: F401


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerMeanTeacher, nnUNetTrainerSemiSAM])
def test_cascade_is_refused_with_what_to_use(nnunet_env, trainer_class):
    path = os.path.join(nnunet_env.dataset_pp, "nnUNetPlans.json")
    with open(path) as f:
        plans = json.load(f)
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_fullres"}
    with open(path, "w") as f:
        json.dump(plans, f)
    settings = SAM if trainer_class is nnUNetTrainerSemiSAM else {}
    trainer = make_trainer(trainer_class, nnunet_env, configuration="3d_cascade_fullres", **settings)
    assert trainer.is_cascaded
    with pytest.raises(ConfigError, match="does not train cascade stages.*Train 3d_fullres"):
        trainer.initialize()
