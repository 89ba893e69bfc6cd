"""The few-label protocol's variants (--variant) and repeats (--repeats): their plan, and the results table over the
repeats (synthetic evaluations, nothing is trained here)."""
import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIG, DATASET_NAME
from nnunetv2_samssl.benchmark import fewlabel
from nnunetv2_samssl.benchmark.fewlabel import ProtocolError, ProtocolSettings, Variant
from nnunetv2_samssl.config.schema import parse_overrides, resolve_config
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher

MT = "nnUNetTrainerMeanTeacher"
LS = "nnUNetTrainerLabeledSubset"


def _settings(outdir, **kw):
    base = dict(dataset=DATASET_NAME, configuration=CONFIG, labeled_counts=[2, 1], trainers=[MT], fold=0,
                outdir=str(outdir), device="cpu", epochs=1, iters=2, val_iters=1)
    base.update(kw)
    return ProtocolSettings(**base)


def test_variants_are_rows_of_their_own_on_the_same_cases(nnunet_env, tmp_path):
    out = tmp_path / "out"
    runs = fewlabel.plan_runs(_settings(
        out, ssl_overrides="ema_decay=0.95", trainer_overrides={MT: "consistency_weight=0.5"},
        variants=[Variant("mt_w02", MT, "consistency_weight=0.2"),
                  Variant("mt_ema", nnUNetTrainerMeanTeacher, "ema_decay=0.9")]))
    fewlabel.check_plan(runs)
    assert [(r.row, r.trainer, r.variant, r.num_labeled) for r in runs] == [
        (LS, LS, None, 1), (MT, MT, None, 1), ("mt_w02", MT, "mt_w02", 1), ("mt_ema", MT, "mt_ema", 1),
        (LS, LS, None, 2), (MT, MT, None, 2), ("mt_w02", MT, "mt_w02", 2), ("mt_ema", MT, "mt_ema", 2)]
    by = {(r.row, r.num_labeled): r for r in runs}
    for r in runs:
        assert r.results_dir == str(out / "runs" / f"{r.row}_N{r.num_labeled}") and r.repeat == 0
        baseline, mt = by[(LS, r.num_labeled)], by[(MT, r.num_labeled)]
        assert r.labeled_cases == baseline.labeled_cases and r.validation_cases == baseline.validation_cases
        if r.variant:  # the same cases as the -tr run of its trainer, semi-supervised
            assert (r.kind, r.unlabeled_cases, r.config) == (mt.kind, mt.unlabeled_cases, mt.config)
            assert r.overrides != mt.overrides
    assert len({r.results_dir for r in runs}) == len(runs)

    # --overrides, then the variant's own settings; --set is the -tr trainer's only; the pins come last
    def settings_of(row):
        return parse_overrides(by[(row, 1)].overrides)
    assert settings_of(MT)["consistency_weight"] == 0.5 and settings_of(MT)["ema_decay"] == 0.95
    assert settings_of("mt_w02")["consistency_weight"] == 0.2 and settings_of("mt_w02")["ema_decay"] == 0.95
    assert settings_of("mt_ema")["ema_decay"] == 0.9 and "consistency_weight" not in settings_of("mt_ema")
    for row in ("mt_w02", "mt_ema"):
        s = settings_of(row)
        assert s["labeled_cases"] == list(by[(LS, 1)].labeled_cases) and s["use_unlabeled_folder"] is False
        assert (s["num_epochs"], s["num_iterations_per_epoch"]) == (1, 2)
        # what the trainer makes of them
        cfg, _ = resolve_config(nnUNetTrainerMeanTeacher.config_schema(), nnUNetTrainerMeanTeacher.default_config,
                                overrides=s, environ={})
        assert cfg["ema_decay"] == s["ema_decay"]

    # the plan (plan.json) and the run record (run.json) name the variant, and a plan entry reads back as the run
    planned = dataclasses.asdict(by[("mt_w02", 2)])
    assert planned["variant"] == "mt_w02" and planned["trainer"] == MT and planned["repeat"] == 0
    assert fewlabel.RunSpec(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in json.loads(json.dumps(planned)).items()}) == by[("mt_w02", 2)]
    assert fewlabel._planned(by[("mt_w02", 2)])["variant"] == "mt_w02"


