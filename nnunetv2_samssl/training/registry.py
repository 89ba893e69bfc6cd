"""Trainers visible to nnU-Net's stock CLI (re-exported by ``trainer_shims/samssl_trainers.py``)."""
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM

__all__ = ["nnUNetTrainerLabeledSubset", "nnUNetTrainerMeanTeacher", "nnUNetTrainerSemiSAM"]
