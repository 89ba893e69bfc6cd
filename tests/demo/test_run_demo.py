"""The demo's evaluation of held-out predictions (nnU-Net's compute_metrics_on_folder) and its printed table."""
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_samssl.demo import run_demo
from nnunetv2_samssl.demo.synthetic import make_demo_dataset
from nnunetv2_samssl.evaluation.metrics import FolderDice


def _predictions(raw: Path, folder: Path, change=None) -> str:
    """``labelsTs`` copied as predictions (``change(case, array) -> array`` edits a case), plus a side file as
    ``nnUNetv2_predict`` writes."""
    folder.mkdir(parents=True)
    for f in sorted((raw / "labelsTs").glob("*.nii.gz")):
        if change is None:
            shutil.copy(f, folder / f.name)
            continue
        image = sitk.ReadImage(str(f))
        edited = sitk.GetImageFromArray(change(f.name, sitk.GetArrayFromImage(image)))
        edited.CopyInformation(image)
        sitk.WriteImage(edited, str(folder / f.name))
    (folder / "plans.json").write_text("{}")
    return str(folder)


def test_demo_evaluation_and_table(tmp_path):
    raw = Path(make_demo_dataset(str(tmp_path / "raw"), dataset_id=955, num_labeled=1, num_unlabeled=0, num_test=2,
                                 shape=(16, 20, 20), seed=4))
    cases = sorted(f.name for f in (raw / "labelsTs").glob("*.nii.gz"))
    perfect = _predictions(raw, tmp_path / "perfect")
    empty = _predictions(raw, tmp_path / "empty", lambda case, a: np.zeros_like(a))
    # the first case's reference loses its lesion and so does its prediction: no lesion Dice for that case
    reference = tmp_path / "raw_no_lesion"
    shutil.copytree(raw, reference)
    first = reference / "labelsTs" / cases[0]
    image = sitk.ReadImage(str(first))
    no_lesion = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(image) == 2, 0, sitk.GetArrayFromImage(image))
                                       .astype(np.uint8))
    no_lesion.CopyInformation(image)
    sitk.WriteImage(no_lesion, str(first))
    half = _predictions(reference, tmp_path / "half",
                        lambda case, a: a if case == cases[0] else np.where(a == 2, 0, a))

    results = {"perfect": run_demo.evaluate_predictions(perfect, str(raw), 1),
               "empty": run_demo.evaluate_predictions(empty, str(raw), 1),
               "no_lesion": run_demo.evaluate_predictions(half, str(reference), 1)}
    assert results["perfect"].per_class == {"organ": 1.0, "lesion": 1.0} and results["perfect"].mean == 1.0
    assert results["empty"].per_class == {"organ": 0.0, "lesion": 0.0}
    nl = results["no_lesion"]
    # case 0: lesion absent from both -> NaN, left out (the former demo counted it as 1.0); case 1: lesion missed
    assert math.isnan(nl.per_case[cases[0][:-7]]["lesion"]) and nl.per_case[cases[1][:-7]]["lesion"] == 0.0
    assert nl.per_class["lesion"] == 0.0 and nl.per_class["organ"] == 1.0 and nl.mean == pytest.approx(0.5)
    summary = json.loads((Path(perfect) / "summary.json").read_text())  # nnU-Net's summary, next to the predictions
    assert [Path(c["reference_file"]).name for c in summary["metric_per_case"]] == cases

    table = run_demo.results_table(results, "Held-out Dice:").splitlines()
    assert table[0] == "Held-out Dice:"
    assert table[1].split() == ["trainer", "organ", "lesion", "mean"]
    assert table[2].split() == ["perfect", "1.000", "1.000", "1.000"]
    assert table[3].split() == ["empty", "0.000", "0.000", "0.000"]
    assert table[4].split() == ["no_lesion", "1.000", "0.000", "0.500"]
    assert "absent from both" in "\n".join(table[5:])


def _folder_dice(mean: float) -> FolderDice:
    return FolderDice({"organ": mean, "lesion": mean}, mean, {}, {})