def test_repeats_get_their_own_folders_the_first_at_the_old_path(nnunet_env, tmp_path):
    out = tmp_path / "out"
    plain = fewlabel.plan_runs(_settings(out))
    runs = fewlabel.plan_runs(_settings(out, repeats=3, variants=[Variant("mt_w02", MT, "consistency_weight=0.2")]))
    fewlabel.check_plan(runs)
    assert len(runs) == 3 * 6
    assert [r.repeat for r in runs] == [0] * 6 + [1] * 6 + [2] * 6  # the whole protocol once, then again
    # repeat 0 of the baseline and the -tr trainer is exactly the run of a protocol without repeats (same folder,
    # so a finished one is reused)
    assert [r for r in runs if r.repeat == 0 and r.variant is None] == plain
    assert len({r.results_dir for r in runs}) == len(runs)
    for r in runs:
        suffix = f"_r{r.repeat}" if r.repeat else ""
        assert os.path.basename(r.results_dir) == r.name == f"{r.row}_N{r.num_labeled}{suffix}"
        first = next(f for f in runs if (f.row, f.num_labeled, f.repeat) == (r.row, r.num_labeled, 0))
        # a repeat differs from the first only in its folder and index
        assert dataclasses.replace(r, results_dir=first.results_dir, repeat=0) == first
    assert os.path.basename(runs[-1].results_dir) == "mt_w02_N2_r2"

    with pytest.raises(ProtocolError, match="share the results folder"):
        fewlabel.check_plan([runs[0], dataclasses.replace(runs[6], results_dir=runs[0].results_dir)])
    with pytest.raises(ProtocolError, match="--repeats 0: every run is trained at least once"):
        fewlabel.plan_runs(_settings(out, repeats=0))


def test_variant_errors(nnunet_env, tmp_path):
    def plan(*variants, **kw):
        return fewlabel.plan_runs(_settings(tmp_path, variants=list(variants), **kw))

    for bad in ("", "a b", "../x", "x/y", "-x", ".hidden"):
        with pytest.raises(ProtocolError, match="names its run folders"):
            plan(Variant(bad, MT, ""))
    with pytest.raises(ProtocolError, match=f"--variant {MT}: {MT} is the name of the -tr trainer's rows"):
        plan(Variant(MT, MT, "ema_decay=0.9"))
    with pytest.raises(ProtocolError, match=f"--variant {LS}: {LS} is the name of the baseline's rows"):
        plan(Variant(LS, MT, ""))
    with pytest.raises(ProtocolError, match="--variant v1 is given twice"):
        plan(Variant("v1", MT, "ema_decay=0.9"), Variant("v1", MT, "ema_decay=0.8"))
    with pytest.raises(ProtocolError, match=f"--variant sup: {LS} trains on the labeled cases only"):
        plan(Variant("sup", LS, ""))
    with pytest.raises(ProtocolError, match="nnUNetTrainer cannot be restricted"):
        plan(Variant("plain", "nnUNetTrainer", ""))
    with pytest.raises(ProtocolError, match=r"pinned: --overrides / --set / --variant must not set \['labeled_cases'\]"):
        plan(Variant("pinned", MT, "labeled_cases=[tr_000]"))
    with pytest.raises(ProtocolError, match="(?s)The settings of the bad runs are invalid: .*ema_decay"):
        plan(Variant("bad", MT, "ema_decay=2.0"))
    # the schedule of every run is one: a variant may not train longer than the -tr trainer
    with pytest.raises(ProtocolError, match=f"{MT} and long resolve num_epochs differently"):
        plan(Variant("long", MT, "num_epochs=3"), epochs=None)
    # a variant is a semi-supervised row even without -tr trainers: it needs unlabeled cases
    with pytest.raises(ProtocolError, match="no unlabeled case"):
        plan(Variant("v", MT, ""), trainers=[], labeled_counts=[4])
    assert fewlabel.plan_runs(_settings(tmp_path, trainers=[], labeled_counts=[4]))  # the baseline alone: fine


