"""Plain nnU-Net training on a labeled subset of a fold's training cases (the supervised baseline).

This is ``nnUNetTrainer`` (its loss, loaders and ``train_step``) with one change: of the fold's training
cases only ``num_labeled`` (or the listed ``labeled_cases``) are used, chosen exactly as the
semi-supervised trainers choose their labeled cases in labeled-subset mode (same function, same seed).
The other training cases are not used at all; validation is the fold's validation, unchanged. So
``nnUNetTrainerLabeledSubset`` and ``nnUNetTrainerMeanTeacher`` with ``num_labeled=4`` see the same four
labeled cases, and the difference between them is what the unlabeled cases bring.

Settings: ``trainer_configs/labeled_subset.yaml`` (schedule and subset keys only). It shares the settings
handling, the saved ``samssl_config.yaml`` and the atomic checkpoints of the semi-supervised trainers.
"""
from __future__ import annotations

from typing import List, Sequence

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_samssl.config.schema import LABELED_SUBSET_SCHEMA
from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase


class nnUNetTrainerLabeledSubset(nnUNetTrainerSSLBase):
    config_schema = LABELED_SUBSET_SCHEMA
    default_config = "labeled_subset"
    log_panels = {}
    train_step = nnUNetTrainer.train_step  # nnU-Net's own supervised step

    @property
    def unused_cases(self) -> List[str]:
        """Training cases of the fold this baseline leaves out."""
        return self.demoted_cases

    def _build_unlabeled_dataset(self, demoted: Sequence[str]):
        return None  # the left-out cases are not used at all

    def get_dataloaders(self):
        return nnUNetTrainer.get_dataloaders(self)

    def on_train_start(self):
        nnUNetTrainer.on_train_start(self)
        self.save_effective_config()
        self.print_to_log_file(f"Labeled-subset training: {len(self.labeled_cases)} training cases "
                               f"({len(self.demoted_cases)} left out): {self.labeled_cases}")