def test_gains_text_says_each_difference_with_its_sign():
    results = {"nnUNetTrainerLabeledSubset": _folder_dice(0.50), "nnUNetTrainerMeanTeacher": _folder_dice(0.47),
               run_demo.SAM_TRAINER: _folder_dice(0.55)}
    lines = run_demo.gains_text(results).splitlines()
    assert lines[0] == "nnUNetTrainerMeanTeacher vs labeled-only nnU-Net: -3.0 Dice points (mean)"
    assert lines[1] == f"{run_demo.SAM_TRAINER} vs labeled-only nnU-Net: +5.0 Dice points (mean)"
    assert "not evidence of a gain" in lines[2] and len(lines) == 3
    assert run_demo.gains_text({"nnUNetTrainerLabeledSubset": _folder_dice(0.5)}) == ""


def test_logged_sam_diagnostics_and_text(tmp_path):
    """The last epochs' logged Dice of the SAM pseudo-labels and of their prompts, from the trainer's log lines;
    epochs without hidden labels (nan) are skipped; a resumed run's second log continues the first."""
    line = ("2026-12-02 05:54:26.533338: sup_loss -0.15, consistency_loss 0.01, sam_weight 0.09, sam_loss 0.0005, "
            "sam_pseudo_dice {}, prompt_dice {}, sam_time_s 4.4, sam_valid_fraction 0.027\n")
    (tmp_path / "training_log_2026_12_2_05_00_00.txt").write_text(
        line.format(0.1, 0.9) + line.format("nan", "nan") + line.format(0.5, 0.4))
    (tmp_path / "training_log_2026_12_2_06_00_00.txt").write_text(line.format(0.7, 0.5) + line.format(0.6, "nan"))
    (tmp_path / "debug.json").write_text("{}")
    sam, prompt, epochs = run_demo.logged_sam_diagnostics(str(tmp_path), last_epochs=2)
    assert (sam, prompt, epochs) == (pytest.approx(0.6), pytest.approx(0.45), 2)
    assert run_demo.logged_sam_diagnostics(str(tmp_path), last_epochs=10)[2] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "training_log_x.txt").write_text(line.format("nan", "nan"))
    assert run_demo.logged_sam_diagnostics(str(empty)) is None

    text = run_demo.sam_text((0.6, 0.45, 2), "ts_000", 0.8, 0.75).splitlines()
    assert "SAM 0.600, prompting prediction 0.450 (+15.0 points)" in text[1] and "last 2 epochs" in text[1]
    assert text[2].endswith("ts_000 of the picture, every slice with something predicted: SAM 0.800, prompting "
                            "prediction 0.750 (+5.0 points)")
    assert len(run_demo.sam_text(None, "ts_000", 0.8, 0.75).splitlines()) == 2


