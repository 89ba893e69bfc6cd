"""``nnUNetv2_samssl_demo``: the whole semi-supervised workflow on the built-in synthetic dataset, on CPU.

The dataset has shifted cohorts (``make_demo_dataset(shifted=True)``): the few labeled cases come from one
SOURCE site; the unlabeled images and the held-out test cases come from three other sites (weaker contrast with
a strong bias field, blur and noise, a smaller organ), as a new cohort from other scanners would.
Everything goes through the stock nnU-Net commands, as a user would type them:

1. write the demo dataset (labeled, unlabeled and held-out test cases) into ``WORKDIR/nnUNet_raw``;
2. ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_samssl_preprocess_unlabeled``;
3. train, with the same few labeled SOURCE cases (``labeled_cases``; the fold's other training cases become
   unlabeled, their labels hidden): ``nnUNetTrainerLabeledSubset`` (labeled-only nnU-Net),
   ``nnUNetTrainerMeanTeacher`` with the bundled ``mean_teacher_strong`` preset (what the shifted few-label
   benchmark found to help: a strongly perturbed student view, the teacher's confident argmax at full weight) and
   ``nnUNetTrainerSemiSAM`` with the same consistency settings plus its SAM term (real LiteMedSAM weights, slice
   by slice), the latter two also using every unlabeled image;
4. ``nnUNetv2_predict`` the held-out cases and print their Dice per class (nnU-Net's
   ``compute_metrics_on_folder``; a class absent from both prediction and reference of a case has no Dice
   there and is left out of that class's mean, as in nnU-Net's ``summary.json``);
5. what SAM adds: the Dice of SemiSAM's SAM pseudo-labels and of the predictions that prompted them, as the
   trainer logged them on the unlabeled training cases whose labels are hidden (diagnostics only), and on the
   held-out case of the picture: the SemiSAM trainer's own SAM branch (its saved settings, LiteMedSAM)
   prompted by SemiSAM's predicted probabilities of that case, the pseudo-label SemiSAM would learn from on
   that image (a panel of the picture);
6. the picture: one held-out slice, each trainer's prediction and the SAM pseudo-label next to the reference.

The planned U-Net is narrowed (16 .. 128 features per stage instead of nnU-Net's 32 .. 256 for this patch) so
that the three trainers learn both classes on a CPU within the demo's minutes; everything else is as planned.

Finished steps are reused when the command is run again on the same work folder; a trained fold only if it was
trained with the present settings and schedule (``demo_trainers.json`` records them), else the demo stops and says
what to delete.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_samssl.benchmark.fewlabel import format_override
from nnunetv2_samssl.evaluation.metrics import mean_foreground_dice

if TYPE_CHECKING:
    from nnunetv2_samssl.evaluation.metrics import FolderDice

DATASET_ID = 901
DATASET = "Dataset901_SamsslDemo"
CONFIG = "3d_fullres"

# the settings of the bundled mean_teacher_strong preset (strong student view, the teacher's confident argmax at
# full weight): what the shifted few-label benchmark found to help (examples/fewlabel/README.md); SemiSAM takes
# them too, so that its row differs from Mean Teacher's by the SAM term (a test keeps them equal to the preset)
STRONG_CONSISTENCY = ("student_view=strong strong_view_strength=1.0 consistency_loss=hard_cross_entropy "
                      "consistency_threshold=0.9 consistency_weight=1.0 consistency_rampup=1.0")
# the logged Dice of teacher and student against the hidden labels (logged only, never in a loss) costs ~3 % of a
# step on CPU and the demo prints none of it; the SAM branch's diagnostics, which it prints, stay on
NO_TEACHER_DIAGNOSTICS = "teacher_diagnostics=false"
# trainer -> (bundled config, nnUNet_samssl_config; settings, nnUNet_samssl_overrides) of the demo, on top of the
# shared schedule; None = the trainer's default config
TRAINERS: Dict[str, Tuple[Optional[str], str]] = {
    "nnUNetTrainerLabeledSubset": (None, ""),
    "nnUNetTrainerMeanTeacher": ("mean_teacher_strong", NO_TEACHER_DIAGNOSTICS),
    "nnUNetTrainerSemiSAM": (None, STRONG_CONSISTENCY + " sam_backend=litemedsam sam_num_clicks=3 sam_every=8 "
                                   "sam_max_crops=1 " + NO_TEACHER_DIAGNOSTICS),
}
TRAINED_WITH = "demo_trainers.json"  # in the work folder: the config and settings each trainer's fold was trained with
SAM_TRAINER = "nnUNetTrainerSemiSAM"
SAM_ROW = "SAM pseudo-label"  # panel of the SAM branch prompted by SAM_TRAINER's prediction
FILE_ENDING = ".nii.gz"  # of the demo dataset
# the demo dataset: 4 labeled SOURCE-site cases of which the fold's first --num-labeled are used, 6 labeled
# target-site cases (their labels hidden in training, scored only in logged diagnostics), unlabeled and test
# images from the target sites
DATASET_CASES = dict(num_labeled=10, num_unlabeled=12, num_test=8, shifted=True, num_source=4, shape=(24, 40, 40))


DEFAULT_EPOCHS, DEFAULT_ITERATIONS = 10, 30
NETWORK_WIDTHS = (16, 128)  # features of the first stage, and the most of any stage (nnU-Net plans 32 .. 320)


def planned_widths(dataset_pp: str, configuration: str) -> List[int]:
    with open(os.path.join(dataset_pp, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    return list(plans["configurations"][configuration]["architecture"]["arch_kwargs"]["features_per_stage"])


def set_network_widths(dataset_pp: str, first: int, widest: int) -> None:
    """Sets every configuration's U-Net in the dataset's nnUNetPlans.json to ``first``, 2 x ``first``, ...
    features per stage (at most ``widest``); stages, kernels, strides, patch and batch size stay as planned. The
    preprocessed data, the unlabeled images' included, does not depend on the widths."""
    plans_file = os.path.join(dataset_pp, "nnUNetPlans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    for configuration in plans["configurations"].values():
        arch = configuration.get("architecture", {}).get("arch_kwargs", {})
        if "features_per_stage" in arch:
            arch["features_per_stage"] = [min(first * 2 ** i, widest) for i in range(len(arch["features_per_stage"]))]
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=2)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the SAM branch's check; imported here lazily, with torch)."""
    from nnunetv2_samssl.sam.branch import cpu_has_native_bf16 as native

    return native()


