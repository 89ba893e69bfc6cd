"""``nnUNetv2_samssl_export_plain``: a Mean Teacher model exported for plain nnU-Net predicts, in a process where
this package cannot be imported, exactly what ``nnUNetv2_predict -tr nnUNetTrainerMeanTeacher`` predicts; the
exported weights are the teacher's (``predict_with: teacher``), not the student's."""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import cli_env as _env, run_cli as _run
from conftest import CONFIG, DATASET_ID, DATASET_NAME
from nnunetv2_samssl.export import (EXPORT_INFO, NNUNET_CHECKPOINT_KEYS, ExportError, export_plain, main,
                                    pickled_modules)

TRAINER = "nnUNetTrainerMeanTeacher"
IDENTIFIER = f"nnUNetPlans__{CONFIG}"

# Runs a console entry point (module:function, then its arguments) with nnU-Net only: started with -S, so no .pth
# file of site-packages runs (the package's editable finder and its nnUNet_extTrainer registration are .pth
# files), site-packages added by hand, and any import of the package refused.
WITHOUT_PACKAGE = r"""
import os, sys
sys.path.append(sys.argv[1])

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nnunetv2_samssl":
            raise ImportError("nnunetv2_samssl is not installed here")
        return None

sys.meta_path.insert(0, Refuse())
os.environ.pop("nnUNet_extTrainer", None)
import importlib
module, function = sys.argv[2].split(":")
sys.argv = [function] + sys.argv[3:]
getattr(importlib.import_module(module), function)()
assert not [m for m in sys.modules if m.split(".")[0] == "nnunetv2_samssl"]
print("RAN WITHOUT nnunetv2_samssl")
"""