def test_labeled_cases_are_the_folds_first_source_cases(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cohorts.json").write_text(json.dumps({"source": ["tr_000", "tr_001", "tr_002", "tr_003"]}))
    from nnunetv2_samssl.benchmark import fewlabel
    seen = {}

    def fake_split(dataset, configuration, fold):
        seen.update(dataset=dataset, configuration=configuration, fold=fold,
                    preprocessed=os.environ.get("nnUNet_preprocessed"))
        return fewlabel.FoldSplit(("tr_005", "tr_002", "tr_000", "tr_007", "tr_003"), ("tr_001", "tr_004"))

    monkeypatch.setattr(fewlabel, "fold_split", fake_split)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    folders = {"nnUNet_preprocessed": str(tmp_path / "pp")}
    assert run_demo.labeled_source_cases(folders, str(raw), 2) == ["tr_002", "tr_000"]  # split order, train only
    assert seen == dict(dataset=run_demo.DATASET, configuration=run_demo.CONFIG, fold=0,
                        preprocessed=str(tmp_path / "pp"))
    assert "nnUNet_preprocessed" not in os.environ  # restored
    with pytest.raises(SystemExit, match=re.escape("(tr_002, tr_000, tr_003); ask for 1 to 3")):
        run_demo.labeled_source_cases(folders, str(raw), 4)


def _semisam_fold(tiny_dataset, tmp_path, edit=None, **overrides) -> Path:
    import yaml

    from nnunetv2_samssl.config.schema import resolve_config
    from nnunetv2_samssl.config.settings import SEMISAM_LAYOUT, options_of
    from nnunetv2_samssl.training.labeled_subset import SAVED_CONFIG

    fold = tmp_path / "results" / f"{run_demo.SAM_TRAINER}__nnUNetPlans__{run_demo.CONFIG}" / "fold_0"
    fold.mkdir(parents=True)
    shutil.copy(Path(tiny_dataset.dataset_pp) / "nnUNetPlans.json", fold.parent / "plans.json")
    cfg, _ = resolve_config(options_of(SEMISAM_LAYOUT), "semisam", config="semisam", overrides=overrides)
    (fold / SAVED_CONFIG).write_text(yaml.safe_dump({**cfg, **(edit or {})}))
    return fold


def test_sam_pseudo_labels_of_predictions(tiny_dataset, tmp_path):
    """The trained model's SAM branch (its saved settings) prompted by the saved probabilities of each held-out
    image: an empty prediction prompts nothing, a prediction of the reference gives a pseudo-label close to it.
    The labels of the held-out cases are not there to be read."""
    source = Path(tiny_dataset.dataset_raw)
    raw = tmp_path / "raw"
    (raw / "imagesTs").mkdir(parents=True)
    shutil.copy(source / "dataset.json", raw / "dataset.json")
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (source / "imagesTs").glob("*_0000.nii.gz"))
    assert len(cases) == 2
    references = {}
    for i, case in enumerate(cases):
        shutil.copy(source / "imagesTs" / f"{case}_0000.nii.gz", raw / "imagesTs")
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTs" / f"{case}.nii.gz")))
        references[case] = reference
        predicted = reference if i == 0 else np.zeros_like(reference)
        probabilities = np.stack([predicted == c for c in range(3)]).astype(np.float32)
        np.savez_compressed(predictions / f"{case}.npz", probabilities=probabilities)
    fold = _semisam_fold(tiny_dataset, tmp_path, sam_backend="litemedsam")
    out = run_demo.sam_pseudo_labels_of_predictions(str(fold), str(raw), str(predictions), str(tmp_path / "sam"))
    labels = {case: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"{case}.nii.gz"))) for case in cases}
    only = run_demo.sam_pseudo_labels_of_predictions(str(fold), str(raw), str(predictions), str(tmp_path / "one"),
                                                     cases=[cases[1]])
    assert sorted(os.listdir(only)) == [f"{cases[1]}.nii.gz"]
    assert labels[cases[1]].shape == references[cases[1]].shape and not labels[cases[1]].any()
    first, reference = labels[cases[0]], references[cases[0]]
    organ = 2 * ((first > 0) & (reference > 0)).sum() / ((first > 0).sum() + (reference > 0).sum())
    assert organ > 0.6, organ
    assert not np.array_equal(first, reference)  # SAM's own segmentation, not a copy of its prompt


def test_sam_pseudo_labels_use_the_folds_saved_settings(tiny_dataset, tmp_path):
    fold = _semisam_fold(tiny_dataset, tmp_path, sam_backend="litemedsam", edit=dict(sam_backend="sam2d_vit_b",
                                                           sam_checkpoint=str(tmp_path / "nowhere" / "vit_b.pth")))
    with pytest.raises(Exception, match="nowhere"):
        run_demo.sam_pseudo_labels_of_predictions(str(fold), str(tiny_dataset.dataset_raw), str(tmp_path),
                                                  str(tmp_path / "sam"))


def test_demo_refuses_a_work_folder_of_an_earlier_version(tmp_path, capsys):
    """A work folder whose demo dataset has no cohorts (the unshifted demo) is named, with the fix, before any
    step runs."""
    make_demo_dataset(str(tmp_path / "nnUNet_raw"), dataset_id=run_demo.DATASET_ID, name="SamsslDemo", num_labeled=1,
                      num_unlabeled=0, num_test=0, shape=(16, 16, 16))
    with pytest.raises(SystemExit, match="earlier version of the demo .*delete .*--workdir"):
        run_demo.main(["--workdir", str(tmp_path)])
    assert not (tmp_path / "demo.log").exists()


def test_demo_trainers_use_the_strong_preset():
    """Mean Teacher runs the bundled mean_teacher_strong preset, and SemiSAM its consistency settings exactly (so
    that the two rows differ by the SAM term): resolved, SemiSAM's demo settings equal the preset's on every Mean
    Teacher setting but the schedule's."""
    from nnunetv2_samssl.config.schema import parse_overrides, resolve_config
    from nnunetv2_samssl.config.settings import MEAN_TEACHER_SCHEMA, SEMISAM_SCHEMA

    mt_config, mt_settings = run_demo.TRAINERS["nnUNetTrainerMeanTeacher"]
    assert (mt_config, mt_settings) == ("mean_teacher_strong", "teacher_diagnostics=false")  # logged only
    preset, _ = resolve_config(MEAN_TEACHER_SCHEMA, "mean_teacher", config="mean_teacher_strong", overrides={})
    config, settings = run_demo.TRAINERS["nnUNetTrainerSemiSAM"]
    semisam, _ = resolve_config(SEMISAM_SCHEMA, "semisam", config=config or "semisam",
                                overrides=parse_overrides(settings))
    plain, _ = resolve_config(MEAN_TEACHER_SCHEMA, "mean_teacher", config="mean_teacher", overrides={})
    changed = {k for k in plain if plain[k] != preset[k]}
    assert changed >= {"student_view", "consistency_loss", "consistency_weight"}
    assert {k: semisam[k] for k in changed} == {k: preset[k] for k in changed}
    assert semisam["sam_backend"] == "litemedsam"
    assert semisam["teacher_diagnostics"] is False and semisam["sam_diagnostics"] == "auto"  # SAM's are printed


