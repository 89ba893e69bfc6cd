"""The few-label protocol: its plan of runs, the labeled-subset baseline trainer, HD95, and real runs (slow)."""
import ast
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import CONFIG, DATASET_NAME
from trainer_helpers import make_trainer
from nnunetv2_samssl.benchmark import fewlabel
from nnunetv2_samssl.benchmark.fewlabel import ProtocolError, ProtocolSettings
from nnunetv2_samssl.config.schema import ConfigError, parse_overrides, resolve_config
from nnunetv2_samssl.config.settings import LABELED_SUBSET_SCHEMA
from nnunetv2_samssl.data.splits import choose_labeled_subset
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher

MT = "nnUNetTrainerMeanTeacher"


def _settings(outdir, **kw):
    base = dict(dataset=DATASET_NAME, configuration=CONFIG, labeled_counts=[2, 1], trainers=[MT], fold=0,
                outdir=str(outdir), device="cpu", epochs=1, iters=2, val_iters=1)
    base.update(kw)
    return ProtocolSettings(**base)


def _split(env):
    return load_json(os.path.join(env.dataset_pp, "splits_final.json"))[0]


def test_plan_gives_every_trainer_the_same_labeled_cases_and_a_disjoint_validation(nnunet_env, tmp_path,
                                                                                    monkeypatch):
    runs = fewlabel.plan_runs(_settings(tmp_path / "out"))
    fewlabel.check_plan(runs)
    split = _split(nnunet_env)  # created by the planner exactly as nnU-Net creates it
    train, val = sorted(split["train"]), sorted(split["val"])
    assert len(train) == 4 and len(val) == 2
    assert [(r.trainer, r.num_labeled) for r in runs] == [
        ("nnUNetTrainerLabeledSubset", 1), (MT, 1), ("nnUNetTrainerLabeledSubset", 2), (MT, 2)]
    for r in runs:
        expected, rest = choose_labeled_subset(train, r.num_labeled, seed=12345)
        assert list(r.labeled_cases) == expected
        assert sorted(r.validation_cases) == val
        assert set(r.validation_cases).isdisjoint(set(r.labeled_cases) | set(r.unlabeled_cases))
        if r.trainer == MT:
            assert list(r.unlabeled_cases) == rest and r.unused_cases == ()
            assert "use_unlabeled_folder=false" in r.overrides
        else:
            assert r.unlabeled_cases == () and list(r.unused_cases) == rest
        settings = parse_overrides(r.overrides)
        assert settings["labeled_cases"] == expected and settings["num_labeled"] is None
        assert (settings["num_epochs"], settings["num_iterations_per_epoch"],
                settings["num_val_iterations_per_epoch"]) == (1, 2, 1)
    assert set(runs[0].labeled_cases) < set(runs[2].labeled_cases)  # nested subsets
    # --overrides and --set reach the semi-supervised runs only, and the schedule they set reaches every run
    extra = fewlabel.plan_runs(_settings(tmp_path / "o2", labeled_counts=[1], epochs=None,
                                         ssl_overrides="ema_decay=0.9",
                                         trainer_overrides={MT: "num_epochs=3 consistency_weight=0.2"}))
    assert [parse_overrides(r.overrides)["num_epochs"] for r in extra] == [3, 3]
    assert "ema_decay" not in extra[0].overrides and "consistency_weight" not in extra[0].overrides
    assert parse_overrides(extra[1].overrides)["consistency_weight"] == 0.2
    assert len({r.results_dir for r in runs}) == len(runs)

    # what the trainers actually load with each run's settings
    for r in runs:
        cls = nnUNetTrainerMeanTeacher if r.trainer == MT else nnUNetTrainerLabeledSubset
        monkeypatch.setenv("nnUNet_results", r.results_dir)
        trainer = make_trainer(cls, nnunet_env, **{k: v for k, v in parse_overrides(r.overrides).items()})
        dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
        assert sorted(dataset_tr.identifiers) == list(r.labeled_cases)
        assert sorted(dataset_val.identifiers) == sorted(r.validation_cases)
        if r.trainer == MT:
            assert sorted(trainer.unlabeled_dataset.identifiers) == list(r.unlabeled_cases)
        else:
            assert trainer.unused_cases == list(r.unused_cases)

    # a plan that breaks the invariants is refused
    broken = dataclasses.replace(runs[1], validation_cases=runs[1].unlabeled_cases[:1])
    with pytest.raises(ProtocolError, match="overlap"):
        fewlabel.check_plan([runs[0], broken])


