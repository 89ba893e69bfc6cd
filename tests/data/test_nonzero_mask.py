"""Unlabeled patches carry nnU-Net's non-zero mask exactly like labeled ones (``use_mask_for_norm`` datasets)."""
import os

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunetv2_samssl.data.unlabeled_dataset import MaskedMap, UnlabeledDataset, UnlabeledSource
from nnunetv2_samssl.data.unlabeled_loader import build_unlabeled_loader
from nnunetv2_samssl.data.unlabeled_preprocessing import unlabeled_preprocessed_folder
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from trainer_helpers import make_trainer, seed_everything


def _folder(env):
    return os.path.join(env.dataset_pp, "nnUNetPlans_3d_fullres")


def test_the_dataset_uses_the_nonzero_mask(brats_env):
    plans = load_json(os.path.join(brats_env.dataset_pp, "nnUNetPlans.json"))
    assert all(plans["configurations"]["3d_fullres"]["use_mask_for_norm"])
    labeled = infer_dataset_class(_folder(brats_env))(_folder(brats_env))
    _, seg, _, _ = labeled.load_case(labeled.identifiers[0])
    assert (np.asarray(seg[:]) < 0).mean() > 0.1  # a real mask: enough voxels outside it


def test_load_case_carries_the_mask_and_nothing_else(brats_env):
    folder = _folder(brats_env)
    labeled = infer_dataset_class(folder)(folder)
    case = labeled.identifiers[0]
    _, seg, _, _ = labeled.load_case(case)
    seg = np.asarray(seg[:])
    _, masked, _, _ = UnlabeledDataset([UnlabeledSource(folder, (case,))]).load_case(case)
    np.testing.assert_array_equal(np.asarray(masked), np.where(seg < 0, -1, 0))
    # a crop reads only its window
    window = (slice(None), slice(2, 9), slice(3, 20), slice(0, 7))
    np.testing.assert_array_equal(masked[window], np.where(seg[window] < 0, -1, 0))
    # imagesUnlabeled cases: their _seg holds only the mask
    unl_folder = unlabeled_preprocessed_folder(brats_env.dataset_pp, "nnUNetPlans_3d_fullres")
    _, unl_mask, _, _ = UnlabeledDataset([UnlabeledSource(unl_folder, ("unl_000",))]).load_case("unl_000")
    assert set(np.unique(np.asarray(unl_mask))) == {-1, 0}
    # cached pseudo-labels: the map inside the mask, -1 outside
    labels = np.full(seg.shape, 2, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(MaskedMap(seg, labels)), np.where(seg < 0, -1, 2))


def _first_batches(loader, n=4):
    return [next(loader)["data"].clone() for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1])
def test_unlabeled_batches_equal_labeled_batches_of_the_same_case(brats_env, seed):
    """The same demoted case through nnU-Net's labeled loader and through the unlabeled loader, with the
    trainer's own augmentation and the same random state: identical patches (MaskImageTransform included)."""
    trainer = make_trainer(nnUNetTrainerMeanTeacher, brats_env, num_labeled=2)
    trainer.get_tr_and_val_datasets()
    case = trainer.demoted_cases[0]
    rotation, dummy_2d, initial_patch_size, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transforms = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes,
        dummy_2d, use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=trainer.label_manager.foreground_labels, regions=None, ignore_label=None)
    folder = _folder(brats_env)
    labeled = infer_dataset_class(folder)(folder, identifiers=[case])
    nnunet_loader = SingleThreadedAugmenter(nnUNetDataLoader(
        labeled, 2, initial_patch_size, trainer.configuration_manager.patch_size, trainer.label_manager,
        oversample_foreground_percent=0.0, transforms=transforms), None)
    unlabeled = UnlabeledDataset([UnlabeledSource(folder, (case,))])
    ours = build_unlabeled_loader(unlabeled, 2, initial_patch_size, trainer.configuration_manager.patch_size,
                                  trainer.label_manager, transforms, num_processes=0, pin_memory=False)
    seed_everything(seed)
    expected = _first_batches(nnunet_loader)
    seed_everything(seed)
    got = _first_batches(ours)
    assert sum(float((b == 0).float().mean()) for b in expected) / len(expected) > 0.05  # masked voxels exist
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