def demo_schedule(epochs: int, iterations: int, labeled: Sequence[str], seed: int) -> str:
    """The overrides every trainer of the demo shares: its schedule, its labeled cases, no final validation of the
    fold's validation cases (the demo scores the held-out test cases; ``nnUNetv2_train ... --val`` would run it)
    and its ``training_seed`` (none when ``seed`` < 0)."""
    schedule = (f"num_epochs={epochs} num_iterations_per_epoch={iterations} num_val_iterations_per_epoch=1 "
                "final_validation=false " + format_override("labeled_cases", labeled))
    return schedule if seed < 0 else f"{schedule} training_seed={seed}"


def demo_trainer_settings(trainers: Sequence[str], schedule: str, native_bf16: bool) -> Dict[str, dict]:
    """trainer -> its bundled config and overrides (the shared schedule, then the trainer's own settings). On a
    CPU with native bf16 the SAM branch runs under bf16 autocast (``sam_cpu_bf16``: LiteMedSAM's encoder about 2x
    faster there, its pseudo-labels within a fraction of a Dice point of float32's); elsewhere in float32."""
    settings = {}
    for trainer in trainers:
        config, own = TRAINERS[trainer]
        if trainer == SAM_TRAINER and native_bf16:
            own = f"{own} sam_cpu_bf16=true"
        settings[trainer] = {"config": config, "overrides": f"{schedule} {own}".strip()}
    return settings


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _run(args: Sequence[str], env: Dict[str, str], log: str, shown_env: Sequence[str] = ()) -> None:
    """Runs a command of the venv, its output into ``log``; ``shown_env``: variables printed before the command."""
    start = time.time()
    command = " ".join([f"{k}={env[k]}" for k in shown_env] + list(args))
    print(f"$ {command}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {command}\n")
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


