"""Plain nnU-Net training on a labeled subset of a fold's training cases (the supervised baseline).

``nnUNetTrainer`` (its loss, loaders and ``train_step``) plus the labeled-subset mixin the semi-supervised
trainers share: of the fold's training cases only ``num_labeled`` (or the listed ``labeled_cases``) are used,
chosen exactly as the semi-supervised trainers choose their labeled cases (same function, same seed). The other
training cases are not used at all; validation is the fold's validation, unchanged. So
``nnUNetTrainerLabeledSubset`` and ``nnUNetTrainerMeanTeacher`` with ``num_labeled=4`` see the same four labeled
cases, and the difference between them is what the unlabeled cases bring.

Settings: ``trainer_configs/labeled_subset.yaml`` (schedule and subset keys only); the settings used are saved as
``samssl_config.yaml`` and checkpoints are written atomically, as for the semi-supervised trainers.
"""
from __future__ import annotations

from typing import List

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_samssl.training.labeled_subset import LabeledSubsetMixin


class nnUNetTrainerLabeledSubset(LabeledSubsetMixin, nnUNetTrainer):

    @property
    def unused_cases(self) -> List[str]:
        """Training cases of the fold this baseline leaves out."""
        return self.demoted_cases

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"Labeled-subset training: {len(self.labeled_cases)} training cases "
                               f"({len(self.demoted_cases)} left out): {self.labeled_cases}")