def test_labeled_cases_can_be_drawn_from_one_cohort(nnunet_env, tmp_path):
    """--labeled-from: the labeled subsets come from the given cases (e.g. one site), every other training case
    of the fold is unlabeled, the validation cases do not change; a cohorts.json gives the same plan."""
    runs = fewlabel.plan_runs(_settings(tmp_path / "all"))
    split = _split(nnunet_env)
    train = sorted(split["train"])
    source = train[1:3] + sorted(split["val"])[:1]  # one of them validates in this fold
    cohorts = tmp_path / "cohorts.json"
    cohorts.write_text(json.dumps({"source": source, "target": {}}))
    assert fewlabel.read_case_pool([str(cohorts)]) == tuple(source)
    for pool in (source, fewlabel.read_case_pool([str(cohorts)])):
        shifted = fewlabel.plan_runs(_settings(tmp_path / "shifted", labeled_from=pool))
        fewlabel.check_plan(shifted)
        for r, plain in zip(shifted, runs):
            assert set(r.labeled_cases) <= set(train[1:3]) and len(r.labeled_cases) == r.num_labeled
            assert sorted(r.validation_cases) == sorted(plain.validation_cases)
            others = sorted(set(train) - set(r.labeled_cases))
            assert sorted(r.unlabeled_cases if r.trainer == MT else r.unused_cases) == others
    assert set(shifted[0].labeled_cases) < set(shifted[2].labeled_cases)  # still nested
    with pytest.raises(ProtocolError, match="--labeled 2: only 1 of fold 0's training cases are in --labeled-from"):
        fewlabel.plan_runs(_settings(tmp_path / "x", labeled_from=train[:1]))
    with pytest.raises(ProtocolError, match="not cases of fold 0"):
        fewlabel.plan_runs(_settings(tmp_path / "x", labeled_from=["no_such_case"]))
    with pytest.raises(ProtocolError, match="'source' list"):
        (tmp_path / "bad.json").write_text("[]")
        fewlabel.read_case_pool([str(tmp_path / "bad.json")])


def test_plan_errors(nnunet_env, tmp_path):
    with pytest.raises(ProtocolError, match="--labeled 5: fold 0 has 4 training cases"):
        fewlabel.plan_runs(_settings(tmp_path, labeled_counts=[5]))
    with pytest.raises(ProtocolError, match="no unlabeled case"):
        fewlabel.plan_runs(_settings(tmp_path, labeled_counts=[4]))
    with pytest.raises(ProtocolError, match="nnUNetTrainer cannot be restricted"):
        fewlabel.plan_runs(_settings(tmp_path, trainers=["nnUNetTrainer"]))
    with pytest.raises(ProtocolError, match="must not set"):
        fewlabel.plan_runs(_settings(tmp_path, ssl_overrides="num_labeled=3"))
    with pytest.raises(ProtocolError, match="ema_decay"):
        fewlabel.plan_runs(_settings(tmp_path, ssl_overrides="ema_decay=2.0"))
    with pytest.raises(ProtocolError, match="must not set"):
        fewlabel.plan_runs(_settings(tmp_path, trainer_overrides={MT: "labeled_cases=[tr_000]"}))
    with pytest.raises(ProtocolError, match="num_epochs"):  # validated before anything runs
        fewlabel.plan_runs(_settings(tmp_path, epochs=None, trainer_overrides={MT: "num_epochs=0"}))
    with pytest.raises(ProtocolError, match="Fold 7"):
        fewlabel.plan_runs(_settings(tmp_path, fold=7))


def test_trainer_kind_checks_the_supervised_baseline_first():
    # by name, through nnU-Net's trainer lookup as the CLI does; nnUNetTrainerLabeledSubset is 'supervised'
    # whether it derives from nnUNetTrainerSSLBase (as now) or from nnUNetTrainer directly
    assert fewlabel.trainer_kind("nnUNetTrainerLabeledSubset") == (nnUNetTrainerLabeledSubset, "supervised")
    assert fewlabel.trainer_kind(MT) == (nnUNetTrainerMeanTeacher, "semi-supervised")
    assert fewlabel.trainer_kind(nnUNetTrainerLabeledSubset)[1] == "supervised"


