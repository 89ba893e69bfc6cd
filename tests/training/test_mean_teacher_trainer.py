"""nnUNetTrainerMeanTeacher in-process on the tiny dataset (CPU, single-threaded loaders)."""
import math
import os
import re
import shutil

import blosc2
import numpy as np
import pytest
import torch
import yaml

from trainer_helpers import make_trainer, run_iterations, seed_everything, student_state
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.data.splits import LabeledSubsetError
from nnunetv2_samssl.data.unlabeled_preprocessing import UnlabeledDataError
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher


def _grads(trainer, batch, x_u, weight):
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.optimizer.step = lambda *a, **k: None  # keep the weights, look at the gradients
    trainer.after_optimizer_step = lambda: None  # keep the teacher fixed too
    trainer.consistency_weight = lambda: weight
    trainer.next_unlabeled_batch = lambda: x_u
    seed_everything(5)  # same teacher noise in every call
    trainer.train_step(batch)
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in trainer.network.parameters()]


def test_unlabeled_loss_really_changes_the_student_gradient(nnunet_env, monkeypatch):
    # gradient clipping would rescale each call differently; the linearity check needs raw gradients
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: None)
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.on_train_start()
    # make the teacher differ from the student, as it does after some training
    with torch.no_grad():
        for p in trainer.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(trainer.dataloader_train)
    x_u = trainer.next_unlabeled_batch()
    g0 = _grads(trainer, batch, x_u, 0.0)
    g1 = _grads(trainer, batch, x_u, 1.0)
    g2 = _grads(trainer, batch, x_u, 2.0)
    diff1 = torch.cat([(a - b).flatten() for a, b in zip(g1, g0)])
    diff2 = torch.cat([(a - b).flatten() for a, b in zip(g2, g0)])
    assert diff1.norm() > 1e-4 * torch.cat([g.flatten() for g in g0]).norm()
    # the unlabeled term enters the gradient linearly in its weight
    assert (diff2 - 2 * diff1).norm() < 1e-3 * diff1.norm()


def test_supervised_gradient_is_nnunets(nnunet_env, monkeypatch):
    """With the unlabeled terms weighted 0, Mean Teacher's gradient on a labeled batch is plain nnU-Net's
    (``nnUNetTrainerLabeledSubset``, nnU-Net's own train_step) from the same weights: the fused labeled +
    unlabeled forward, the loss and the deep-supervision weights leave the supervised part unchanged."""
    from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: None)
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.on_train_start()
    batch = next(trainer.dataloader_train)
    x_u = trainer.next_unlabeled_batch()
    mean_teacher = _grads(trainer, batch, x_u, 0.0)

    plain = make_trainer(nnUNetTrainerLabeledSubset, nnunet_env)
    plain.initialize()
    plain.network.load_state_dict(trainer.network.state_dict())
    plain.optimizer.zero_grad(set_to_none=True)
    plain.optimizer.step = lambda *a, **k: None
    plain.train_step(batch)
    reference = [torch.zeros_like(p) if p.grad is None else p.grad for p in plain.network.parameters()]
    assert len(reference) == len(mean_teacher)
    flat_mt = torch.cat([g.flatten() for g in mean_teacher])
    flat_ref = torch.cat([g.flatten() for g in reference])
    assert flat_ref.norm() > 0
    assert (flat_mt - flat_ref).norm() < 1e-4 * flat_ref.norm()


def _corrupt_labels(env, cases):
    folder = os.path.join(env.dataset_pp, "nnUNetPlans_3d_fullres")
    rng = np.random.default_rng(0)
    for c in cases:
        path = os.path.join(folder, c + "_seg.b2nd")
        seg = blosc2.open(path)[:]
        os.remove(path)
        blosc2.asarray(rng.integers(0, 3, seg.shape).astype(np.int16), urlpath=path)


def _train_subset(env, n_iter=2, outs=None, **settings):
    seed_everything(123)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, env, num_labeled=2, use_unlabeled_folder=False,
                           teacher_noise_std=0.1, **settings)
    steps = run_iterations(trainer, n_iter)
    if outs is not None:
        outs.extend(steps)
    return trainer, student_state(trainer), {k: v.clone() for k, v in trainer.teacher.state_dict().items()}