def _run_without_package(entry_point, args, env, cwd, timeout=600):
    env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    r = subprocess.run([sys.executable, "-S", "-c", WITHOUT_PACKAGE, sysconfig.get_paths()["purelib"], entry_point,
                        *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{entry_point} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "RAN WITHOUT nnunetv2_samssl" in r.stdout
    return r.stdout + r.stderr


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and not _differs(a, b)


def _fake_trained_folder(env, predict_with="teacher"):
    """A Mean Teacher fold as training leaves it (checkpoint_final.pth, plans / dataset json), with a teacher that
    differs from the student; no training run."""
    from trainer_helpers import make_trainer
    from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
    trainer = make_trainer(nnUNetTrainerMeanTeacher, env, predict_with=predict_with)
    trainer.initialize()
    with torch.no_grad():
        for p in trainer.teacher.module.parameters():
            p.add_(0.01)
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(os.path.join(env.dataset_pp, f if f != "plans.json" else "nnUNetPlans.json"),
                    os.path.join(trainer.output_folder_base, f))
    return trainer


def test_exports_the_weights_predict_with_chose_and_only_nnunet_keys(nnunet_env, tmp_path):
    trainer = _fake_trained_folder(nnunet_env)
    source = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    teacher, student = source["samssl"]["parts"]["teacher"]["weights"], source["samssl"]["parts"]["student"]["weights"]
    assert _differs(teacher, student)
    out = str(tmp_path / "export")
    folder = export_plain(DATASET_ID, CONFIG, TRAINER, out, verbose=False)
    assert folder == os.path.join(out, DATASET_NAME, f"nnUNetTrainer__{IDENTIFIER}")
    assert sorted(os.listdir(folder)) == sorted(["dataset.json", "plans.json", "dataset_fingerprint.json",
                                                 EXPORT_INFO, "fold_0"])
    exported_file = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    exported = torch.load(exported_file, weights_only=False)
    assert exported["trainer_name"] == "nnUNetTrainer" and set(exported) <= set(NNUNET_CHECKPOINT_KEYS)
    assert "samssl" not in exported and "nnunetv2_samssl" not in pickled_modules(exported_file)
    assert _equal(exported["network_weights"], teacher) and _differs(exported["network_weights"], student)
    assert exported["current_epoch"] == source["current_epoch"] and exported["init_args"]["configuration"] == CONFIG
    info = json.load(open(os.path.join(folder, EXPORT_INFO)))
    assert info["folds"] == {"fold_0": {"checkpoint_final.pth": {"weights": "teacher"}}}

    # --part student: the other weights, into the same (earlier exported) folder
    main(["-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-o", out, "--part", "student"])
    assert _equal(torch.load(exported_file, weights_only=False)["network_weights"], student)


def test_student_predicting_model_exports_the_student(nnunet_env, tmp_path):
    trainer = _fake_trained_folder(nnunet_env, predict_with="student")
    source = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    folder = export_plain(DATASET_ID, CONFIG, TRAINER, str(tmp_path / "export"), verbose=False)
    exported = torch.load(os.path.join(folder, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert _equal(exported["network_weights"], source["samssl"]["parts"]["student"]["weights"])


def test_two_branch_model_exports_one_branch_on_request(nnunet_env, tmp_path, monkeypatch):
    """CPAC-SAM predicts with the mean of two decoders: the export refuses without --part, and --part branch_a /
    branch_b give the plain network of that branch, whose output equals the branch's output in the dual network."""
    import trainer_helpers
    from nnunetv2_samssl.training.nnUNetTrainerCPACSAM import nnUNetTrainerCPACSAM

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setattr("nnunetv2_samssl.sam.registry.build_promptable_model", lambda *a, **k: _tiny())
    trainer = trainer_helpers.make_trainer(nnUNetTrainerCPACSAM, nnunet_env, sam_backend="sam_med3d",
                                           sam_random_init=True)
    trainer.initialize()
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(os.path.join(nnunet_env.dataset_pp, f if f != "plans.json" else "nnUNetPlans.json"),
                    os.path.join(trainer.output_folder_base, f))
    trainer_name, out = "nnUNetTrainerCPACSAM", str(tmp_path / "export")
    with pytest.raises(ExportError, match="two decoders .* --part branch_a or --part branch_b"):
        export_plain(DATASET_ID, CONFIG, trainer_name, out, verbose=False)
    dual = trainer.network
    dual.eval()
    dual.decoder.deep_supervision = False
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        outputs = dict(zip(("branch_a", "branch_b"), dual(x, branches=True)))
    for branch, expected in outputs.items():
        folder = export_plain(DATASET_ID, CONFIG, trainer_name, str(tmp_path / branch), part=branch, verbose=False)
        weights = torch.load(os.path.join(folder, "fold_0", "checkpoint_final.pth"), weights_only=False)
        plain = nnUNetTrainer.build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads,
            enable_deep_supervision=False)
        plain.load_state_dict(weights["network_weights"])
        plain.eval()
        with torch.no_grad():
            assert torch.allclose(plain(x), expected, atol=1e-5)


def _tiny():
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable
    torch.manual_seed(0)
    return SAMMed3DPromptable.from_checkpoint(None, config="tiny", random_init=True)


def test_one_line_errors(nnunet_env, tmp_path, capsys):
    out = str(tmp_path / "export")
    with pytest.raises(ExportError, match=f"No trained model: .*{TRAINER}__{IDENTIFIER} does not exist"):
        export_plain(DATASET_ID, CONFIG, TRAINER, out)
    _fake_trained_folder(nnunet_env)
    with pytest.raises(ExportError, match=r"fold_0/checkpoint_best\.pth not found"):
        export_plain(DATASET_ID, CONFIG, TRAINER, out, checkpoints=["checkpoint_best.pth"])
    trained = os.path.join(nnunet_env.results, DATASET_NAME, f"{TRAINER}__{IDENTIFIER}", "fold_0")
    with open(os.path.join(trained, "checkpoint_best.pth"), "wb") as f:
        f.write(open(os.path.join(trained, "checkpoint_final.pth"), "rb").read()[:1000])  # truncated
    with pytest.raises(ExportError, match=r"fold_0/checkpoint_best\.pth cannot be read"):
        export_plain(DATASET_ID, CONFIG, TRAINER, out, checkpoints=["checkpoint_best.pth"])
    os.remove(os.path.join(trained, "checkpoint_best.pth"))
    with pytest.raises(ExportError, match=r"has no fold_3 \(trained folds: \['fold_0'\]\)"):
        export_plain(DATASET_ID, CONFIG, TRAINER, out, folds=["3"])
    with pytest.raises(ExportError, match="has no part 'ghost'"):
        export_plain(DATASET_ID, CONFIG, TRAINER, out, part="ghost")
    assert export_plain(DATASET_ID, CONFIG, TRAINER, out, verbose=False)  # a failed export can be redone
    # a genuine nnUNetTrainer model in the target is never overwritten
    other = str(tmp_path / "other")
    os.makedirs(os.path.join(other, DATASET_NAME, f"nnUNetTrainer__{IDENTIFIER}"))
    with pytest.raises(SystemExit) as e:
        main(["-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-o", other])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "was not written by this command" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_plain_nnunet_predicts_like_the_package(nnunet_env, tmp_path):
    """Train a tiny Mean Teacher fold (predict_with: teacher), export it, predict with nnU-Net alone (this package
    not importable) and with the package: identical segmentations and probabilities. Then the zip round trip
    (nnUNetv2_export_model_to_zip / nnUNetv2_install_pretrained_model_from_zip), also without the package."""
    settings = ("num_epochs=1 num_iterations_per_epoch=3 num_val_iterations_per_epoch=1 predict_with=teacher "
                "ema_decay=0.5")
    _run(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu"],
         _env(nnunet_env.env(), nnUNet_samssl_overrides=settings))
    fold = os.path.join(nnunet_env.results, DATASET_NAME, f"{TRAINER}__{IDENTIFIER}", "fold_0")
    trained = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    teacher = trained["samssl"]["parts"]["teacher"]["weights"]
    student = trained["samssl"]["parts"]["student"]["weights"]
    assert _differs(teacher, student)  # else this test could not tell the two apart

    export_root = str(tmp_path / "exported_results")
    out = _run(["nnUNetv2_samssl_export_plain", "-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-f", "0",
                "-o", export_root], _env(nnunet_env.env()))
    assert "fold_0/checkpoint_final.pth: weights of the teacher" in out
    exported_file = os.path.join(export_root, DATASET_NAME, f"nnUNetTrainer__{IDENTIFIER}", "fold_0",
                                 "checkpoint_final.pth")
    exported = torch.load(exported_file, weights_only=False)
    assert _equal(exported["network_weights"], teacher) and _differs(exported["network_weights"], student)

    images = os.path.join(nnunet_env.dataset_raw, "imagesTs")
    predict = ["-i", images, "-d", DATASET_NAME, "-c", CONFIG, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
               "--save_probabilities", "--disable_tta"]
    with_package = str(tmp_path / "pred_package")
    _run(["nnUNetv2_predict", *predict, "-o", with_package, "-tr", TRAINER], _env(nnunet_env.env()))
    plain_env = _env({"nnUNet_results": export_root, "nnUNet_raw": nnunet_env.raw})
    plain_env.pop("nnUNet_preprocessed", None)
    without_package = str(tmp_path / "pred_plain")
    _run_without_package("nnunetv2.inference.predict_from_raw_data:predict_entry_point",
                         [*predict, "-o", without_package, "-tr", "nnUNetTrainer"], plain_env, str(tmp_path))
    cases = sorted(os.path.basename(f) for f in glob.glob(os.path.join(with_package, "*.nii.gz")))
    assert cases == ["ts_000.nii.gz", "ts_001.nii.gz"]
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(with_package, case)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(without_package, case)))
        np.testing.assert_array_equal(a, b)
        name = case[:-len(".nii.gz")] + ".npz"
        np.testing.assert_array_equal(np.load(os.path.join(with_package, name))["probabilities"],
                                      np.load(os.path.join(without_package, name))["probabilities"])

    # the zip round trip, with nnU-Net alone
    zip_file = str(tmp_path / "model.zip")
    _run_without_package("nnunetv2.model_sharing.entry_points:export_pretrained_model_entry",
                         ["-d", DATASET_NAME, "-o", zip_file, "-c", CONFIG, "-tr", "nnUNetTrainer", "-f", "0"],
                         plain_env, str(tmp_path))
    installed_root = str(tmp_path / "installed_results")
    os.makedirs(installed_root)
    _run_without_package("nnunetv2.model_sharing.entry_points:install_from_zip_entry_point", [zip_file],
                         _env({"nnUNet_results": installed_root}), str(tmp_path))
    installed = os.path.join(installed_root, DATASET_NAME, f"nnUNetTrainer__{IDENTIFIER}", "fold_0",
                             "checkpoint_final.pth")
    assert open(installed, "rb").read() == open(exported_file, "rb").read()
