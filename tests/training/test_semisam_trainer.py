"""nnUNetTrainerSemiSAM in-process on the tiny dataset with a tiny random-weight SAM-Med3D (CPU)."""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from test_mean_teacher_trainer import _corrupt_labels
from trainer_helpers import BUILT, SAM, make_trainer, run_iterations, seed_everything, student_state
from trainer_helpers import tiny_sam  # noqa: F401  (an autouse fixture)
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.config.settings import PseudoLabelLossSettings
from nnunetv2_samssl.evaluation.metrics import mean_foreground_dice
from nnunetv2_samssl.pseudo_labels.base import StepInfo
from nnunetv2_samssl.pseudo_labels.sam_online import sam_weight
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM


def test_sam_weight_ramps_down():
    settings = PseudoLabelLossSettings(sam_loss="soft_mse", sam_loss_scales="full_res", sam_target="hard",
                                       sam_loss_normalization="patch", sam_weight=0.1,
                                       sam_weight_schedule="sigmoid_rampdown", sam_rampdown=1.0)
    weights = [sam_weight(settings, StepInfo(step, 100)) for step in (0, 50, 90)]
    assert weights[0] == pytest.approx(0.1) and weights[0] > weights[1] > weights[2]
    assert sam_weight(settings, StepInfo(100, 100)) == pytest.approx(0.1 * math.exp(-5))
    settings = dataclasses.replace(settings, sam_weight_schedule="exp_decay")
    assert sam_weight(settings, StepInfo(50, 100)) == pytest.approx(0.1 * math.exp(-2.5))


def test_missing_sam_checkpoint_names_the_setting(nnunet_env):
    with pytest.raises(ConfigError, match="'sam_checkpoint' is required for sam_backend 'sam_med3d_turbo'"):
        make_trainer(nnUNetTrainerSemiSAM, nnunet_env)


def _foreground_dice(prediction, reference, num_classes):
    """Mean Dice over the foreground classes present in either map, voxels with reference < 0 not counted
    (written out here, independent of the package's helper)."""
    prediction, reference = prediction.cpu().numpy(), reference.cpu().numpy()
    counted = reference >= 0
    scores = []
    for c in range(1, num_classes):
        p, r = (prediction == c) & counted, (reference == c) & counted
        tp, fp, fn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def test_one_epoch_trains_logs_sam_metrics_and_diagnostics(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, num_epochs=1, num_labeled=2, use_unlabeled_folder=False,
                           **SAM)
    steps, calls = [], []
    train_step = trainer.train_step

    def recording(batch):
        out = train_step(batch)
        steps.append({k: float(v) for k, v in out.items()})
        return out

    trainer.train_step = recording
    trainer.initialize()
    source = trainer.sam_source
    pseudo_labels = source.pseudo_labels

    def spy(batch, outputs, step):  # what the source saw and returned, for an independent recomputation
        targets = pseudo_labels(batch, outputs, step)
        student = outputs.student[0] if isinstance(outputs.student, (list, tuple)) else outputs.student
        calls.append(dict(step=step.step, hidden=batch.hidden_labels.clone(), student=student.detach().clone(),
                          targets=targets))
        return targets

    source.pseudo_labels = spy
    trainer.run_training()

    assert BUILT[-1][0] == "sam_med3d" and BUILT[-1][2]["random_init"] is True
    assert len(steps) == 2 and [c["step"] for c in calls] == [0, 1] and trainer.total_steps == 2
    # lambda_s(t) = 0.1 * r(T - t, T) = 0.1 * exp(-5 (1 - (T - t) / T)^2) at t = 0, 1 of T = 2
    expected_w = [0.1, 0.1 * math.exp(-5 * 0.25)]
    assert [o["sam_weight"] for o in steps] == pytest.approx(expected_w, rel=1e-6)
    assert [c["targets"].weight for c in calls] == pytest.approx(expected_w, rel=1e-12)
    for o in steps:  # loss = L_sup + lambda_c L_con + lambda_s L_sam, nothing else
        assert np.isfinite(o["sam_loss"]) and o["sam_loss"] > 0 and o["sam_time_s"] > 0
        assert o["loss"] == pytest.approx(o["sup_loss"] + o["consistency_weight"] * o["consistency_loss"]
                                          + o["sam_weight"] * o["sam_loss"], rel=1e-5)

    # labeled-subset mode: both Dice diagnostics, recomputed from the hidden labels the step carried, the student
    # logits of the step and the SAM targets it returned
    k = trainer.label_manager.num_segmentation_heads
    for o, c in zip(steps, calls):
        reference = c["hidden"][:, 0].long()
        assert (reference >= 0).all() and (reference > 0).any()  # only demoted cases here, foreground present
        prompt = _foreground_dice(c["student"].argmax(1), reference, k)
        pseudo = _foreground_dice(c["targets"].hard_labels(), reference, k)
        assert np.isfinite(prompt) and np.isfinite(pseudo)
        assert o["prompt_dice"] == pytest.approx(prompt, rel=1e-6)
        assert o["sam_pseudo_dice"] == pytest.approx(pseudo, rel=1e-6)
        assert mean_foreground_dice(c["student"].argmax(1), reference, k) == pytest.approx(prompt, rel=1e-12)
    # the random tiny SAM scores 0 here, so also check (last step) that the pseudo-label Dice follows its input: the
    # hidden labels themselves as pseudo-label score 1, the student's prediction scores as the prompt Dice
    probe = source.dice_diagnostics(reference, reference, c["student"].argmax(1))
    assert probe["sam_pseudo_dice"] == pytest.approx(1.0) and probe["prompt_dice"] == pytest.approx(prompt, rel=1e-6)

    # the epoch's logged values are the (NaN-aware) means of the per-step outputs
    log = trainer.logger.local_logger.my_fantastic_logging
    for key in ("sam_loss", "sam_weight", "sam_pseudo_dice", "prompt_dice", "sam_time_s", "sam_valid_fraction",
                "consistency_loss", "consistency_weight", "sup_loss"):
        assert len(log[key]) == 1, key
        assert log[key][0] == pytest.approx(np.nanmean([o[key] for o in steps]), rel=1e-6), key
    assert log["sam_weight"][0] == pytest.approx(np.mean(expected_w), rel=1e-6)
    assert os.path.isfile(os.path.join(trainer.output_folder, "progress.png"))


