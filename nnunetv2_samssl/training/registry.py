"""Trainers visible to nnU-Net's stock CLI (re-exported by ``trainer_shims/samssl_trainers.py``)."""
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher

__all__ = ["nnUNetTrainerMeanTeacher"]