def labeled_source_cases(folders: Mapping[str, str], raw_dataset_folder: str, num_labeled: int) -> List[str]:
    """The first ``num_labeled`` SOURCE-site cases (``cohorts.json``) among fold 0's training cases, from nnU-Net's
    split (``splits_final.json``, written as ``nnUNetTrainer.do_split`` writes it when missing)."""
    from nnunetv2_samssl.benchmark.fewlabel import fold_split, labeled_pool
    with open(os.path.join(raw_dataset_folder, "cohorts.json")) as f:
        source = json.load(f)["source"]
    previous = os.environ.get("nnUNet_preprocessed")
    os.environ["nnUNet_preprocessed"] = folders["nnUNet_preprocessed"]  # nnU-Net reads it when used
    try:
        pool, _ = labeled_pool(fold_split(DATASET, CONFIG, 0), source, 0)
    finally:
        if previous is None:
            del os.environ["nnUNet_preprocessed"]
        else:
            os.environ["nnUNet_preprocessed"] = previous
    if not 1 <= num_labeled <= len(pool):
        raise SystemExit(f"--num-labeled {num_labeled}: fold 0 trains on {len(pool)} source-site cases "
                         f"({', '.join(pool)}); ask for 1 to {len(pool)}.")
    return list(pool[:num_labeled])