def test_labels_of_unlabeled_cases_never_reach_the_loss(nnunet_env):
    """Labeled-subset mode: corrupting the hidden labels leaves training bit-identical, while the logged
    teacher / student Dice (teacher_diagnostics: auto) read them; corrupting a labeled case's labels changes
    training (so the comparison can fail)."""
    outs_a, outs_b = [], []
    trainer, student_a, teacher_a = _train_subset(nnunet_env, outs=outs_a)
    demoted, labeled = trainer.demoted_cases, trainer.labeled_cases
    assert len(labeled) == 2 and len(demoted) == 2 and set(demoted).isdisjoint(labeled)
    assert sorted(trainer.unlabeled_dataset.identifiers) == sorted(demoted)
    assert trainer.unlabeled_dataset.hidden_label_cases == set(demoted)  # loaded, for the diagnostics only

    _corrupt_labels(nnunet_env, demoted)
    _, student_b, teacher_b = _train_subset(nnunet_env, outs=outs_b)
    for k in student_a:
        assert torch.equal(student_a[k], student_b[k]), k
        assert torch.equal(teacher_a[k], teacher_b[k]), k
    assert [o["loss"] for o in outs_a] == [o["loss"] for o in outs_b]
    assert [o["teacher_dice"] for o in outs_a] != [o["teacher_dice"] for o in outs_b]

    _corrupt_labels(nnunet_env, labeled[:1])
    _, student_c, _ = _train_subset(nnunet_env)
    assert any(not torch.equal(student_a[k], student_c[k]) for k in student_a)


def test_teacher_diagnostics_leave_training_unchanged(nnunet_env):
    """Loading the hidden labels for the logged Dice changes neither the patches nor the steps: a seeded run
    with teacher_diagnostics off is bit-identical."""
    outs_on, outs_off = [], []
    trainer, student_on, teacher_on = _train_subset(nnunet_env, outs=outs_on)
    assert trainer.teacher_diagnostics and all(np.isfinite(o["teacher_dice"]) for o in outs_on)
    trainer, student_off, teacher_off = _train_subset(nnunet_env, outs=outs_off, teacher_diagnostics=False)
    assert not trainer.unlabeled_dataset.hidden_label_cases and "teacher_dice" not in outs_off[0]
    for k in student_on:
        assert torch.equal(student_on[k], student_off[k]), k
        assert torch.equal(teacher_on[k], teacher_off[k]), k
    assert [o["loss"] for o in outs_on] == [o["loss"] for o in outs_off]


def test_unlabeled_sources_combine(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, num_labeled=3)
    trainer.get_tr_and_val_datasets()
    ids = trainer.unlabeled_dataset.identifiers
    assert sorted(ids) == sorted(trainer.demoted_cases + ["unl_000", "unl_001", "unl_002"])


def test_teacher_diagnostics_score_both_networks_against_the_hidden_labels(nnunet_env):
    """teacher_dice / student_dice: nnU-Net's foreground Dice of each network's argmax against the hidden labels,
    NaN without them; off outside labeled-subset mode (auto) or when switched off, where no label is loaded."""
    from nnunetv2_samssl.pseudo_labels.base import HIDDEN_DICE_PANEL, NetworkOutputs, UnlabeledBatch

    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, num_labeled=2, use_unlabeled_folder=False)
    trainer.initialize()
    assert trainer.logger.local_logger.panels[HIDDEN_DICE_PANEL] == ["teacher_dice", "student_dice"]
    k = trainer.label_manager.num_segmentation_heads
    hidden = torch.zeros((2, 1, 4, 4, 4), dtype=torch.long)
    hidden[0, 0, :2] = 1  # sample 0: half class 1, half background; sample 1: no hidden label
    hidden[1] = -1
    teacher_labels = hidden[:, 0].clamp(min=0)  # exactly right where labeled
    student_labels = torch.zeros_like(teacher_labels)
    student_labels[0, :1] = 1  # finds half of class 1: Dice 2 * 16 / (16 + 32)
    student_labels[1] = 2

    def logits(labels):
        return 10.0 * torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float()

    batch = UnlabeledBatch(torch.zeros((2, 1, 4, 4, 4)), ["a", "b"], None, hidden)
    outputs = NetworkOutputs(logits(student_labels), logits(teacher_labels), trainer.label_space)
    d = trainer.unlabeled_diagnostics(batch, outputs)
    # class 2 is absent from prediction and reference of the labeled sample: it does not count (nnU-Net's rule)
    assert d["teacher_dice"] == pytest.approx(1.0)
    assert d["student_dice"] == pytest.approx(2 * 16 / (16 + 32))
    nan = trainer.unlabeled_diagnostics(UnlabeledBatch(batch.images, batch.keys, None, None), outputs)
    assert np.isnan(nan["teacher_dice"]) and np.isnan(nan["student_dice"])

    for settings in (dict(), dict(num_labeled=2, use_unlabeled_folder=False, teacher_diagnostics=False)):
        off = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, **settings)
        off.initialize()
        assert HIDDEN_DICE_PANEL not in off.logger.local_logger.panels
        assert off.unlabeled_diagnostics(batch, outputs) == {}
        off.get_tr_and_val_datasets()
        assert not off.unlabeled_dataset.hidden_label_cases


