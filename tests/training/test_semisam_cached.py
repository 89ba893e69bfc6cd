"""nnUNetTrainerSemiSAM with sam_pseudo_labels: cached (tiny random-weight SAM-Med3D, tiny dataset, CPU)."""
import os

import blosc2
import numpy as np
import pytest
import torch

from test_mean_teacher_trainer import _corrupt_labels
from trainer_helpers import SAM, tiny_sam  # noqa: F401  (tiny_sam: an autouse fixture)
from trainer_helpers import make_trainer, seed_everything, student_state
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.pseudo_labels.base import NetworkOutputs
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM

CACHED = dict(SAM, sam_pseudo_labels="cached", sam_cache_refresh_epochs=1, num_labeled=2, use_unlabeled_folder=False)


def _labels_on_disk(trainer):
    cache = trainer.sam_source.cache
    folder = os.path.join(cache.root, cache.current_generation())
    return {f[:-5]: blosc2.open(os.path.join(folder, f))[:] for f in sorted(os.listdir(folder)) if f.endswith(".b2nd")}


def _refresh_and_train(env, n_iter=2):
    """Epoch 0 (no pseudo-labels yet), then epoch 1: refresh + ``n_iter`` steps on the cached maps."""
    seed_everything(11)
    trainer = make_trainer(nnUNetTrainerSemiSAM, env, **CACHED)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    before = trainer.train_step(next(trainer.dataloader_train))
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()  # refresh due at epoch k = 1
    outs = []
    for _ in range(n_iter):
        outs.append(trainer.train_step(next(trainer.dataloader_train)))
    return trainer, before, outs


def test_cached_pseudo_labels_cover_whole_cases_and_feed_the_sam_loss(nnunet_env):
    trainer, before, outs = _refresh_and_train(nnunet_env)
    k = trainer.label_manager.num_segmentation_heads
    # epoch 0: no generation yet -> no SAM loss
    assert np.isnan(before["sam_loss"]) and np.isnan(before["sam_weight"])
    assert trainer.sam_source.cache.current_generation() == "epoch_0001"
    maps = _labels_on_disk(trainer)
    assert sorted(maps) == sorted(trainer.unlabeled_dataset.identifiers)
    for case, labels in maps.items():
        image = trainer.unlabeled_dataset.load_image(case)
        assert labels.shape == (1, *image.shape[1:])  # whole case, preprocessed grid
        assert labels.min() >= 0 and labels.max() <= k
    # the maps reach the training step through the augmentation: some voxels are now supervised
    assert trainer.unlabeled_dataset.pseudo_labels is trainer.sam_source.cache
    assert any(o["sam_valid_fraction"] > 0 for o in outs)
    assert all(np.isfinite(o["sam_loss"]) for o in outs)
    assert all(np.isnan(o["sam_time_s"]) for o in outs)  # SAM no longer runs inside the step
    # labeled-subset mode: whole-case Dice against the hidden labels, logged only
    assert 0.0 <= outs[0]["sam_pseudo_dice"] <= 1.0 and 0.0 <= outs[0]["prompt_dice"] <= 1.0
    trainer.on_train_end()


def test_hidden_labels_never_reach_the_cached_pseudo_labels_or_the_loss(nnunet_env):
    trainer_a, _, outs_a = _refresh_and_train(nnunet_env)
    maps_a, student_a = _labels_on_disk(trainer_a), student_state(trainer_a)
    assert not trainer_a.unlabeled_dataset.hidden_label_cases  # the batches carry pseudo-labels only
    trainer_a.on_train_end()
    _corrupt_labels(nnunet_env, trainer_a.demoted_cases)
    trainer_b, _, outs_b = _refresh_and_train(nnunet_env)
    maps_b, student_b = _labels_on_disk(trainer_b), student_state(trainer_b)
    trainer_b.on_train_end()
    for case in maps_a:
        np.testing.assert_array_equal(maps_a[case], maps_b[case])
    for key in student_a:
        assert torch.equal(student_a[key], student_b[key]), key
    assert [o["loss"] for o in outs_a] == [o["loss"] for o in outs_b]
    # ... while the logged diagnostics did read the (corrupted) labels
    assert outs_a[0]["prompt_dice"] != outs_b[0]["prompt_dice"]


def test_resume_reuses_the_generation_of_the_checkpoint_and_fresh_training_drops_it(nnunet_env):
    trainer, _, _ = _refresh_and_train(nnunet_env, n_iter=1)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_latest.pth"))
    maps = _labels_on_disk(trainer)
    trainer.on_train_end()

    def resume():
        resumed = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, continue_training=True, **CACHED)
        resumed.load_checkpoint(os.path.join(resumed.output_folder, "checkpoint_latest.pth"))
        calls = []
        resumed.sam_source.refresh = lambda epoch: calls.append(epoch)
        resumed.sam_source.refresh_epochs = 1000  # mid-interval: no refresh is due
        resumed.on_train_start()
        resumed.on_train_epoch_start()
        return resumed, calls

    resumed, calls = resume()
    assert calls == [] and resumed.sam_source.cache.current_generation() == "epoch_0001"
    for case, labels in _labels_on_disk(resumed).items():
        np.testing.assert_array_equal(labels, maps[case])
    resumed.on_train_end()
    # the checkpoint's generation is gone (deleted by hand): rebuilt at once, not silently replaced by nothing
    import shutil
    shutil.rmtree(os.path.join(resumed.sam_source.cache.root, "epoch_0001"))
    resumed, calls = resume()
    assert calls == [resumed.current_epoch]
    resumed.on_train_end()

    fresh = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **CACHED)
    fresh.on_train_start()  # a new training in the same folder must not inherit old pseudo-labels
    assert fresh.sam_source.cache.current_generation() is None and not os.path.isdir(fresh.sam_source.cache.root)
    fresh.on_train_end()


