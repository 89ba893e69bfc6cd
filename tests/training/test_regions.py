"""Region-based training (``regions_class_order``): Mean Teacher and SemiSAM on a BraTS-like dataset with two
channels and nested regions (whole = labels 1 and 2, core = label 2)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from brats_like import BRATS_ID
from cli_helpers import cli_env, run_cli
from nnunetv2_samssl.pseudo_labels.label_space import LabelSpace
from nnunetv2_samssl.sam.branch import SamPseudoLabeler
from nnunetv2_samssl.ssl.consistency import REGION_CONSISTENCY_LOSSES, consistency_loss
from nnunetv2_samssl.ssl.sam_losses import dice_ce_loss, soft_mse_loss
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM
from sam_fakes import SPACE_3D, FakeSam
from trainer_helpers import SAM, make_trainer, seed_everything, tiny_sam  # noqa: F401

SPACE = LabelSpace(2, ((1, 2), (2,)), (1, 2))


def test_label_space_paints_and_splits_regions_like_nnunet():
    labels = torch.tensor([[0, 1, 2, 2]])
    masks = SPACE.region_masks(labels)
    assert masks[0, 0].tolist() == [False, True, True, True] and masks[0, 1].tolist() == [False, False, True, True]
    assert torch.equal(SPACE.to_label_map(masks.float()), labels)
    assert SPACE.unknown_label == 3 and LabelSpace(3).unknown_label == 3
    probs = torch.tensor([[[0.9, 0.2]], [[0.7, 0.6]]]).permute(1, 0, 2)  # (1, R=2, 2)
    assert SPACE.hard(probs).tolist() == [[[1.0, 0.0], [1.0, 1.0]]]
    assert SPACE.foreground_dice(labels, labels) == 1.0


def test_region_losses_use_sigmoids():
    logits = torch.randn(2, 2, 4, 4, 4)
    teacher = torch.randn(2, 2, 4, 4, 4)
    expected = ((torch.sigmoid(logits) - torch.sigmoid(teacher)) ** 2).mean()
    assert torch.allclose(consistency_loss("softmax_mse", True)(logits, teacher), expected)
    assert not torch.allclose(consistency_loss("softmax_mse", False)(logits, teacher), expected)
    target = (torch.rand(2, 2, 4, 4, 4) > 0.5).float()
    assert torch.allclose(soft_mse_loss(logits, target, activation="sigmoid"),
                          ((torch.sigmoid(logits) - target) ** 2).mean())
    # dice_ce on regions: BCE per region + soft Dice over every region; perfect logits give ~0
    perfect = (target * 2 - 1) * 40
    assert dice_ce_loss(perfect, target, activation="sigmoid") < 1e-3
    assert dice_ce_loss(-perfect, target, activation="sigmoid") > 1.0


def test_sam_queries_each_region():
    """One decoder query per (sample, region present); the pseudo-label of a region is SAM's own sigmoid, no
    class combination: with a fake SAM that returns each query's prompt mask, the region pseudo-labels equal
    the thresholded prediction, nested regions kept nested."""
    torch.manual_seed(0)
    patch = (16, 16, 16)
    whole = torch.zeros(2, *patch, dtype=torch.bool)
    whole[:, 3:13, 3:13, 3:13] = True
    core = torch.zeros_like(whole)
    core[0, 6:10, 6:10, 6:10] = True  # sample 1 has no core
    probs = torch.stack([whole, core], 1).float() * 0.8 + 0.1
    sam = FakeSam(SPACE_3D)
    labeler = SamPseudoLabeler(sam, mode="mask", roi="union")
    out = labeler(torch.ones(2, 1, *patch), probs, patch_spacing=(1.0, 1.0, 1.0), regions=True)
    assert out.regions and out.probabilities.shape == (2, 2, *patch)
    assert out.stats["num_queries"] == 3.0  # sample 0: whole + core, sample 1: whole
    hard = out.hard_label.bool()
    assert torch.equal(hard[:, 1] & ~hard[:, 0], torch.zeros_like(hard[:, 1]))  # core inside whole
    assert not hard[1, 1].any()


def _train(trainer_class, env, **settings):
    seed_everything(0)
    trainer = make_trainer(trainer_class, env, num_epochs=2, num_iterations_per_epoch=2, **settings)
    steps = []
    train_step = trainer.train_step

    def recording(batch):
        out = train_step(batch)
        steps.append(out)
        return out

    trainer.train_step = recording
    trainer.run_training()
    return trainer, steps


def _predict(env, trainer_name, out):
    run_cli(["nnUNetv2_predict", "-i", os.path.join(env.dataset_raw, "imagesUnlabeled"), "-o", out, "-d",
             str(BRATS_ID), "-c", "3d_fullres", "-tr", trainer_name, "-f", "0", "-device", "cpu", "-npp", "0", "-nps",
             "0", "--disable_tta"], cli_env(env))
    return [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f))) for f in sorted(os.listdir(out))
            if f.endswith(".nii.gz")]


@pytest.mark.slow
def test_mean_teacher_and_semisam_train_and_predict_on_regions(brats_env, tmp_path):
    mt, steps = _train(nnUNetTrainerMeanTeacher, brats_env, num_labeled=3)
    assert mt.label_space.has_regions and mt.label_space.num_channels == 2
    assert mt.consistency_fn.regions and mt.consistency_fn.scalar in REGION_CONSISTENCY_LOSSES.values()
    assert all(np.isfinite(s["consistency_loss"]) and np.isfinite(s["loss"]) for s in steps)
    assert sum(float(s["consistency_loss"]) for s in steps) > 0
    predictions = _predict(brats_env, "nnUNetTrainerMeanTeacher", str(tmp_path / "mt"))
    assert len(predictions) == 3 and all(set(np.unique(p)) <= {0, 1, 2} for p in predictions)

    # SemiSAM's checkpoint holds the same nnU-Net network, so nnUNetv2_predict takes the path tested above
    semisam, steps = _train(nnUNetTrainerSemiSAM, brats_env, num_labeled=3, **SAM)
    assert semisam.pseudo_label_losses["sam"].loss.form_kwargs["activation"] == "sigmoid"
    online = [s for s in steps if np.isfinite(s["sam_loss"])]
    assert online and all(float(s["sam_loss"]) >= 0 for s in online)


def test_cached_region_pseudo_labels_are_label_maps_read_back_as_regions(brats_env):
    trainer = make_trainer(nnUNetTrainerSemiSAM, brats_env, num_labeled=3, sam_pseudo_labels="cached",
                           sam_cache_refresh_epochs=1, **SAM)
    trainer.initialize()
    trainer.get_dataloaders()
    source = trainer.sam_source
    assert source.regions
    # a prediction with both regions everywhere inside the brain: SAM is prompted per region
    source.refresh(0)
    cache = source.cache
    assert cache.unknown_label == 3
    stored = [np.asarray(cache.load(c, trainer.unlabeled_dataset.load_image(c).shape[1:])[:])
              for c in trainer.unlabeled_dataset.identifiers]
    assert all(set(np.unique(s)) <= {0, 1, 2, 3} for s in stored)
    batch = trainer.next_unlabeled_batch()
    from nnunetv2_samssl.pseudo_labels.base import NetworkOutputs, StepInfo
    targets = source.pseudo_labels(batch, NetworkOutputs(None, None, trainer.label_space), StepInfo(10, 100))
    t = targets.targets[0]
    assert t.shape[1] == 2 and set(torch.unique(t).tolist()) <= {0.0, 1.0}
    assert not (t[:, 1].bool() & ~t[:, 0].bool()).any()  # core inside whole, as stored
    labels = batch.loader_maps[0][:, 0].long()
    assert torch.equal(targets.valid[0], (labels >= 0) & (labels < 3))