def _train(env, n_iter=2, **extra):
    seed_everything(7)
    trainer = make_trainer(nnUNetTrainerSemiSAM, env, num_labeled=2, use_unlabeled_folder=False, **SAM, **extra)
    seen = []
    source_terms = trainer.source_terms

    def spy(source, batch, outputs, masks=None):
        seen.append(batch.hidden_labels.clone())
        return source_terms(source, batch, outputs, masks)

    trainer.source_terms = spy
    outs = run_iterations(trainer, n_iter)
    return trainer, student_state(trainer), outs, seen


def test_hidden_labels_reach_only_the_logged_diagnostics(nnunet_env):
    trainer, student_a, outs_a, hidden_a = _train(nnunet_env)
    assert trainer.unlabeled_dataset.hidden_label_cases == frozenset(trainer.demoted_cases)
    _corrupt_labels(nnunet_env, trainer.demoted_cases)
    _, student_b, outs_b, hidden_b = _train(nnunet_env)
    for k in student_a:
        assert torch.equal(student_a[k], student_b[k]), k
    for a, b in zip(outs_a, outs_b):
        assert a["sam_loss"] == b["sam_loss"] and a["loss"] == b["loss"]
    # ... while the diagnostics path did carry the (corrupted) hidden labels
    assert all((a >= 0).all() for a in hidden_a)
    assert any(not torch.equal(a, b) for a, b in zip(hidden_a, hidden_b))


def test_sam_loss_changes_the_student_gradient(nnunet_env, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: None)
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, sam_diagnostics=False, **SAM)
    trainer.on_train_start()
    batch = next(trainer.dataloader_train)
    x_u = trainer.next_unlabeled_batch()
    trainer.optimizer.step = lambda *a, **k: None
    trainer.after_optimizer_step = lambda: None
    trainer.next_unlabeled_batch = lambda: x_u
    trainer.consistency_weight = lambda: 0.0
    source = trainer.sam_source
    loss_settings = source.loss_settings

    def grads(w):
        trainer.optimizer.zero_grad(set_to_none=True)
        source.loss_settings = dataclasses.replace(loss_settings, sam_weight=w)
        trainer.iteration_in_epoch = 0  # step 0: lambda_s = w
        source.generator.manual_seed(3)
        torch.manual_seed(3)
        trainer.train_step(batch)
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                          for p in trainer.network.parameters()])

    g0, g1, g2 = grads(0.0), grads(1.0), grads(2.0)
    assert (g1 - g0).norm() > 1e-6 * g0.norm()
    assert (g2 - g0 - 2 * (g1 - g0)).norm() < 1e-3 * (g1 - g0).norm()


def test_sam_every_skips_the_branch(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, sam_every=2, **SAM)
    outs = run_iterations(trainer, 2)
    assert np.isfinite(outs[0]["sam_loss"]) and np.isnan(outs[1]["sam_loss"])


@pytest.mark.parametrize("view, expect_intensity_aug", [("unscaled", False), ("augmented", True)])
def test_online_sam_sees_unlabeled_patches_without_zoom_or_intensity_changes(nnunet_env, view, expect_intensity_aug):
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, sam_view=view, **SAM)
    trainer.initialize()
    trainer.get_tr_and_val_datasets()
    transforms = trainer._make_unlabeled_loader().data_loader.transforms.transforms
    names = [type(getattr(t, "transform", t)).__name__ for t in transforms]
    spatial = next(t for t in transforms if type(t).__name__ == "SpatialTransform")
    assert ("GaussianNoiseTransform" in names) == expect_intensity_aug
    assert ("GammaTransform" in names) == expect_intensity_aug
    assert (spatial.p_scaling > 0) == expect_intensity_aug
    assert "MirrorTransform" in names  # the geometry of nnU-Net's augmentation stays