def _record_train_steps(trainer):
    """Wraps ``trainer.train_step``: returns the list that collects (global step before the call, outputs)."""
    steps = []
    train_step = trainer.train_step

    def recording(batch):
        step = trainer.global_step
        out = train_step(batch)
        steps.append((step, {k: float(v) for k, v in out.items()}))
        return out

    trainer.train_step = recording
    return steps


def test_one_epoch_logs_ssl_metrics_and_checkpoints_the_teacher(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, num_epochs=1, predict_with="teacher")
    steps = _record_train_steps(trainer)
    trainer.run_training()

    # 1 epoch x 2 iterations: steps t = 0, 1 of T = 2
    assert [t for t, _ in steps] == [0, 1] and trainer.total_steps == 2
    outs = [o for _, o in steps]
    # lambda_c(t) = 0.1 * exp(-5 (1 - t / T)^2) (consistency_weight 0.1, ramp-up over all of T)
    expected_w = [0.1 * math.exp(-5.0 * (1.0 - t / 2) ** 2) for t in (0, 1)]
    assert [o["consistency_weight"] for o in outs] == pytest.approx(expected_w, rel=1e-6)
    for o in outs:  # the step's loss is exactly L_sup + lambda_c * L_con
        assert np.isfinite(o["consistency_loss"]) and o["consistency_loss"] > 0
        assert o["loss"] == pytest.approx(o["sup_loss"] + o["consistency_weight"] * o["consistency_loss"], rel=1e-5)

    # the epoch's logged values are the means of the per-step outputs
    log = trainer.logger.local_logger.my_fantastic_logging
    for key in ("consistency_loss", "sup_loss", "consistency_weight"):
        assert len(log[key]) == 1, key
        assert log[key][0] == pytest.approx(np.mean([o[key] for o in outs]), rel=1e-6), key
    assert log["consistency_weight"][0] == pytest.approx(np.mean(expected_w), rel=1e-6)
    assert log["train_losses"][0] == pytest.approx(np.mean([o["loss"] for o in outs]), rel=1e-6)

    out = trainer.output_folder
    assert os.path.isfile(os.path.join(out, "progress.png"))
    with open(os.path.join(out, "samssl_config.yaml")) as f:
        saved = yaml.safe_load(f)
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    for config in (saved, ckpt["samssl"]["config"]):
        assert config["num_epochs"] == 1 and config["num_iterations_per_epoch"] == 2
        assert config["predict_with"] == "teacher"

    # predict_with: teacher -> network_weights are the teacher's, which differ from the student's after 2 steps
    parts = ckpt["samssl"]["parts"]
    teacher, student = parts["teacher"]["weights"], parts["student"]["weights"]
    assert set(ckpt["network_weights"]) == set(teacher) == set(student)
    for k, v in ckpt["network_weights"].items():
        assert torch.equal(v, teacher[k]), k
        assert torch.equal(v, trainer.teacher.module.state_dict()[k]), k
    for k, v in student_state(trainer).items():
        assert torch.equal(v, student[k]), k
    assert any(not torch.equal(ckpt["network_weights"][k], student[k]) for k in student)
    assert not any(f.startswith(".") for f in os.listdir(out))


def test_resume_restores_student_teacher_optimizer_and_settings(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, ema_decay=0.9)
    run_iterations(trainer, 2)
    trainer.save_effective_config()
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_latest.pth"))
    # resume: no overrides in the environment -> the saved settings are used (ema_decay 0.9, 2 epochs)
    resumed = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True, use_overrides=False)
    assert resumed.settings.mean_teacher.ema_decay == 0.9 and resumed.num_epochs == 2
    resumed.load_checkpoint(os.path.join(resumed.output_folder, "checkpoint_latest.pth"))
    assert resumed.current_epoch == 1
    for k, v in student_state(trainer).items():
        assert torch.equal(v, student_state(resumed)[k])
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, resumed.teacher.state_dict()[k])
    a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    for pid in a["state"]:
        assert torch.equal(a["state"][pid]["momentum_buffer"], b["state"][pid]["momentum_buffer"])