def test_later_refreshes_reuse_the_image_embeddings_and_label_as_without_them(nnunet_env):
    """The default whole-case windows: the second refresh encodes nothing and writes exactly the maps of a
    refresh that encodes everything again (same weights, same prompt draws)."""
    seed_everything(3)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **CACHED)
    trainer.on_train_start()
    source = trainer.sam_source
    assert source.windows == "whole" and source.embeddings is not None
    source.refresh(1)
    encoded = source.embeddings.misses
    assert encoded > 0 and source.embeddings.hits == 0 and source.stage_seconds["encode"] > 0
    cache, maps = source.embeddings, {}
    for epoch, embeddings in ((2, cache), (3, None)):
        source.generator.manual_seed(7)
        source.embeddings = embeddings
        source.refresh(epoch)
        maps[epoch] = _labels_on_disk(trainer)
        if embeddings is not None:  # everything found again, nothing encoded
            assert cache.hits == encoded and cache.misses == 0
    assert sorted(maps[2]) == sorted(trainer.unlabeled_dataset.identifiers)
    for case in maps[2]:
        np.testing.assert_array_equal(maps[2][case], maps[3][case])
    trainer.on_train_end()


def test_periodic_work_is_reported_for_benchmarks(nnunet_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **CACHED)
    trainer.on_train_start()
    trainer.on_train_epoch_start()  # epoch 0: no pseudo-labels yet, the benchmark must not time such steps
    assert np.isnan(trainer.train_step(next(trainer.dataloader_train))["sam_loss"])
    seconds, iterations = trainer.timed_periodic_work()
    assert seconds > 0 and iterations == 1 * trainer.num_iterations_per_epoch
    # after the refresh the steps the benchmark times carry the SAM loss, as in training
    assert np.isfinite(trainer.train_step(next(trainer.dataloader_train))["sam_loss"])
    trainer.on_train_end()
    online = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **SAM)
    assert online.timed_periodic_work() is None


@pytest.mark.parametrize("extra, message", [
    (dict(sam_every=2), "sam_every applies to sam_pseudo_labels: online only"),
    (dict(sam_cache_refresh_epochs=2, num_epochs=2), "sam_cache_refresh_epochs=2 is not below num_epochs=2"),
    (dict(sam_loss="uncertainty_mse", sam_prompt_mode="unc"), "cached stores hard labels"),
])
def test_cached_mode_rejects_settings_that_cannot_work(nnunet_env, extra, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **{**CACHED, **extra})


def test_all_deep_supervision_scales_and_dice_ce_on_cached_labels(nnunet_env):
    seed_everything(3)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **{**CACHED, "sam_loss_scales": "all",
                                                                 "sam_loss": "dice_ce"})
    trainer.on_train_start()
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    batch = trainer.next_unlabeled_batch()
    targets = batch.loader_maps
    assert isinstance(targets, list) and len(targets) == len(trainer._get_deep_supervision_scales())
    student = trainer.network(batch.images)
    terms = trainer.source_terms(trainer.sam_source, batch, NetworkOutputs(student, [o.detach() for o in student]))
    assert torch.isfinite(terms["sam_term"]) and terms["sam_valid_fraction"] > 0
    terms["sam_term"].backward()  # the cached labels supervise every scale
    # every output head gets a gradient except the lowest-resolution one, whose deep-supervision weight is 0
    no_grad = {name for name, p in trainer.network.named_parameters() if p.grad is None}
    lowest = {f"decoder.seg_layers.0.{n}" for n, _ in trainer.network.decoder.seg_layers[0].named_parameters()}
    assert no_grad == lowest
    for i in range(1, len(trainer.network.decoder.seg_layers)):
        assert trainer.network.decoder.seg_layers[i].weight.grad.abs().sum() > 0
    trainer.on_train_end()


def test_teacher_diagnostics_step_aside_for_cached_pseudo_labels(nnunet_env):
    """The unlabeled batches carry the cached maps, not hidden labels: auto turns the teacher's Dice off, an
    explicit true is refused with the fix."""
    auto = make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **CACHED)
    auto.initialize()
    assert not auto.teacher_diagnostics and not auto.wants_hidden_labels()
    with pytest.raises(ConfigError, match="teacher_diagnostics to auto or false"):
        make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **CACHED, teacher_diagnostics=True).initialize()
