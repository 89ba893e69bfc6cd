"""A tiny BraTS-like nnU-Net dataset: two MR channels, zero outside a "brain" ball (so nnU-Net plans
``use_mask_for_norm`` and its seg files carry -1 outside the non-zero mask) and nested regions
(``whole`` = organ + lesion, ``core`` = lesion) trained region-based (``regions_class_order``)."""
from __future__ import annotations

import json
import os

import numpy as np

from nnunetv2_samssl.demo.synthetic import (case_rng, prepare_dataset_folder, synthesize_case, write_volume)

BRATS_ID = 978
BRATS_NAME = "Dataset978_BratsLike"
SHAPE = (16, 32, 32)
SPACING = (2.0, 1.0, 1.0)


def brain_ball(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)],
                                indexing="ij"))
    radius = 0.42 * min(n * s for n, s in zip(shape, spacing))
    return np.sqrt((grid ** 2).sum(0)) < radius


def make_brats_like(raw: str, num_labeled: int = 6, num_unlabeled: int = 3, seed: int = 5) -> str:
    folder = prepare_dataset_folder(raw, BRATS_ID, "BratsLike", ["imagesTr", "labelsTr", "imagesUnlabeled"])
    ball = brain_ball()
    for prefix, count, image_dir, label_dir in (("tr", num_labeled, "imagesTr", "labelsTr"),
                                                ("unl", num_unlabeled, "imagesUnlabeled", None)):
        for index in range(count):
            case = f"{prefix}_{index:03d}"
            rng = case_rng(seed, prefix, index)
            image, label = synthesize_case(rng, SHAPE, SPACING)
            t1c = np.where(ball, image - image.min() + 1.0, 0.0).astype(np.float32)
            t2 = np.where(ball, t1c.max() + 1.0 - t1c + rng.normal(0, 0.05, SHAPE), 0.0).astype(np.float32)
            write_volume(t1c, SPACING, folder / image_dir / f"{case}_0000.nii.gz")
            write_volume(t2, SPACING, folder / image_dir / f"{case}_0001.nii.gz")
            if label_dir is not None:
                write_volume(np.where(ball, label, 0).astype(np.uint8), SPACING, folder / label_dir / f"{case}.nii.gz")
    with open(folder / "dataset.json", "w") as f:
        json.dump({"channel_names": {"0": "T1c", "1": "T2"},
                   "labels": {"background": 0, "whole": [1, 2], "core": 2},
                   "regions_class_order": [1, 2], "numTraining": num_labeled, "file_ending": ".nii.gz"}, f, indent=2)
    return str(folder)


def build_preprocessed(raw: str) -> None:
    """Writes the raw dataset, then plans and preprocesses 3d_fullres (labeled and unlabeled cases) in-process."""
    make_brats_like(raw)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2_samssl.data.unlabeled_preprocessing import preprocess_unlabeled
    from conftest import set_network_widths
    extract_fingerprints([BRATS_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([BRATS_ID])
    set_network_widths(os.path.join(os.environ["nnUNet_preprocessed"], BRATS_NAME), 8, 64)  # fast CPU steps
    preprocess([BRATS_ID], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    preprocess_unlabeled(BRATS_ID, "3d_fullres", num_processes=1, verbose=False)
