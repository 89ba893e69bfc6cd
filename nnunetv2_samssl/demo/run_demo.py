"""``nnUNetv2_samssl_demo``: the whole semi-supervised workflow on the built-in synthetic dataset, on CPU.

Everything goes through the stock nnU-Net commands, as a user would type them:

1. write the demo dataset (labeled, unlabeled and held-out test cases) into ``WORKDIR/nnUNet_raw``;
2. ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_samssl_preprocess_unlabeled``;
3. train, with the same few labeled cases: ``nnUNetTrainerLabeledSubset`` (labeled-only nnU-Net),
   ``nnUNetTrainerMeanTeacher`` and ``nnUNetTrainerSemiSAM`` (real LiteMedSAM weights, slice by slice),
   the latter two also using every unlabeled image;
4. ``nnUNetv2_predict`` the held-out cases and print their Dice per class.

Finished steps are reused when the command is run again on the same work folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

DATASET_ID = 901
DATASET = "Dataset901_SamsslDemo"
CONFIG = "3d_fullres"

# trainer -> settings (nnUNet_samssl_overrides) used in the demo, on top of the shared schedule
TRAINERS: Dict[str, str] = {
    "nnUNetTrainerLabeledSubset": "",
    "nnUNetTrainerMeanTeacher": "",
    "nnUNetTrainerSemiSAM": "sam_backend=litemedsam sam_num_clicks=3 sam_every=4 sam_max_crops=2",
}
LABELS = {"organ": 1, "lesion": 2}


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


def dice_per_class(prediction_folder: str, reference_folder: str, labels: Dict[str, int]) -> Dict[str, float]:
    """Mean Dice per class over the cases of ``reference_folder`` (case files ``*.nii.gz``)."""
    import SimpleITK as sitk
    scores: Dict[str, List[float]] = {name: [] for name in labels}
    for f in sorted(os.listdir(reference_folder)):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(reference_folder, f)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(prediction_folder, f)))
        for name, value in labels.items():
            r, p = ref == value, pred == value
            denominator = r.sum() + p.sum()
            scores[name].append(1.0 if denominator == 0 else 2.0 * np.logical_and(r, p).sum() / denominator)
    return {name: float(np.mean(v)) for name, v in scores.items()}


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
        if not os.path.isdir(prediction) or len(os.listdir(prediction)) < len(os.listdir(os.path.join(raw, "imagesTs"))):
            _run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", prediction, "-d", str(DATASET_ID),
                  "-c", CONFIG, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
                  "--disable_tta"], env, log)
        results[trainer] = dice_per_class(prediction, os.path.join(raw, "labelsTs"), LABELS)

    print(f"\nHeld-out Dice ({len(os.listdir(os.path.join(raw, 'labelsTs')))} test cases, {args.num_labeled} labeled "
          f"training cases, {args.epochs} x {args.iterations} iterations on CPU):")
    print(f"{'trainer':32s} " + " ".join(f"{n:>8s}" for n in LABELS) + "     mean")
    for trainer, scores in results.items():
        values = list(scores.values())
        print(f"{trainer:32s} " + " ".join(f"{v:8.3f}" for v in values) + f" {np.mean(values):8.3f}")
    with open(os.path.join(work, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