def test_cli_plans_variants_and_repeats(nnunet_env, tmp_path, capsys):
    args = ["-d", DATASET_NAME, "-c", CONFIG, "--labeled", "1", "-tr", MT, "--epochs", "1", "--iters", "2",
            "--val-iters", "1", "-device", "cpu", "-o", str(tmp_path / "out"), "--dry-run"]
    fewlabel.main(args + ["--variant", "mt_w02", MT, "consistency_weight=0.2", "--repeats", "2"])
    printed = capsys.readouterr().out  # nnU-Net's trainer lookup prints its search first
    plan = json.loads(printed[printed.index("[\n  {"):])
    assert [(os.path.basename(r["results_dir"]), r["variant"], r["repeat"]) for r in plan] == [
        (f"{LS}_N1", None, 0), (f"{MT}_N1", None, 0), ("mt_w02_N1", "mt_w02", 0),
        (f"{LS}_N1_r1", None, 1), (f"{MT}_N1_r1", None, 1), ("mt_w02_N1_r1", "mt_w02", 1)]
    assert parse_overrides(plan[2]["overrides"])["consistency_weight"] == 0.2
    with pytest.raises(SystemExit, match="nnUNetv2_samssl_fewlabel: --variant 'a b'"):
        fewlabel.main(args + ["--variant", "a b", MT, ""])


def _finish(spec):
    """What a successful nnUNetv2_train leaves in the run's folder."""
    os.makedirs(os.path.dirname(spec.summary_file), exist_ok=True)
    open(os.path.join(spec.output_folder, "checkpoint_final.pth"), "w").close()
    open(spec.summary_file, "w").close()


def test_a_variant_planned_with_other_settings_is_refused(nnunet_env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    variant = Variant("mt_w", MT, "consistency_weight=0.2")
    runs = fewlabel.plan_runs(_settings(out, labeled_counts=[1], variants=[variant]))
    spec = runs[2]
    assert spec.variant == "mt_w"
    trained = []

    def fake_run(cmd, env, **kw):
        trained.append(env["nnUNet_results"])
        _finish(spec)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fewlabel.subprocess, "run", fake_run)
    fewlabel.execute_run(spec, "cpu", dict(os.environ), log=lambda m: None)
    assert trained == [spec.results_dir]
    record = load_json(os.path.join(spec.results_dir, "run.json"))
    assert record["plan"]["variant"] == "mt_w" and record["plan"]["repeat"] == 0
    lines = []
    fewlabel.execute_run(spec, "cpu", dict(os.environ), log=lines.append)  # the same settings: reused
    assert trained == [spec.results_dir] and "reusing the finished run" in lines[0]

    changed = fewlabel.plan_runs(_settings(out, labeled_counts=[1], variants=[Variant("mt_w", MT,
                                                                                      "consistency_weight=0.3")]))[2]
    assert changed.results_dir == spec.results_dir
    with pytest.raises(ProtocolError, match=r"holds a run planned with other settings \(overrides\)"):
        fewlabel.execute_run(changed, "cpu", dict(os.environ), log=lambda m: None)
    other_trainer = dataclasses.replace(spec, trainer="nnUNetTrainerSemiSAM")
    with pytest.raises(ProtocolError, match=r"planned with other settings \(trainer\)"):
        fewlabel.execute_run(other_trainer, "cpu", dict(os.environ), log=lambda m: None)
    assert trained == [spec.results_dir]

    # a run folder written before variants and repeats existed (no such keys in its run.json) is still reused
    baseline = runs[0]
    _finish(baseline)
    old_plan = {k: v for k, v in fewlabel._planned(baseline).items() if k not in ("variant", "repeat")}
    with open(os.path.join(baseline.results_dir, "run.json"), "w") as f:
        json.dump({"plan": old_plan, "attempts": []}, f)
    assert fewlabel.execute_run(baseline, "cpu", dict(os.environ), log=lambda m: None)["reused"] == 1


