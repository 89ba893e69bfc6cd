"""SFR+ confidence selection over any pseudo-label source."""
import math
import os

import numpy as np
import pytest
import torch

from trainer_helpers import SAM, tiny_sam  # noqa: F401  (tiny_sam: an autouse fixture)
from trainer_helpers import make_trainer, seed_everything
from nnunetv2_samssl.pseudo_labels.base import (NetworkOutputs, PseudoLabelSource, PseudoTargets, StepInfo,
                                                UnlabeledBatch)
from nnunetv2_samssl.pseudo_labels.selection import SelectedSource
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM


class FixedSource(PseudoLabelSource):
    name = "fixed"

    def __init__(self, targets):
        self.targets = targets

    def pseudo_labels(self, batch, outputs, step):
        return self.targets


def _logits(probabilities):
    return torch.log(torch.as_tensor(probabilities, dtype=torch.float32))


def test_confidence_and_agreement_select_exactly_the_right_voxels():
    # 1 sample, 2 classes, 4 voxels; hard pseudo-label [1, 1, 0, 0], the last voxel already invalid
    labels = torch.tensor([[1, 1, 0, 0]])
    valid = torch.tensor([[True, True, True, False]])
    teacher = _logits([[[0.05, 0.4, 0.95, 0.5], [0.95, 0.6, 0.05, 0.5]]])  # p(class 1) = .95 .6 .05 .5
    student = _logits([[[0.2, 0.7, 0.9, 0.1], [0.8, 0.3, 0.1, 0.9]]])  # argmax 1 0 0 1
    outputs = NetworkOutputs(student, teacher)
    batch = UnlabeledBatch(torch.zeros(1, 1, 4), ["a"])
    targets = PseudoTargets([labels], [valid], 0.5, metrics={"fixed_time_s": 1.0})

    chosen = SelectedSource(FixedSource(targets), "confidence", 0.9).pseudo_labels(batch, outputs, StepInfo(0, 1))
    assert chosen.valid[0].tolist() == [[True, False, True, False]]  # teacher's p of the pseudo class .95 .6 .95
    assert chosen.metrics["fixed_selected_fraction"] == pytest.approx(2 / 3)
    assert chosen.weight == 0.5 and chosen.metrics["fixed_time_s"] == 1.0 and chosen.targets[0] is labels

    agree = SelectedSource(FixedSource(targets), "agreement").pseudo_labels(batch, outputs, StepInfo(0, 1))
    assert agree.valid[0].tolist() == [[True, False, True, False]]  # student argmax 1 0 0 (1: invalid anyway)

    # case level: mean confidence over the valid voxels (.95 + .6 + .95) / 3 = .833
    keep = SelectedSource(FixedSource(targets), "confidence", 0.8, "case").pseudo_labels(batch, outputs,
                                                                                           StepInfo(0, 1))
    drop = SelectedSource(FixedSource(targets), "confidence", 0.85, "case").pseudo_labels(batch, outputs,
                                                                                            StepInfo(0, 1))
    assert torch.equal(keep.valid[0], valid) and not drop.valid[0].any()
    assert drop.metrics["fixed_selected_fraction"] == 0.0


def test_soft_targets_are_judged_by_their_argmax_and_no_targets_stay_none():
    probabilities = torch.tensor([[[0.2, 0.7], [0.8, 0.3]]])  # argmax 1, 0
    valid = torch.ones(1, 2, dtype=torch.bool)
    teacher = _logits([[[0.1, 0.6], [0.9, 0.4]]])
    outputs = NetworkOutputs(teacher, teacher)
    batch = UnlabeledBatch(torch.zeros(1, 1, 2), ["a"])
    chosen = SelectedSource(FixedSource(PseudoTargets([probabilities], [valid], 1.0)), "confidence", 0.7)
    assert chosen.pseudo_labels(batch, outputs, StepInfo(0, 1)).valid[0].tolist() == [[True, False]]
    assert SelectedSource(FixedSource(None)).pseudo_labels(batch, outputs, StepInfo(0, 1)) is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_selection_wraps_both_sam_sources_and_is_logged_and_drawn(nnunet_env, mode):
    def train(threshold):
        seed_everything(0)
        extra = dict(sam_pseudo_labels=mode, sam_cache_refresh_epochs=1) if mode == "cached" else {}
        trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, num_labeled=2, use_unlabeled_folder=False,
                               sam_diagnostics=False, pseudo_label_selection="confidence",
                               pseudo_label_threshold=threshold, num_epochs=2, **SAM, **extra)
        outs = []
        train_step = trainer.train_step
        trainer.train_step = lambda batch: outs.append(train_step(batch)) or outs[-1]
        trainer.run_training()  # cached: the first generation is made at epoch 1
        return trainer, [o for o in outs if np.isfinite(o["sam_loss"])]

    everything, outs_all = train(0.0)
    assert outs_all and all(o["sam_selected_fraction"] == 1.0 for o in outs_all)
    nothing, outs_none = train(1.0)  # a softmax never reaches probability 1 exactly here: nothing selected
    assert outs_none and all(o["sam_selected_fraction"] == 0.0 and o["sam_loss"] == 0.0 for o in outs_none)
    assert all(o["sam_loss"] > 0 for o in outs_all)
    log = everything.logger.local_logger
    assert log.my_fantastic_logging["sam_selected_fraction"][-1] == 1.0
    assert any("sam_selected_fraction" in keys for keys in log.panels.values())  # a panel of progress.png
    assert os.path.isfile(os.path.join(everything.output_folder, "progress.png"))
    assert math.isclose(nothing.logger.local_logger.my_fantastic_logging["sam_selected_fraction"][-1], 0.0)
