"""nnUNetTrainerSemiSAM in-process on the tiny dataset with a tiny random-weight SAM-Med3D (CPU)."""
import math
import os

import numpy as np
import pytest
import torch

from test_mean_teacher_trainer import _corrupt_labels
from trainer_helpers import make_trainer, run_iterations, seed_everything, student_state
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import multiclass_dice, nnUNetTrainerSemiSAM

BUILT = []


@pytest.fixture(autouse=True)
def tiny_sam(monkeypatch):
    """Every trainer gets a tiny SAM-Med3D (same structure, 32^3 input) with fixed random weights."""
    import nnunetv2_samssl.sam.registry as registry
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable

    def build(backend, checkpoint, device, **kwargs):
        BUILT.append((backend, checkpoint, kwargs))
        torch.manual_seed(0)
        return SAMMed3DPromptable.from_checkpoint(None, config="tiny", device=device, random_init=True)

    monkeypatch.setattr(registry, "build_promptable_model", build)


SAM = dict(sam_backend="sam_med3d", sam_random_init=True, sam_num_clicks=3)


def test_sam_weight_ramps_down():
    t = nnUNetTrainerSemiSAM.__new__(nnUNetTrainerSemiSAM)
    t.ssl_config = {"sam_weight": 0.1, "sam_weight_schedule": "sigmoid_rampdown", "sam_rampdown": 1.0}
    t.num_epochs, t.num_iterations_per_epoch, t.iteration_in_epoch = 10, 10, 0
    weights = []
    for epoch in (0, 5, 9):
        t.current_epoch = epoch
        weights.append(t.sam_weight())
    assert weights[0] == pytest.approx(0.1) and weights[0] > weights[1] > weights[2]
    t.current_epoch, t.iteration_in_epoch = 10, 0
    assert t.sam_weight() == pytest.approx(0.1 * math.exp(-5))
    t.ssl_config["sam_weight_schedule"] = "exp_decay"
    t.current_epoch = 5
    assert t.sam_weight() == pytest.approx(0.1 * math.exp(-2.5))


def test_multiclass_dice_ignores_unknown_voxels():
    pred = torch.tensor([[0, 1, 1, 2]])
    ref = torch.tensor([[0, 1, -1, 2]])
    assert multiclass_dice(pred, ref, 3) == pytest.approx(1.0)
    assert math.isnan(multiclass_dice(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 3))


def test_missing_sam_checkpoint_names_the_setting(nnunet_env):
    with pytest.raises(ConfigError, match="'sam_checkpoint' is required for sam_backend 'sam_med3d_turbo'"):
        make_trainer(nnUNetTrainerSemiSAM, nnunet_env)


def test_one_epoch_trains_logs_sam_metrics_and_diagnostics(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, num_epochs=1, num_labeled=2, use_unlabeled_folder=False,
                           **SAM)
    trainer.run_training()
    log = trainer.logger.local_logger.my_fantastic_logging
    # 2 iterations in all: lambda_s = 0.1 * r(T - t, T) at t = 0 and 1
    assert np.isfinite(log["sam_loss"][0])
    assert log["sam_weight"][0] == pytest.approx((0.1 + 0.1 * math.exp(-5 * 0.25)) / 2)
    assert np.isfinite(log["sam_time_s"][0]) and log["sam_time_s"][0] > 0
    # labeled-subset mode: the pseudo-labels are scored against the hidden labels (logged only)
    assert 0.0 <= log["sam_pseudo_dice"][0] <= 1.0 and 0.0 <= log["prompt_dice"][0] <= 1.0
    assert BUILT[-1][0] == "sam_med3d" and BUILT[-1][2]["random_init"] is True
    assert os.path.isfile(os.path.join(trainer.output_folder, "progress.png"))


def _train(env, n_iter=2, **extra):
    seed_everything(7)
    trainer = make_trainer(nnUNetTrainerSemiSAM, env, num_labeled=2, use_unlabeled_folder=False, **SAM, **extra)
    seen = []
    ssl_losses = trainer.ssl_losses

    def spy(x_u, student_u, teacher_u, hidden_labels=None):
        seen.append(hidden_labels.clone())
        return ssl_losses(x_u, student_u, teacher_u, hidden_labels)

    trainer.ssl_losses = spy
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
    x_u, _ = trainer.next_unlabeled_batch()
    trainer.optimizer.step = lambda *a, **k: None
    trainer.after_optimizer_step = lambda: None
    trainer.next_unlabeled_batch = lambda: (x_u, None)
    trainer.consistency_weight = lambda: 0.0

    def grads(w):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.sam_weight = lambda: w
        trainer.sam_generator.manual_seed(3)
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