def sam_pseudo_labels_of_predictions(fold_folder: str, raw_dataset_folder: str, prediction_folder: str,
                                     output_folder: str, cases: Optional[Sequence[str]] = None, seed: int = 0) -> str:
    """The SAM pseudo-labels a trained SemiSAM model's own SAM branch makes from its predictions of the held-out
    images (``imagesTs``; ``cases``: only these), written as label maps into ``output_folder`` (file names as
    ``labelsTs``).

    The branch is built from the fold's saved settings (``samssl_config.yaml``: backend, checkpoint, labeler) and
    sees each image as the trainer does (nnU-Net's normalisation of the plans, at the configuration's spacing;
    the demo's images are already at that spacing and are not cropped), prompted by the probabilities
    ``nnUNetv2_predict --save_probabilities`` wrote (``<case>.npz``), with whole-slice windows as in the cached
    refresh, on every slice where something is predicted (``sam_max_crops`` subsamples the windows of a training
    step; here every window is labeled). Where SAM covers nothing the prompting prediction is kept. No label is
    read to make them.
    """
    import dataclasses

    import SimpleITK as sitk
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_samssl.config.schema import resolve_saved_config
    from nnunetv2_samssl.config.settings import SEMISAM_LAYOUT, Settings, options_of
    from nnunetv2_samssl.pseudo_labels.sam_online import build_sam_labeler
    from nnunetv2_samssl.training.labeled_subset import SAVED_CONFIG

    cfg, _, _ = resolve_saved_config(options_of(SEMISAM_LAYOUT), "semisam", os.path.join(fold_folder, SAVED_CONFIG))
    settings = Settings.from_config(SEMISAM_LAYOUT, cfg)
    dataset_json = load_json(os.path.join(raw_dataset_folder, "dataset.json"))
    # every window SAM is prompted in, not the training steps' random subset of them (sam_max_crops)
    labeler = build_sam_labeler(settings.sam_model, dataclasses.replace(settings.sam_labeler, max_crops=None),
                                torch.device("cpu"), dataset_json["channel_names"])
    plans = PlansManager(os.path.join(os.path.dirname(fold_folder), "plans.json"))
    configuration = plans.get_configuration(CONFIG)
    # the normalisation nnU-Net's preprocessor applies to channel 0, found the way it finds it
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    scheme = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "preprocessing", "normalization"),
                                         configuration.normalization_schemes[0],
                                         "nnunetv2.preprocessing.normalization")
    properties = plans.plans["foreground_intensity_properties_per_channel"]["0"]
    os.makedirs(output_folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for image_file in _case_files(os.path.join(raw_dataset_folder, "imagesTs")):
        case = image_file[:-len("_0000" + FILE_ENDING)]
        if cases is not None and case not in cases:
            continue
        case_file = case + FILE_ENDING
        itk = sitk.ReadImage(os.path.join(raw_dataset_folder, "imagesTs", image_file))
        spacing = tuple(itk.GetSpacing()[::-1])
        if not np.allclose(spacing, configuration.spacing):
            raise RuntimeError(f"{case}: spacing {spacing} differs from the configuration's {configuration.spacing}")
        image = scheme(use_mask_for_norm=configuration.use_mask_for_norm[0],
                       intensityproperties=properties).run(sitk.GetArrayFromImage(itk).astype(np.float32))
        probabilities = np.load(os.path.join(prediction_folder, f"{case}.npz"))["probabilities"]
        pseudo = labeler(torch.from_numpy(image)[None, None], torch.from_numpy(probabilities.astype(np.float32))[None],
                         patch_spacing=configuration.spacing, generator=generator,
                         windows=settings.sam_source.sam_cache_windows)
        labels = pseudo.hard_label[0].numpy().astype(np.uint8)
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(itk)
        sitk.WriteImage(out, os.path.join(output_folder, case_file), useCompression=True)
    return output_folder


def gains_text(results: Mapping[str, FolderDice]) -> str:
    """Plain lines saying, in mean Dice points, what the unlabeled images changed, whatever the sign."""
    base = results.get("nnUNetTrainerLabeledSubset")
    lines = [f"{name} vs labeled-only nnU-Net: {100 * (scores.mean - base.mean):+.1f} Dice points (mean)"
             for name, scores in results.items() if base is not None and name != "nnUNetTrainerLabeledSubset"]
    if lines:
        lines.append("One short run on CPU, one seed: not evidence of a gain. Repeated runs of this setup: "
                     "examples/fewlabel/README.md (\"The demo's shifted cohorts, repeated\").")
    return "\n".join(lines)


_LOGGED_SAM = re.compile(r"sam_pseudo_dice ([-+0-9.eainf]+), prompt_dice ([-+0-9.eainf]+)")


def logged_sam_diagnostics(fold_folder: str, last_epochs: int = 5) -> Optional[Tuple[float, float, int]]:
    """Mean logged Dice of the SAM pseudo-labels and of the predictions that prompted them, against the hidden
    labels of the unlabeled training cases that have them (the trainer's ``sam_diagnostics``, logged only), over
    the last ``last_epochs`` epochs that logged a number; with the number of epochs. ``None`` without any."""
    logs = sorted(f for f in os.listdir(fold_folder) if f.startswith("training_log_") and f.endswith(".txt"))
    pairs = []
    for name in logs:
        with open(os.path.join(fold_folder, name)) as f:
            for match in _LOGGED_SAM.finditer(f.read()):
                sam, prompt = float(match.group(1)), float(match.group(2))
                if not (np.isnan(sam) or np.isnan(prompt)):
                    pairs.append((sam, prompt))
    if not pairs:
        return None
    kept = np.array(pairs[-last_epochs:])
    return float(kept[:, 0].mean()), float(kept[:, 1].mean()), len(kept)


def sam_text(logged: Optional[Tuple[float, float, int]], case: str, sam_dice: float, prompt_dice: float) -> str:
    """The lines saying what SAM made of the SemiSAM predictions."""
    lines = [f"What SAM adds to {SAM_TRAINER} (Dice of its SAM pseudo-labels and of the prediction that prompted "
             f"them):"]
    if logged is not None:
        sam, prompt, epochs = logged
        lines.append(f"  during training, unlabeled patches with hidden labels (logged only, last {epochs} epochs): "
                     f"SAM {sam:.3f}, prompting prediction {prompt:.3f} ({100 * (sam - prompt):+.1f} points)")
    lines.append(f"  held-out case {case} of the picture, every slice with something predicted: SAM {sam_dice:.3f}, "
                 f"prompting prediction {prompt_dice:.3f} ({100 * (sam_dice - prompt_dice):+.1f} points)")
    return "\n".join(lines)


def _case_files(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(FILE_ENDING)) if os.path.isdir(folder) else []


def _json_number(value: float):
    return None if np.isnan(value) else value


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_samssl_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.abspath("samssl_demo"), help="work folder (default ./samssl_demo)")
    parser.add_argument("--num-labeled", type=int, default=2,
                        help="labeled source-site training cases used (default 2)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="training iterations per epoch")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--seed", type=int, default=0,
                        help="training_seed of every trainer: the same initial weights and labeled patches for all, "
                             "and a run that repeats the README's (default 0; -1: unseeded, as nnU-Net)")
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
        make_demo_dataset(folders["nnUNet_raw"], DATASET_ID, overwrite=True, **DATASET_CASES)
    elif not os.path.isfile(os.path.join(raw, "cohorts.json")):
        raise SystemExit(f"{raw} was written by an earlier version of the demo (no cohorts.json): delete {work} or "
                         f"pass another --workdir.")
    if not os.path.isdir(os.path.join(folders["nnUNet_preprocessed"], DATASET, "nnUNetPlans_3d_fullres")):
        # -npfp: nnU-Net's fingerprint extraction starts 8 processes by default, slower than 2 on a small machine
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2", "-npfp", "2"], env,
             log)
        pp = os.path.join(folders["nnUNet_preprocessed"], DATASET)
        print(f"$ (demo) U-Net of {CONFIG} narrowed to {NETWORK_WIDTHS[0]}..{NETWORK_WIDTHS[1]} features per stage "
              f"in nnUNetPlans.json (planned: {' '.join(map(str, planned_widths(pp, CONFIG)))}), so that three "
              f"trainers train in minutes on a CPU", flush=True)
        set_network_widths(pp, *NETWORK_WIDTHS)
    _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", CONFIG], env, log)

    train_env = dict(env, nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"))
    labeled = labeled_source_cases(folders, raw, args.num_labeled)
    schedule = demo_schedule(args.epochs, args.iterations, labeled, args.seed)
    folds = {t: os.path.join(folders["nnUNet_results"], DATASET, f"{t}__nnUNetPlans__{CONFIG}", "fold_0")
             for t in args.trainers}
    trained_with = demo_trainer_settings(args.trainers, schedule, cpu_has_native_bf16())
    for trainer in args.trainers:  # every reused fold checked before any training
        check_trained_with(work, trainer, folds[trainer], trained_with[trainer])
    results = {}
    for trainer in args.trainers:
        fold = folds[trainer]
        prediction = os.path.join(work, "predictions", trainer)
        if not os.path.isfile(os.path.join(fold, "checkpoint_final.pth")):
            resume = ["--c"] if os.path.isdir(fold) else []
            record_trained_with(work, trainer, trained_with[trainer])
            trainer_env = dict(train_env, nnUNet_samssl_overrides=trained_with[trainer]["overrides"])
            if trained_with[trainer]["config"] is not None:
                trainer_env["nnUNet_samssl_config"] = trained_with[trainer]["config"]
            _run(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", trainer, "-device", "cpu", *resume],
                 trainer_env, log, shown_env=[k for k in ("nnUNet_samssl_config",) if k in trainer_env])
            shutil.rmtree(prediction, ignore_errors=True)  # made by a model trained before: predict again
        # SAM_TRAINER's probabilities prompt its SAM branch below
        extra = ["--save_probabilities"] if trainer == SAM_TRAINER else []
        wanted = _case_files(os.path.join(raw, "labelsTs"))
        if not set(wanted) <= set(_case_files(prediction)) or (
                extra and not all(os.path.isfile(os.path.join(prediction, c[:-len(FILE_ENDING)] + ".npz"))
                                  for c in wanted)):
            # -npp 0 -nps 0: nnU-Net predicts in its own process; worker processes cost more start-up than these
            # small cases cost to preprocess and export
            _run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", prediction, "-d", str(DATASET_ID),
                  "-c", CONFIG, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
                  "--disable_tta", *extra], env, log)
        results[trainer] = evaluate_predictions(prediction, raw, 1)  # one worker: small cases, start-up dominates
    folders_of = {t: os.path.join(work, "predictions", t) for t in results}
    print("\n" + results_table(results, f"Held-out Dice ({len(_case_files(os.path.join(raw, 'labelsTs')))} test "
                                        f"cases from 3 other sites, {len(labeled)} labeled source-site training "
                                        f"cases, {args.epochs} x {args.iterations} iterations on CPU):"))
    print(gains_text(results))
    with open(os.path.join(work, "demo_results.json"), "w") as f:  # null = class absent from every test case
        json.dump({t: {n: _json_number(v) for n, v in r.per_class.items()} for t, r in results.items()}, f, indent=2)
    if SAM_TRAINER in results:  # the SAM pseudo-label of the picture's case, prompted by SAM_TRAINER's prediction
        case = figure_case(raw)
        sam_folder = folders_of[SAM_ROW] = os.path.join(work, "predictions", "sam_pseudo_labels")
        fold = os.path.join(folders["nnUNet_results"], DATASET, f"{SAM_TRAINER}__nnUNetPlans__{CONFIG}", "fold_0")
        sam_pseudo_labels_of_predictions(fold, raw, folders_of[SAM_TRAINER], sam_folder, cases=[case])
        reference = _read_labels(os.path.join(raw, "labelsTs", case + FILE_ENDING))
        num_classes = len(read_label_names_of(raw)) + 1
        print("\n" + sam_text(logged_sam_diagnostics(fold), case,
                              mean_foreground_dice(_read_labels(os.path.join(sam_folder, case + FILE_ENDING)),
                                                   reference, num_classes),
                              mean_foreground_dice(_read_labels(os.path.join(folders_of[SAM_TRAINER],
                                                                             case + FILE_ENDING)),
                                                   reference, num_classes)))
    figure = demo_figure(raw, folders_of, os.path.join(work, "demo_heldout_slice.png"))
    print(f"\nPicture of one held-out slice per trainer: {figure}")