def test_run_state_picks_the_resume_mode(nnunet_env, tmp_path):
    spec = fewlabel.plan_runs(_settings(tmp_path, labeled_counts=[1], trainers=[]))[0]
    assert fewlabel.run_state(spec) == "new"
    assert fewlabel.train_command(spec, "cpu", "new")[-2:] == ["-device", "cpu"]
    os.makedirs(spec.output_folder)
    open(os.path.join(spec.output_folder, "checkpoint_latest.pth"), "w").close()
    assert fewlabel.run_state(spec) == "interrupted"
    assert fewlabel.train_command(spec, "cpu", "interrupted")[-1] == "--c"
    open(os.path.join(spec.output_folder, "checkpoint_final.pth"), "w").close()
    assert fewlabel.run_state(spec) == "trained"
    assert fewlabel.train_command(spec, "cpu", "trained")[-1] == "--val"
    os.makedirs(os.path.dirname(spec.summary_file))
    open(spec.summary_file, "w").close()
    assert fewlabel.run_state(spec) == "finished"
    env = spec.environment({"nnUNet_samssl_config": "x.yaml", "nnUNet_samssl_overrides": "a=1", "PATH": "/bin"})
    assert env["nnUNet_results"] == spec.results_dir and env["nnUNet_samssl_overrides"] == spec.overrides
    assert "nnUNet_samssl_config" not in env and env["PATH"] == "/bin"


def test_sfr_runs_its_stage_1_before_training_in_the_runs_environment(nnunet_env, tmp_path, monkeypatch):
    """nnUNetTrainerSFR needs nnUNetv2_samssl_sfr_finetune first: the protocol runs it with the run's own results
    folder and overrides, then nnUNetv2_train; a failing stage 1 stops the run with its name."""
    import subprocess

    spec = fewlabel.plan_runs(_settings(tmp_path, labeled_counts=[1], trainers=["nnUNetTrainerSFR"]))[1]
    assert spec.trainer == "nnUNetTrainerSFR" and fewlabel.stage_command(dataclasses.replace(spec, trainer=MT),
                                                                         "cpu") is None
    calls = []

    def fake_run(cmd, env, **kw):
        calls.append((os.path.basename(cmd[0]), env["nnUNet_results"], env["nnUNet_samssl_overrides"]))
        if cmd[0].endswith("nnUNetv2_train"):
            os.makedirs(os.path.dirname(spec.summary_file), exist_ok=True)
            open(os.path.join(spec.output_folder, "checkpoint_final.pth"), "w").close()
            open(spec.summary_file, "w").close()
        return subprocess.CompletedProcess(cmd, 0 if len(calls) < 3 else 1)

    monkeypatch.setattr(fewlabel.subprocess, "run", fake_run)
    record = fewlabel.execute_run(spec, "cpu", dict(os.environ), log=lambda m: None)
    assert [c[0] for c in calls] == ["nnUNetv2_samssl_sfr_finetune", "nnUNetv2_train"]
    assert all(c[1] == spec.results_dir and c[2] == spec.overrides for c in calls)
    assert [a["state"] for a in record["attempts"]] == ["stage", "new"]
    shutil.rmtree(spec.results_dir)
    with pytest.raises(fewlabel.ProtocolError, match="nnUNetv2_samssl_sfr_finetune exited with code 1"):
        fewlabel.execute_run(spec, "cpu", dict(os.environ), log=lambda m: None)


def test_case_lists_survive_the_override_syntax():
    cases = ["001", "case_7", "a:b", "yes", "x\\y", "1e3"]
    token = fewlabel.format_override("labeled_cases", cases)
    assert parse_overrides(token)["labeled_cases"] == cases
    with pytest.raises(ProtocolError, match="whitespace"):
        fewlabel.format_override("labeled_cases", ["a b"])


def resolve_labeled_subset_config(overrides, environ):
    return resolve_config(LABELED_SUBSET_SCHEMA, "labeled_subset", overrides=overrides, environ=environ)


