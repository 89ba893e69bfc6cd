"""Trainers visible to nnU-Net's stock CLI (re-exported by ``trainer_shims/samssl_trainers.py``).

Importing it (nnU-Net's trainer lookup does) also makes a settings or data error that ends ``nnUNetv2_train``
print as its one message instead of a traceback (:mod:`nnunetv2_samssl.errors`).
"""
from nnunetv2_samssl.errors import install_excepthook
from nnunetv2_samssl.training.nnUNetTrainerCPACSAM import nnUNetTrainerCPACSAM
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM
from nnunetv2_samssl.training.nnUNetTrainerSFR import nnUNetTrainerSFR

install_excepthook()

__all__ = ["nnUNetTrainerLabeledSubset", "nnUNetTrainerMeanTeacher", "nnUNetTrainerSemiSAM", "nnUNetTrainerSFR",
           "nnUNetTrainerCPACSAM"]