def _trained_with(work: str) -> Dict[str, dict]:
    path = os.path.join(work, TRAINED_WITH)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_trained_with(work: str, trainer: str, fold: str, wanted: Mapping[str, Optional[str]]) -> None:
    """A fold of the work folder is reused (predicted, or resumed) only if it was trained with the demo's present
    config and settings for ``trainer``, schedule included; else the demo stops before any training, naming the fix."""
    if not os.path.isdir(fold):
        return
    recorded = _trained_with(work).get(trainer)
    if recorded != dict(wanted):
        what = ("by an earlier version of the demo" if recorded is None else
                f"with other settings (config {recorded.get('config')}, '{recorded.get('overrides')}'; now "
                f"config {wanted['config']}, '{wanted['overrides']}')")
        raise SystemExit(f"{fold} was trained {what}: delete {os.path.dirname(fold)} (or the work folder {work}) "
                         f"or pass another --workdir.")


def record_trained_with(work: str, trainer: str, wanted: Mapping[str, Optional[str]]) -> None:
    recorded = _trained_with(work)
    recorded[trainer] = dict(wanted)
    with open(os.path.join(work, TRAINED_WITH), "w") as f:
        json.dump(recorded, f, indent=2)


def figure_case(raw_dataset_folder: str) -> str:
    """The held-out case of the picture: the first of ``labelsTs``."""
    return _case_files(os.path.join(raw_dataset_folder, "labelsTs"))[0][:-len(FILE_ENDING)]