def test_labeled_subset_settings():
    cfg, sources = resolve_labeled_subset_config(overrides={"num_labeled": 3, "num_epochs": 7}, environ={})
    assert cfg["num_labeled"] == 3 and cfg["num_epochs"] == 7 and cfg["save_every"] == 1
    assert cfg["labeled_subset_seed"] == 12345 and sources[-1] == "nnUNet_samssl_overrides"
    with pytest.raises(ConfigError, match="Unknown setting 'ema_decay'"):
        resolve_labeled_subset_config(overrides={"ema_decay": 0.9}, environ={})
    with pytest.raises(ConfigError, match="exclude each other"):
        resolve_labeled_subset_config(overrides={"num_labeled": 1, "labeled_cases": ["a"]}, environ={})
    with pytest.raises(ConfigError, match="num_labeled"):
        resolve_labeled_subset_config(overrides={"num_labeled": 0}, environ={})


def test_labeled_subset_trainer_trains_on_its_subset_only(nnunet_env):
    trainer = make_trainer(nnUNetTrainerLabeledSubset, nnunet_env, num_labeled=2)
    trainer.on_train_start()
    try:
        assert trainer.num_epochs == 2 and trainer.num_iterations_per_epoch == 2
        assert len(trainer.labeled_cases) == 2 and len(trainer.unused_cases) == 2
        for _ in range(3):
            assert set(next(trainer.dataloader_train)["keys"]) <= set(trainer.labeled_cases)
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_latest.pth"))
        assert sorted(f for f in os.listdir(trainer.output_folder) if "checkpoint" in f) == ["checkpoint_latest.pth"]
        saved = open(os.path.join(trainer.output_folder, "samssl_config.yaml")).read()
        assert "num_labeled: 2" in saved
    finally:
        trainer.on_train_end()


def _brute_hd95(a, b, spacing):
    pa = np.argwhere(fewlabel.surface_mask(a)) * spacing
    pb = np.argwhere(fewlabel.surface_mask(b)) * spacing
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95():
    spacing = np.array([2.5, 1.0, 1.0])
    a = np.zeros((6, 7, 8), bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = True
    b[4, 2, 3] = True
    assert fewlabel.hd95(a, b, spacing) == pytest.approx(7.5)
    assert fewlabel.hd95(a, a, spacing) == 0.0
    assert fewlabel.hd95(np.zeros_like(a), np.zeros_like(a), spacing) == 0.0
    assert np.isnan(fewlabel.hd95(a, np.zeros_like(a), spacing))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = rng.random(a.shape) > 0.6, rng.random(a.shape) > 0.7
        assert fewlabel.hd95(x, y, spacing) == pytest.approx(_brute_hd95(x, y, spacing))
        assert fewlabel.hd95(x, y, spacing) == pytest.approx(fewlabel.hd95(y, x, spacing))


def _spec(planned: dict) -> fewlabel.RunSpec:
    return fewlabel.RunSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in planned.items()})


