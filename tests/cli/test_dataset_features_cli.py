"""nnU-Net's sparse annotation (ignore label) through the stock console scripts: Mean Teacher with
learn_unannotated trains and predicts (every trainer trains on it in-process: tests/training/test_ignore_label.py)."""
import os

import pytest

from cli_helpers import cli_env, run_cli
from sparse_like import SPARSE_ID

pytestmark = pytest.mark.slow


def test_ignore_label_dataset_through_the_stock_cli(sparse_env, tmp_path):
    settings = ("num_labeled=3 num_epochs=1 num_iterations_per_epoch=2 num_val_iterations_per_epoch=1 "
                "learn_unannotated=true")
    out = run_cli(["nnUNetv2_train", str(SPARSE_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerMeanTeacher", "-device",
                   "cpu"], cli_env(sparse_env, nnUNet_samssl_overrides=settings))
    assert "consistency_loss" in out
    pred = str(tmp_path / "pred")
    run_cli(["nnUNetv2_predict", "-i", os.path.join(sparse_env.dataset_raw, "imagesUnlabeled"), "-o", pred, "-d",
             str(SPARSE_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainerMeanTeacher", "-f", "0", "-device", "cpu",
             "-npp", "0", "-nps", "0", "--disable_tta"], cli_env(sparse_env))
    assert len([f for f in os.listdir(pred) if f.endswith(".nii.gz")]) == 3