def test_resume_a_run_saved_by_an_older_version(nnunet_env, capsys):
    """A run saved before some settings existed resumes (bare --c, or with overrides as the few-label protocol
    sets them; --val takes the same path): the missing settings take the bundled defaults, and the log names
    them. A saved setting this version does not know stays an error."""
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, ema_decay=0.9)
    trainer.save_effective_config()
    path = os.path.join(trainer.output_folder, "samssl_config.yaml")
    with open(path) as f:
        saved = yaml.safe_load(f)
    assert saved["initial_lr"] == 0.01  # nnU-Net's value, which the overrides below leave at null
    newer = ("student_mix", "student_mix_volume", "teacher_diagnostics")
    with open(path, "w") as f:
        yaml.safe_dump({k: v for k, v in saved.items() if k not in newer}, f)
    capsys.readouterr()
    for use_overrides in (False, True):
        resumed = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True,
                               use_overrides=use_overrides, ema_decay=0.9)
        mt = resumed.settings.mean_teacher
        assert (mt.ema_decay, mt.student_mix, mt.student_mix_volume) == (0.9, "none", 0.5)
        log = capsys.readouterr().out
        assert f"{path} was written by an older version without the settings student_mix: 'none', " \
               f"student_mix_volume: 0.5, teacher_diagnostics: 'auto'" in log
        # null schedule keys keep nnU-Net's values: not a change of settings
        assert "resuming with settings that differ" not in log
    make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True, ema_decay=0.95)
    assert re.search(r"WARNING: resuming with settings that differ from \S+: ema_decay: 0.9 -> 0.95\s*$",
                     capsys.readouterr().out, re.M)
    with open(path, "w") as f:
        yaml.safe_dump({**saved, "no_such_setting": 1}, f)
    with pytest.raises(ConfigError, match="Unknown setting 'no_such_setting' in " + re.escape(path)):
        make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True, use_overrides=False)


def test_resume_uses_newest_readable_checkpoint(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.initialize()
    out = trainer.output_folder
    trainer.current_epoch = 3
    trainer.save_checkpoint(os.path.join(out, "checkpoint_best.pth"))  # stores epoch 4
    trainer.current_epoch = 1
    trainer.save_checkpoint(os.path.join(out, "checkpoint_latest.pth"))  # older
    resumed = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True)
    resumed.load_checkpoint(os.path.join(out, "checkpoint_latest.pth"))
    assert resumed.current_epoch == 4
    # a truncated file (as a kill during an in-place write leaves) is skipped with a warning
    with open(os.path.join(out, "checkpoint_best.pth"), "r+b") as f:
        f.truncate(1000)
    resumed = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True)
    resumed.load_checkpoint(os.path.join(out, "checkpoint_latest.pth"))
    assert resumed.current_epoch == 2


def test_checkpoint_write_is_atomic(nnunet_env, monkeypatch):
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.initialize()
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    before = open(path, "rb").read()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during torch.save")

    monkeypatch.setattr(torch, "save", dying_save)
    trainer.current_epoch = 5
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(path, "rb").read() == before
    assert os.listdir(trainer.output_folder) == [p for p in os.listdir(trainer.output_folder) if not p.startswith(".")]


class nnUNetTrainerMeanTeacher_5epochs(nnUNetTrainerMeanTeacher):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


def test_subclass_setting_num_epochs_the_nnunet_way(nnunet_env):
    trainer = make_trainer(nnUNetTrainerMeanTeacher_5epochs, nnunet_env, num_epochs=3)
    assert trainer.num_epochs == 5 and trainer.effective_config()["num_epochs"] == 5


def test_no_unlabeled_data_is_a_clear_error(nnunet_env):
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, use_unlabeled_folder=False)
    with pytest.raises(UnlabeledDataError, match="needs unlabeled data and found none.*num_labeled"):
        trainer.on_train_start()