# ----------------------------------------------------------------------------------------------------
# the results over the repeats (synthetic evaluations)
# ----------------------------------------------------------------------------------------------------
def _run(trainer, kind, repeat, variant=None):
    row = variant or trainer
    return fewlabel.RunSpec(
        trainer=trainer, kind=kind, num_labeled=1, labeled_cases=("tr_0",),
        unlabeled_cases=("tr_1", "tr_2", "tr_3") if kind == "semi-supervised" else (),
        unused_cases=() if kind == "semi-supervised" else ("tr_1", "tr_2", "tr_3"), validation_cases=("v_0", "v_1"),
        uses_unlabeled_folder=False, dataset=DATASET_NAME, configuration=CONFIG, fold=0,
        plans_identifier="nnUNetPlans", overrides="", config=None,
        results_dir=f"/out/runs/{fewlabel.run_name(row, 1, repeat)}", variant=variant, repeat=repeat)


def _evaluation(organ, lesion, mean, hd_organ, hd_lesion, hd_mean, undefined):
    return {"dice": {"organ": organ, "lesion": lesion}, "dice_mean": mean, "cases": ["v_0", "v_1"],
            "evaluated_on": "validation", "hd95": {"organ": hd_organ, "lesion": hd_lesion}, "hd95_mean": hd_mean,
            "hd95_undefined": undefined}


NAN = float("nan")
# three repeats of the baseline and of a variant, in the order plan_runs gives (repeat by repeat)
RUNS = [_run(LS, "supervised", 0), _run(MT, "semi-supervised", 0, "mt_strong"),
        _run(LS, "supervised", 1), _run(MT, "semi-supervised", 1, "mt_strong"),
        _run(LS, "supervised", 2), _run(MT, "semi-supervised", 2, "mt_strong")]
EVALUATIONS = [_evaluation(0.4, 0.6, 0.50, 10.0, 20.0, 15.0, 0), _evaluation(0.6, 0.6, 0.60, 8.0, 8.0, 8.0, 0),
               _evaluation(0.5, 0.62, 0.56, 12.0, NAN, 12.0, 1), _evaluation(0.7, 0.7, 0.70, 8.0, 8.0, 8.0, 0),
               _evaluation(0.9, 0.34, 0.62, 14.0, 20.0, 17.0, 2), _evaluation(0.65, 0.65, 0.65, 8.0, 8.0, 8.0, 0)]
RECORDS = [{"attempts": [{"seconds": s}]} for s in (100.2, 200, 60, 200, 119.6, 150)]
RECORDS[2]["attempts"].append({"seconds": 50})  # an interrupted and resumed run: its attempts add up