def test_demo_reuses_only_folds_trained_with_its_settings(tmp_path):
    fold = tmp_path / "results" / "nnUNetTrainerMeanTeacher__nnUNetPlans__3d_fullres" / "fold_0"
    wanted = {"config": "mean_teacher_strong", "overrides": "num_epochs=10 labeled_cases=['tr_001']"}
    run_demo.check_trained_with(str(tmp_path), "nnUNetTrainerMeanTeacher", str(fold), wanted)  # nothing trained yet
    fold.mkdir(parents=True)
    with pytest.raises(SystemExit, match="earlier version of the demo: delete .*--workdir"):
        run_demo.check_trained_with(str(tmp_path), "nnUNetTrainerMeanTeacher", str(fold), wanted)
    run_demo.record_trained_with(str(tmp_path), "nnUNetTrainerMeanTeacher", wanted)
    run_demo.check_trained_with(str(tmp_path), "nnUNetTrainerMeanTeacher", str(fold), wanted)
    longer = dict(wanted, overrides="num_epochs=50 labeled_cases=['tr_001']")
    with pytest.raises(SystemExit, match="with other settings .*num_epochs=10.*now .*num_epochs=50"):
        run_demo.check_trained_with(str(tmp_path), "nnUNetTrainerMeanTeacher", str(fold), longer)
    with pytest.raises(SystemExit, match="with other settings .*config mean_teacher_strong.*now config None"):
        run_demo.check_trained_with(str(tmp_path), "nnUNetTrainerMeanTeacher", str(fold), dict(wanted, config=None))


def test_demo_runs_sam_in_bf16_only_on_cpus_with_native_bf16():
    """The SAM trainer gets ``sam_cpu_bf16=true`` on a CPU with native bf16 and nothing else changes; the other
    trainers and other CPUs keep float32."""
    from nnunetv2_samssl.config.schema import parse_overrides

    trainers = list(run_demo.TRAINERS)
    plain = run_demo.demo_trainer_settings(trainers, "num_epochs=2", native_bf16=False)
    fast = run_demo.demo_trainer_settings(trainers, "num_epochs=2", native_bf16=True)
    assert all("sam_cpu_bf16" not in s["overrides"] for s in plain.values())
    for trainer in trainers:
        assert fast[trainer]["config"] == plain[trainer]["config"] == run_demo.TRAINERS[trainer][0]
        before, after = parse_overrides(plain[trainer]["overrides"]), parse_overrides(fast[trainer]["overrides"])
        assert before["num_epochs"] == 2
        if trainer == run_demo.SAM_TRAINER:
            assert after == {**before, "sam_cpu_bf16": True}
        else:
            assert after == before
    assert isinstance(run_demo.cpu_has_native_bf16(), bool)


def test_demo_schedule_seeds_every_trainer_alike():
    from nnunetv2_samssl.config.schema import parse_overrides

    seeded = parse_overrides(run_demo.demo_schedule(10, 30, ["tr_001", "tr_002"], 0))
    assert seeded == {"num_epochs": 10, "num_iterations_per_epoch": 30, "num_val_iterations_per_epoch": 1,
                      "final_validation": False, "labeled_cases": ["tr_001", "tr_002"],
                      "training_seed": 0}
    assert "training_seed" not in parse_overrides(run_demo.demo_schedule(10, 30, ["tr_001"], -1))
    for settings in run_demo.demo_trainer_settings(list(run_demo.TRAINERS), run_demo.demo_schedule(
            10, 30, ["tr_001"], 3), native_bf16=False).values():
        assert parse_overrides(settings["overrides"])["training_seed"] == 3