@pytest.mark.slow
def test_protocol_runs_tabulates_and_reuses_finished_runs(nnunet_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    # one validation case keeps the two CPU validations short; the fold keeps 4 training cases
    ids = sorted(f[:-len("_seg.b2nd")] for f in os.listdir(os.path.join(nnunet_env.dataset_pp,
                                                                          "nnUNetPlans_3d_fullres"))
                 if f.endswith("_seg.b2nd"))
    save_json([{"train": ids[:4], "val": ids[4:5]}], os.path.join(nnunet_env.dataset_pp, "splits_final.json"))
    out = tmp_path / "fewlabel"
    args = ["-d", DATASET_NAME, "-c", CONFIG, "--labeled", "2", "-tr", MT, "-f", "0", "--epochs", "1",
            "--iters", "2", "--val-iters", "1", "-device", "cpu", "-o", str(out)]
    fewlabel.main(args)
    printed = capsys.readouterr().out
    assert "training ..." in printed and "reusing" not in printed

    first_csv = (out / "fewlabel_results.csv").read_text()
    header, *rows = [line.split(",") for line in first_csv.strip().splitlines()]
    assert [r[0] for r in rows] == ["nnUNetTrainerLabeledSubset", MT]
    col = {name: i for i, name in enumerate(header)}
    for r in rows:
        assert 0 <= float(r[col["dice_mean"]]) <= 1 and r[col["num_validation"]] == "1"
        assert {"dice_organ", "dice_lesion", "hd95_mean"} <= set(col)
    assert MT in (out / "fewlabel_results.md").read_text()
    assert (out / "fewlabel_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the runs really used the planned cases (read back from what each training wrote)
    plan = {r["trainer"]: r for r in json.loads((out / "plan.json").read_text())}
    labeled = choose_labeled_subset(ids[:4], 2, seed=12345)[0]
    for trainer, r in plan.items():
        spec = _spec(r)
        debug = load_json(os.path.join(spec.output_folder, "debug.json"))
        assert ast.literal_eval(debug["labeled_cases"]) == labeled
        other = "demoted_cases" if trainer == MT else "unused_cases"
        assert ast.literal_eval(debug[other]) == sorted(set(ids[:4]) - set(labeled))
        summary = load_json(spec.summary_file)
        assert [os.path.basename(c["reference_file"]) for c in summary["metric_per_case"]] == [ids[4] + ".nii.gz"]
        record = json.loads(open(os.path.join(spec.results_dir, "run.json")).read())
        assert len(record["attempts"]) == 1 and record["attempts"][0]["returncode"] == 0

    # second invocation: nothing is trained again
    finals = {t: os.path.getmtime(os.path.join(_spec(r).output_folder, "checkpoint_final.pth"))
              for t, r in plan.items()}
    lines = []
    result = fewlabel.run_protocol(fewlabel.ProtocolSettings(
        dataset=DATASET_NAME, configuration=CONFIG, labeled_counts=[2], trainers=[MT], fold=0, outdir=str(out),
        device="cpu", epochs=1, iters=2, val_iters=1), log=lines.append)
    assert sum("reusing the finished run" in m for m in lines) == 2 and not any("training" in m for m in lines)
    for spec, record in zip(result["runs"], result["records"]):
        assert len(record["attempts"]) == 1 and record["reused"] == 1
        assert os.path.getmtime(os.path.join(spec.output_folder, "checkpoint_final.pth")) == finals[spec.trainer]
    assert (out / "fewlabel_results.csv").read_text() == first_csv  # same numbers, same table

    # --test: the finished run's final checkpoint predicts the raw dataset's held-out cases, scored on labelsTs
    # (the baseline run alone, reused from above: one prediction keeps the test short)
    settings = dataclasses.replace(fewlabel.ProtocolSettings(
        dataset=DATASET_NAME, configuration=CONFIG, labeled_counts=[2], trainers=[], fold=0, outdir=str(out),
        device="cpu", epochs=1, iters=2, val_iters=1), test=True)
    labels_ts = os.path.join(nnunet_env.dataset_raw, "labelsTs")
    os.rename(labels_ts, labels_ts + "_away")
    with pytest.raises(ProtocolError, match="--test needs held-out labeled cases.*no labelsTs"):
        fewlabel.run_protocol(settings, log=lines.append)
    os.rename(labels_ts + "_away", labels_ts)
    held_out = sorted(f[:-len(".nii.gz")] for f in os.listdir(labels_ts))
    assert held_out and list(fewlabel.held_out_test_set(DATASET_NAME).cases) == held_out
    for attempt in range(2):
        lines = []
        tested = fewlabel.run_protocol(settings, log=lines.append)
        assert sum("reusing its test-set predictions" in m for m in lines) == attempt
        assert sum(f"predicting the {len(held_out)} held-out test cases" in m for m in lines) == 1 - attempt
        assert not any("training" in m for m in lines)
        for spec, ev in zip(tested["runs"], tested["evaluations"]):
            summary = load_json(os.path.join(spec.output_folder, "test_predictions", "summary.json"))
            assert sorted(os.path.basename(c["reference_file"]) for c in summary["metric_per_case"]) == \
                [c + ".nii.gz" for c in held_out]
            assert ev["cases"] == held_out and ev["evaluated_on"] == "test"
            assert ev["dice_mean"] == summary["foreground_mean"]["Dice"]
        header, *rows = [line.split(",") for line in (out / "fewlabel_results.csv").read_text().strip().splitlines()]
        assert "num_test" in header and all(r[header.index("num_test")] == str(len(held_out)) for r in rows)
        assert "held-out test cases" in (out / "fewlabel_results.md").read_text()


def test_ct_normalisation_from_all_labels_is_warned_about():
    from nnunetv2_samssl.benchmark.fewlabel import label_derived_normalization
    plans = {"configurations": {"3d_fullres": {"normalization_schemes": ["ZScoreNormalization", "CTNormalization"]},
                                "2d": {"normalization_schemes": ["ZScoreNormalization"]}}}
    warning = label_derived_normalization(plans, "3d_fullres")
    assert warning.startswith("WARNING") and "[1]" in warning and "labels of all training cases" in warning
    assert label_derived_normalization(plans, "2d") is None