def test_results_are_one_csv_line_per_run_and_mean_and_std_per_row(tmp_path):
    header, rows = fewlabel.result_rows(RUNS, EVALUATIONS, RECORDS)
    assert header == ["trainer", "variant", "kind", "num_labeled", "num_unlabeled", "repeat", "dice_organ",
                      "dice_lesion", "dice_mean", "hd95_organ", "hd95_lesion", "hd95_mean", "hd95_undefined",
                      "num_validation", "train_seconds"]
    fewlabel.write_csv(str(tmp_path / "r.csv"), header, rows)
    lines = (tmp_path / "r.csv").read_text().strip().splitlines()
    assert lines[0] == ",".join(header) and len(lines) == 1 + 6
    assert lines[1] == f"{LS},,supervised,1,0,0,0.4000,0.6000,0.5000,10.0000,20.0000,15.0000,0,2,100"
    assert lines[4] == f"{MT},mt_strong,semi-supervised,1,3,1,0.7000,0.7000,0.7000,8.0000,8.0000,8.0000,0,2,200"
    assert lines[3] == f"{LS},,supervised,1,0,1,0.5000,0.6200,0.5600,12.0000,nan,12.0000,1,2,110"

    summary_header, summary = fewlabel.aggregate_rows(header, rows)
    assert summary_header == header[:5] + ["runs"] + header[6:]
    assert [(r[0], r[1], r[5]) for r in summary] == [(LS, "", 3), (MT, "mt_strong", 3)]
    col = {c: i for i, c in enumerate(summary_header)}
    base = summary[0]
    # by hand: organ 0.4, 0.5, 0.9 -> mean 0.6, squared deviations 0.04 + 0.01 + 0.09 over 3 - 1
    assert base[col["dice_organ"]].mean == pytest.approx(0.6)
    assert base[col["dice_organ"]].std == pytest.approx(np.sqrt(0.14 / 2))
    # lesion 0.6, 0.62, 0.34 -> 0.52, (0.0064 + 0.01 + 0.0324) / 2; mean Dice 0.50, 0.56, 0.62 -> 0.56 +- 0.06
    assert base[col["dice_lesion"]].mean == pytest.approx(0.52)
    assert base[col["dice_lesion"]].std == pytest.approx(np.sqrt(0.0488 / 2))
    assert (base[col["dice_mean"]].mean, base[col["dice_mean"]].std) == (pytest.approx(0.56), pytest.approx(0.06))
    assert base[col["train_seconds"]].values == (100, 110, 120)
    variant = summary[1]
    assert variant[col["dice_mean"]].mean == pytest.approx(0.65) and variant[col["dice_mean"]].std == \
        pytest.approx(0.05)
    assert variant[col["num_unlabeled"]] == "3" and variant[col["kind"]] == "semi-supervised"

    fewlabel.write_markdown(str(tmp_path / "r.md"), summary_header, summary, "Title")
    md = (tmp_path / "r.md").read_text().splitlines()
    assert md[2] == ("| trainer | variant | kind | num_labeled | num_unlabeled | runs | dice_organ | dice_lesion | "
                     "dice_mean | hd95_organ | hd95_lesion | hd95_mean | hd95_undefined | num_validation | "
                     "train_seconds |")
    assert md[4] == (f"| {LS} |  | supervised | 1 | 0 | 3 | 0.6000 ± 0.2646 | 0.5200 ± 0.1562 | 0.5600 ± 0.0600 | "
                     f"12.0000 ± 2.0000 | nan | 14.6667 ± 2.5166 | 1.0 ± 1.0 | 2 | 110.0 ± 10.0 |")
    assert md[5] == (f"| {MT} | mt_strong | semi-supervised | 1 | 3 | 3 | 0.6500 ± 0.0500 | 0.6500 ± 0.0500 | "
                     f"0.6500 ± 0.0500 | 8.0000 ± 0.0000 | 8.0000 ± 0.0000 | 8.0000 ± 0.0000 | 0.0 ± 0.0 | 2 | "
                     f"183.3 ± 28.9 |")
    assert len(md) == 10 and "mean ± sample standard deviation over the `runs`" in md[-1]
    fewlabel.plot_dice(str(tmp_path / "r.png"), summary_header, summary, "Title")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_repeat_without_variants_keeps_the_table_as_it_was(tmp_path):
    """With one run per row the markdown cells are the plain values (no '±', no note) and there is no variant
    column: the table of the protocol without repeats, plus 'runs'."""
    runs = [RUNS[0], dataclasses.replace(RUNS[1], variant=None, results_dir="/out/runs/mt")]
    header, rows = fewlabel.result_rows(runs, EVALUATIONS[:2], RECORDS[:2])
    summary_header, summary = fewlabel.aggregate_rows(header, rows)
    assert summary_header == ["trainer", "kind", "num_labeled", "num_unlabeled", "runs", "dice_organ", "dice_lesion",
                              "dice_mean", "hd95_organ", "hd95_lesion", "hd95_mean", "hd95_undefined",
                              "num_validation", "train_seconds"]
    assert [r[4] for r in summary] == [1, 1]
    assert all(s.std is None for r in summary for s in r if isinstance(s, fewlabel.Spread))
    fewlabel.write_markdown(str(tmp_path / "r.md"), summary_header, summary, "Title", test=False)
    md = (tmp_path / "r.md").read_text()
    assert f"| {LS} | supervised | 1 | 0 | 1 | 0.4000 | 0.6000 | 0.5000 | 10.0000 | 20.0000 | 15.0000 | 0 | 2 | 100 |" \
        in md.splitlines()
    assert f"| {MT} | semi-supervised | 1 | 3 | 1 | 0.6000 |" in md
    assert "±" not in md and md.rstrip().endswith("max of the two).")
    fewlabel.plot_dice(str(tmp_path / "r.png"), summary_header, summary, "Title")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_only_tabulates_the_finished_runs_and_trains_nothing(nnunet_env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    settings = _settings(out, labeled_counts=[1], repeats=2, finished_only=True,
                         variants=[Variant("mt_w", MT, "consistency_weight=0.2")])
    runs = fewlabel.plan_runs(settings)
    assert len(runs) == 6  # (baseline, MT, mt_w) x 2 repeats

    def no_training(cmd, *a, **kw):
        raise AssertionError(f"--finished-only ran {cmd}")

    monkeypatch.setattr(fewlabel.subprocess, "run", no_training)
    scored = []

    def evaluation(spec, hd95=True, test_set=None):
        scored.append(spec.name)
        return _evaluation(0.5, 0.5, 0.5 + 0.1 * spec.repeat, 1.0, 1.0, 1.0, 0)

    monkeypatch.setattr(fewlabel, "evaluate_run", evaluation)
    lines = []
    with pytest.raises(ProtocolError, match="No run of this plan has finished"):
        fewlabel.run_protocol(settings, log=lines.append)
    for spec in (runs[0], runs[1], runs[3]):  # baseline and MT of repeat 0, baseline of repeat 1
        _finish(spec)
    os.makedirs(runs[2].output_folder, exist_ok=True)
    open(os.path.join(runs[2].output_folder, "checkpoint_latest.pth"), "w").close()  # mt_w r0: interrupted
    lines = []
    result = fewlabel.run_protocol(settings, log=lines.append)
    assert [r.name for r in result["runs"]] == [runs[0].name, runs[1].name, runs[3].name] == scored
    assert f"{runs[2].name}: interrupted, left out of the table (--finished-only)" in lines
    assert f"{runs[4].name}: new, left out of the table (--finished-only)" in lines
    assert "--finished-only: 3 of the 6 planned runs have finished and are tabulated." in lines
    runs_column = result["summary_header"].index("runs")
    assert {r[0]: r[runs_column] for r in result["summary_rows"]} == {LS: 2, MT: 1}
    assert "variant" not in result["summary_header"]  # no finished variant run
    assert len(load_json(os.path.join(out, "plan.json"))) == 6  # the plan file keeps the whole plan


# per-site results of a shifted-cohort test set
# ----------------------------------------------------------------------------------------------------
def test_shifted_test_sets_are_scored_per_target_site(nnunet_env, tmp_path):
    """With a cohorts.json in the raw dataset, each target site's held-out cases get a Dice column: the mean over
    the site's cases of each case's mean over the classes (a class with no Dice, nan, left out of its case)."""
    def save_json(content, path):  # in this order (batchgenerators' save_json sorts the keys)
        with open(path, "w") as f:
            json.dump(content, f)

    assert fewlabel.held_out_test_set(DATASET_NAME).sites == ()  # no cohorts.json, no site columns
    held_out = list(fewlabel.held_out_test_set(DATASET_NAME).cases)
    assert len(held_out) == 2
    a, b = held_out
    cohorts = os.path.join(nnunet_env.dataset_raw, "cohorts.json")
    save_json({"source": ["tr_000"], "target": {"site_contrast": [a, "unl_000"], "site_lowres": ["unl_001"],
                                                 "other": [b]}}, cohorts)
    test_set = fewlabel.held_out_test_set(DATASET_NAME)
    assert test_set.sites == (("site_contrast", (a,)), ("other", (b,)))  # the site without test cases is left out

    spec = dataclasses.replace(RUNS[0], results_dir=str(tmp_path / "run"))
    ending = test_set.file_ending
    per_case = {a: {"1": 0.8, "2": 0.2}, b: {"1": 0.6, "2": NAN}}
    summary = {"mean": {"1": {"Dice": 0.7}, "2": {"Dice": 0.2}}, "foreground_mean": {"Dice": 0.45},
               "metric_per_case": [{"prediction_file": f"/p/{c}{ending}", "reference_file": f"/r/{c}{ending}",
                                    "metrics": {k: {"Dice": v} for k, v in m.items()}} for c, m in per_case.items()]}
    os.makedirs(os.path.dirname(fewlabel.test_summary_file(spec)))
    with open(fewlabel.test_summary_file(spec), "w") as f:
        json.dump(summary, f)
    ev = fewlabel.evaluate_run(spec, compute_hd95=False, test_set=test_set)
    assert ev["dice_site"] == {"site_contrast": pytest.approx(0.5), "other": pytest.approx(0.6)}
    assert ev["dice_mean"] == 0.45 and ev["dice"] == {"organ": 0.7, "lesion": 0.2}

    header, rows = fewlabel.result_rows([spec], [ev], [{"attempts": [{"seconds": 10}]}])
    assert header[header.index("dice_mean") + 1:header.index("num_test")] == ["dice_site_contrast",
                                                                              "dice_site_other"]
    assert rows[0][header.index("dice_site_contrast")] == pytest.approx(0.5)
    summary_header, summary_rows = fewlabel.aggregate_rows(header, rows + rows)
    assert summary_rows[0][summary_header.index("dice_site_other")].values == (pytest.approx(0.6),) * 2
    fewlabel.write_markdown(str(tmp_path / "r.md"), summary_header, summary_rows, "T", test=True)
    assert "`dice_site_*`: the test cases of one target site" in (tmp_path / "r.md").read_text()

    save_json({"source": ["tr_000"], "target": [a, b]}, cohorts)
    with pytest.raises(ProtocolError, match="'target' must map each site to a list"):
        fewlabel.held_out_test_set(DATASET_NAME)


def test_training_seed_pairs_the_rows_of_each_repeat(nnunet_env, tmp_path):
    """--training-seed S: every row of repeat r trains with training_seed S + r (same start, same labeled patches
    across rows); unseeded runs keep the plan they had; the rows' own settings may not set it."""
    out = tmp_path / "out"
    variants = [Variant("mt_w", MT, "consistency_weight=0.2")]
    runs = fewlabel.plan_runs(_settings(out, labeled_counts=[1], repeats=2, variants=variants, training_seed=5))
    assert len(runs) == 6
    for r in runs:
        assert parse_overrides(r.overrides)["training_seed"] == 5 + r.repeat
    unseeded = fewlabel.plan_runs(_settings(out, labeled_counts=[1], repeats=2, variants=variants))
    assert all("training_seed" not in parse_overrides(r.overrides) for r in unseeded)
    assert [dataclasses.replace(r, overrides="") for r in runs] == [dataclasses.replace(r, overrides="")
                                                                    for r in unseeded]
    with pytest.raises(ProtocolError, match=r"must not set \['training_seed'\].*--training-seed"):
        fewlabel.plan_runs(_settings(out, labeled_counts=[1], ssl_overrides="training_seed=3"))


def test_seeded_runs_get_their_gain_over_the_baseline_of_the_same_seed(tmp_path):
    seeded = [dataclasses.replace(r, overrides=f"num_epochs=1 training_seed={5 + r.repeat}") for r in RUNS]
    header, rows = fewlabel.result_rows(seeded, EVALUATIONS, RECORDS)
    assert header[header.index("dice_mean") + 1] == "dice_gain_paired"
    gain = [row[header.index("dice_gain_paired")] for row in rows]
    assert all(np.isnan(g) for g in gain[0::2])  # the baseline itself
    # mean Dice of the variant minus the baseline's of the same repeat: 0.60 - 0.50, 0.70 - 0.56, 0.65 - 0.62
    assert gain[1::2] == [pytest.approx(0.10), pytest.approx(0.14), pytest.approx(0.03)]
    summary_header, summary = fewlabel.aggregate_rows(header, rows)
    paired = summary[1][summary_header.index("dice_gain_paired")]
    assert paired.mean == pytest.approx(0.09) and paired.std == pytest.approx(np.std([0.10, 0.14, 0.03], ddof=1))
    fewlabel.write_markdown(str(tmp_path / "r.md"), summary_header, summary, "T")
    assert "| 0.0900 ± 0.0557 |" in (tmp_path / "r.md").read_text()
    assert "minus that of the labeled-only run of the same repeat" in (tmp_path / "r.md").read_text()
    # unseeded runs (above): no such column, their repeats are not paired
    assert "dice_gain_paired" not in fewlabel.result_rows(RUNS, EVALUATIONS, RECORDS)[0]
