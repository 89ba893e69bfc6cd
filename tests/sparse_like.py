"""A tiny sparsely annotated nnU-Net dataset: the synthetic demo cases with only every third axial slice
annotated, the rest marked with nnU-Net's ignore label (``"ignore": 3`` in ``dataset.json``)."""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk

SPARSE_ID = 979
SPARSE_NAME = "Dataset979_SparseLike"
IGNORE = 3


def build_preprocessed(raw: str) -> None:
    from nnunetv2_samssl.demo.synthetic import make_demo_dataset
    folder = make_demo_dataset(raw, SPARSE_ID, "SparseLike", num_labeled=6, num_unlabeled=3, num_test=0,
                               shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), seed=7)
    labels = os.path.join(folder, "labelsTr")
    for f in sorted(os.listdir(labels)):
        image = sitk.ReadImage(os.path.join(labels, f))
        array = sitk.GetArrayFromImage(image)
        sparse = np.full_like(array, IGNORE)
        sparse[::3] = array[::3]
        out = sitk.GetImageFromArray(sparse)
        out.CopyInformation(image)
        sitk.WriteImage(out, os.path.join(labels, f), useCompression=True)
    with open(os.path.join(folder, "dataset.json")) as fh:
        dataset = json.load(fh)
    dataset["labels"] = {"background": 0, "organ": 1, "lesion": 2, "ignore": IGNORE}
    with open(os.path.join(folder, "dataset.json"), "w") as fh:
        json.dump(dataset, fh, indent=2)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2_samssl.data.unlabeled_preprocessing import preprocess_unlabeled
    from conftest import set_network_widths
    extract_fingerprints([SPARSE_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([SPARSE_ID])
    set_network_widths(os.path.join(os.environ["nnUNet_preprocessed"], SPARSE_NAME), 8, 64)  # fast CPU steps
    preprocess([SPARSE_ID], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    preprocess_unlabeled(SPARSE_ID, "3d_fullres", num_processes=1, verbose=False)
