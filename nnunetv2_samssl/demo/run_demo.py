"""``nnUNetv2_samssl_demo``: the whole semi-supervised workflow on the built-in synthetic dataset, on CPU.

Everything goes through the stock nnU-Net commands, as a user would type them:

1. write the demo dataset (labeled, unlabeled and held-out test cases) into ``WORKDIR/nnUNet_raw``;
2. ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_samssl_preprocess_unlabeled``;
3. train, with the same few labeled cases: ``nnUNetTrainerLabeledSubset`` (labeled-only nnU-Net),
   ``nnUNetTrainerMeanTeacher`` and ``nnUNetTrainerSemiSAM`` (real LiteMedSAM weights, slice by slice),
   the latter two also using every unlabeled image;
4. ``nnUNetv2_predict`` the held-out cases and print their Dice per class (nnU-Net's
   ``compute_metrics_on_folder``; a class absent from both prediction and reference of a case has no Dice
   there and is left out of that class's mean, as in nnU-Net's ``summary.json``).

Finished steps are reused when the command is run again on the same work folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Sequence

import numpy as np

if TYPE_CHECKING:
    from nnunetv2_samssl.evaluation.metrics import FolderDice

DATASET_ID = 901
DATASET = "Dataset901_SamsslDemo"
CONFIG = "3d_fullres"

# trainer -> settings (nnUNet_samssl_overrides) used in the demo, on top of the shared schedule
TRAINERS: Dict[str, str] = {
    "nnUNetTrainerLabeledSubset": "",
    "nnUNetTrainerMeanTeacher": "",
    "nnUNetTrainerSemiSAM": "sam_backend=litemedsam sam_num_clicks=3 sam_every=4 sam_max_crops=2",
}
FILE_ENDING = ".nii.gz"  # of the demo dataset


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _run(args: Sequence[str], env: Dict[str, str], log: str) -> None:
    start = time.time()
    print(f"$ {' '.join(args)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([_bin(args[0]), *args[1:]], env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"FAILED ({r.returncode}): {' '.join(args)}\n--- last lines of {log} ---\n{tail}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def evaluate_predictions(prediction_folder: str, raw_dataset_folder: str, num_processes: int = None) -> FolderDice:
    """Dice per class of the held-out predictions against ``labelsTs``, by nnU-Net's ``compute_metrics_on_folder``
    (reader/writer, file ending and labels of the dataset's ``dataset.json``); nnU-Net's ``summary.json`` is
    saved in ``prediction_folder``.

    A test case where a class is absent from both its prediction and its reference has no Dice for that class
    (NaN, nnU-Net's convention) and is left out of the class's mean over the cases; the class mean is NaN only
    when that holds for every test case. Returns a :class:`nnunetv2_samssl.evaluation.metrics.FolderDice`.
    """
    from nnunetv2_samssl.evaluation.metrics import dice_per_class_on_folders
    return dice_per_class_on_folders(prediction_folder, os.path.join(raw_dataset_folder, "labelsTs"),
                                     os.path.join(raw_dataset_folder, "dataset.json"),
                                     output_file=os.path.join(prediction_folder, "summary.json"),
                                     num_processes=num_processes)


def results_table(results: Dict[str, FolderDice], title: str) -> str:
    """The printed table: one row per trainer, the mean Dice of each class and nnU-Net's foreground mean."""
    classes = list(next(iter(results.values())).per_class) if results else []
    lines = [title, f"{'trainer':32s} " + " ".join(f"{n:>8s}" for n in classes) + "     mean"]
    for trainer, scores in results.items():
        values = [scores.per_class[n] for n in classes] + [scores.mean]
        lines.append(f"{trainer:32s} " + " ".join(f"{v:8.3f}" for v in values))
    lines += ["Per class: mean Dice over the test cases (nnU-Net's compute_metrics_on_folder). A case where a class is "
              "absent from both",
              "prediction and reference has no Dice for it and is left out (nnU-Net's convention); nan = absent from "
              "both in every case.",
              "mean: nnU-Net's foreground mean, the mean of the class columns (nan if one of them is nan)."]
    return "\n".join(lines)


def _case_files(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(FILE_ENDING)) if os.path.isdir(folder) else []


def _json_number(value: float):
    return None if np.isnan(value) else value


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_samssl_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.abspath("samssl_demo"), help="work folder (default ./samssl_demo)")
    parser.add_argument("--num-labeled", type=int, default=2, help="labeled training cases used (default 2)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=8, help="training iterations per epoch")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    args = parser.parse_args(argv)

    work = os.path.abspath(args.workdir)
    folders = {k: os.path.join(work, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for f in folders.values():
        os.makedirs(f, exist_ok=True)
    log = os.path.join(work, "demo.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_samssl")}
    env.update(folders)
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("nnUNet_compile", "0")
    print(f"Work folder: {work} (full log: {log})")

    raw = os.path.join(folders["nnUNet_raw"], DATASET)
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        from nnunetv2_samssl.demo.synthetic import make_demo_dataset
        make_demo_dataset(folders["nnUNet_raw"], DATASET_ID, overwrite=True)
    if not os.path.isdir(os.path.join(folders["nnUNet_preprocessed"], DATASET, "nnUNetPlans_3d_fullres")):
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2"], env, log)
    _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", CONFIG], env, log)

    train_env = dict(env, nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"))
    schedule = (f"num_epochs={args.epochs} num_iterations_per_epoch={args.iterations} "
                f"num_val_iterations_per_epoch=1 num_labeled={args.num_labeled}")
    results = {}
    for trainer in args.trainers:
        fold = os.path.join(folders["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__{CONFIG}", "fold_0")
        if not os.path.isfile(os.path.join(fold, "checkpoint_final.pth")):
            overrides = f"{schedule} {TRAINERS[trainer]}".strip()
            resume = ["--c"] if os.path.isdir(fold) else []
            _run(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", trainer, "-device", "cpu", *resume],
                 dict(train_env, nnUNet_samssl_overrides=overrides), log)
        prediction = os.path.join(work, "predictions", trainer)
        if not set(_case_files(os.path.join(raw, "labelsTs"))) <= set(_case_files(prediction)):
            _run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", prediction, "-d", str(DATASET_ID),
                  "-c", CONFIG, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
                  "--disable_tta"], env, log)
        results[trainer] = evaluate_predictions(prediction, raw, int(env["nnUNet_def_n_proc"]))

    print("\n" + results_table(results, f"Held-out Dice ({len(_case_files(os.path.join(raw, 'labelsTs')))} test "
                                        f"cases, {args.num_labeled} labeled training cases, {args.epochs} x "
                                        f"{args.iterations} iterations on CPU):"))
    with open(os.path.join(work, "demo_results.json"), "w") as f:  # null = class absent from every test case
        json.dump({t: {n: _json_number(v) for n, v in r.per_class.items()} for t, r in results.items()}, f, indent=2)
    figure = demo_figure(raw, {t: os.path.join(work, "predictions", t) for t in results},
                         os.path.join(work, "demo_heldout_slice.png"))
    print(f"\nPicture of one held-out slice per trainer: {figure}")


def demo_figure(raw_dataset_folder: str, prediction_folders: Dict[str, str], path: str) -> str:
    """The picture of the first held-out case: its slice showing the most classes, each trainer's prediction."""
    import SimpleITK as sitk
    from nnunetv2_samssl.demo.figure import pick_slice, read_label_names, save_segmentation_figure

    case_file = _case_files(os.path.join(raw_dataset_folder, "labelsTs"))[0]
    case = case_file[:-len(FILE_ENDING)]

    def read(file: str) -> np.ndarray:  # (z, y, x)
        return sitk.GetArrayFromImage(sitk.ReadImage(file))

    reference = read(os.path.join(raw_dataset_folder, "labelsTs", case_file))
    image = read(os.path.join(raw_dataset_folder, "imagesTs", f"{case}_0000{FILE_ENDING}"))
    z = pick_slice(reference)
    with open(os.path.join(raw_dataset_folder, "dataset.json")) as f:
        names = read_label_names(json.load(f))
    panels = {trainer: read(os.path.join(folder, case_file))[z] for trainer, folder in prediction_folders.items()}
    return save_segmentation_figure(path, image[z], reference[z], panels, names,
                                    title=f"held-out case {case}, slice {z}: reference in white")


if __name__ == "__main__":
    main()