def test_unlabeled_folder_not_preprocessed_is_a_clear_error(nnunet_env):
    shutil.rmtree(os.path.join(nnunet_env.dataset_pp, "nnUNetPlans_3d_fullres_unlabeled"))
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    with pytest.raises(UnlabeledDataError, match="not preprocessed.*nnUNetv2_samssl_preprocess_unlabeled -d "
                                                 "Dataset977_SamsslTiny -c 3d_fullres"):
        trainer.on_train_start()


def test_num_labeled_larger_than_fold(nnunet_env):
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, num_labeled=5)  # fold 0 has 4 training cases
    with pytest.raises(LabeledSubsetError, match="num_labeled=5 must lie between 1 and the fold's 4"):
        trainer.on_train_start()


def test_unknown_setting_fails_at_construction(nnunet_env):
    with pytest.raises(ConfigError, match="Unknown setting 'ema'"):
        make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, ema=0.5)


@pytest.mark.parametrize("predict_with", ["student", "teacher"])
def test_online_validation_scores_the_network_predict_with_selects(nnunet_env, predict_with):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, predict_with=predict_with)
    trainer.on_train_start()
    with torch.no_grad():  # a teacher far from the student
        for p in trainer.teacher.module.parameters():
            p.add_(0.5 * torch.randn_like(p))
    batch = next(trainer.dataloader_val)
    trainer.network.eval()
    got = trainer.validation_step(batch)
    student = trainer.network
    expected = {}
    for name, net in (("student", student), ("teacher", trainer.teacher.module)):
        trainer.network = net
        expected[name] = super(nnUNetTrainerMeanTeacher, trainer).validation_step(batch)
    trainer.network = student
    other = "student" if predict_with == "teacher" else "teacher"
    assert got["loss"] == pytest.approx(expected[predict_with]["loss"])
    assert got["loss"] != pytest.approx(expected[other]["loss"])
    assert trainer.network is student  # the student is back in place
    trainer.on_train_end()


def test_only_a_resume_chooses_the_checkpoint_other_loads_read_the_file_asked_for(nnunet_env):
    """--c resumes from the newest readable of final/latest/best; --val_best (a load without --c) reads
    checkpoint_best.pth even when checkpoint_final.pth is newer."""
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    run_iterations(trainer, 1)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_best.pth"))  # epoch 1
    best = student_state(trainer)
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))  # epoch 2, other weights
    final = student_state(trainer)  # (no on_train_end: it would rewrite checkpoint_final.pth)
    assert any(not torch.equal(best[k], final[k]) for k in best)

    validating = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)  # nnUNetv2_train --val --val_best
    validating.load_checkpoint(os.path.join(validating.output_folder, "checkpoint_best.pth"))
    assert validating.current_epoch == 1
    assert all(torch.equal(v, best[k]) for k, v in student_state(validating).items())

    resuming = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True)  # --c
    resuming.load_checkpoint(os.path.join(resuming.output_folder, "checkpoint_best.pth"))
    assert resuming.current_epoch == 2
    assert all(torch.equal(v, final[k]) for k, v in student_state(resuming).items())
    # after the resume, an explicit load (nnU-Net's --val_best at the end of a --c run) reads the file asked for
    resuming.load_checkpoint(os.path.join(resuming.output_folder, "checkpoint_best.pth"))
    assert resuming.current_epoch == 1


def test_teacher_starts_as_the_student_also_with_pretrained_weights(nnunet_env, tmp_path):
    """nnUNetv2_train -pretrained_weights loads the weights into the student after initialize(): the teacher
    must start from them too, and the first EMA update (alpha = 0) copies the student."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    seed_everything(1)
    donor = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    donor.initialize()
    path = str(tmp_path / "pretrained.pth")
    torch.save({"network_weights": donor.network.state_dict()}, path)
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.initialize()  # what nnUNetv2_train does with -pretrained_weights
    load_pretrained_weights(trainer.network, path)
    pretrained = student_state(trainer)
    assert any(not torch.equal(v, pretrained[k]) for k, v in trainer.teacher.state_dict().items())
    trainer.on_train_start()
    assert all(torch.equal(v, pretrained[k]) for k, v in trainer.teacher.state_dict().items())
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))  # first update: alpha = 0, the teacher is the student
    assert all(torch.equal(v, student_state(trainer)[k]) for k, v in trainer.teacher.state_dict().items())
    trainer.train_step(next(trainer.dataloader_train))  # then alpha = 0.5
    assert any(not torch.equal(v, student_state(trainer)[k]) for k, v in trainer.teacher.state_dict().items())