def read_label_names_of(raw_dataset_folder: str) -> Dict[int, str]:
    from nnunetv2_samssl.demo.figure import read_label_names
    with open(os.path.join(raw_dataset_folder, "dataset.json")) as f:
        return read_label_names(json.load(f))


def _read_labels(path: str) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path))[None].astype(np.int64)


def demo_figure(raw_dataset_folder: str, prediction_folders: Dict[str, str], path: str) -> str:
    """The picture of the first held-out case: its slice showing the most classes, each trainer's prediction."""
    import SimpleITK as sitk
    from nnunetv2_samssl.demo.figure import pick_slice, save_segmentation_figure

    case = figure_case(raw_dataset_folder)
    case_file = case + FILE_ENDING

    def read(file: str) -> np.ndarray:  # (z, y, x)
        return sitk.GetArrayFromImage(sitk.ReadImage(file))

    reference = read(os.path.join(raw_dataset_folder, "labelsTs", case_file))
    image = read(os.path.join(raw_dataset_folder, "imagesTs", f"{case}_0000{FILE_ENDING}"))
    z = pick_slice(reference)
    names = read_label_names_of(raw_dataset_folder)
    panels = {trainer: read(os.path.join(folder, case_file))[z] for trainer, folder in prediction_folders.items()}
    return save_segmentation_figure(path, image[z], reference[z], panels, names,
                                    title=f"held-out case {case}, slice {z}: reference in white")


if __name__ == "__main__":
    main()
