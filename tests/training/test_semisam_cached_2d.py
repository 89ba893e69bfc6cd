"""Cached SAM pseudo-labels on a 2D configuration: whole cases are labeled slice by slice (fake 2D SAM)."""
import os

import blosc2
import numpy as np

from sam_fakes import SPACE_2D, FakeSam
from trainer_helpers import make_trainer, seed_everything
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM


def test_2d_configuration_labels_every_slice_of_whole_cases(nnunet_env_2d, monkeypatch):
    import nnunetv2_samssl.sam.registry as registry
    fake = FakeSam(SPACE_2D)
    monkeypatch.setattr(registry, "build_promptable_model", lambda *a, **k: fake)
    seed_everything(0)  # the tiny dataset with its 2d configuration preprocessed (conftest.tiny_dataset_2d)
    trainer = make_trainer(nnUNetTrainerSemiSAM, nnunet_env_2d, configuration="2d", sam_backend="sam2d_vit_b",
                           sam_random_init=True, sam_num_clicks=2, sam_pseudo_labels="cached",
                           sam_cache_refresh_epochs=1, num_labeled=2, use_unlabeled_folder=False)
    trainer.on_train_start()
    assert len(trainer.configuration_manager.patch_size) == 2
    # a prediction that covers the whole image, so that every slice gets a SAM query
    trainer._sliding_window_probabilities = lambda which, image: torch_probs(image)
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    folder = os.path.join(trainer.sam_source.cache.root, trainer.sam_source.cache.current_generation())
    k = trainer.label_manager.num_segmentation_heads
    slices = 0
    for case in trainer.unlabeled_dataset.identifiers:
        labels = blosc2.open(os.path.join(folder, case + ".b2nd"))[:]
        image = trainer.unlabeled_dataset.load_image(case)
        assert labels.shape == (1, *image.shape[1:]) and labels.max() <= k
        assert (labels < k).reshape(labels.shape[1], -1).any(1).all()  # every slice got a pseudo-label
        slices += image.shape[1]
    assert sum(fake.encoded) == slices  # the 2D model saw each slice once, as a 2D image
    out = trainer.train_step(next(trainer.dataloader_train))
    assert np.isfinite(out["sam_loss"])
    trainer.on_train_end()


def torch_probs(image):
    import torch
    foreground = torch.full(image.shape[1:], 0.9)
    return torch.stack([1 - foreground, foreground, torch.zeros_like(foreground)])
