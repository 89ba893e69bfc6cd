"""The trainers under DDP, on CPU: two ranks run nnU-Net's own ``run_ddp`` (gloo instead of nccl, see
``ddp_cpu_rank.py``) on the tiny dataset, and the test checks what each rank did:

1. each rank draws its own share of the unlabeled batch (per-rank sizes add up to ``unlabeled_batch_size``, the
   ranks' patches differ);
2. students stay identical across ranks (DDP all-reduce), and so do the EMA teachers;
3. only rank 0 writes checkpoints, each final checkpoint once;
4. cached SAM pseudo-labels are made in disjoint shares (each case by exactly one rank) and published once, and
   every rank then reads the whole generation;
5. ``--c`` under DDP: a 2-rank run stopped after epoch 1 and resumed with 2 ranks ends exactly where an
   uninterrupted 2-rank run ends (student, teacher, optimizer, epoch);
6. CPAC-SAM: both branches, its trained SAM part (not DDP-wrapped: gradients all-reduced by the trainer) and its
   class prototypes (folded in from the global batch) stay identical across ranks.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import blosc2
import pytest
import torch

from conftest import CONFIG, DATASET_ID, NnunetEnv, set_network_widths
from ddp_cpu_rank import sha
from trainer_helpers import SAM

WORLD = 2
RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_cpu_rank.py")
SCHEDULE = dict(num_epochs=3, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, save_every=1)
UNLABELED_BATCH = 3  # global: 2 + 1 on two ranks
MEAN_TEACHER = dict(SCHEDULE, num_labeled=2, unlabeled_batch_size=UNLABELED_BATCH)
LABELED_SUBSET = dict(num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, num_labeled=2)
SEMISAM_CACHED = dict(SAM, num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, num_labeled=2,
                      unlabeled_batch_size=2, sam_pseudo_labels="cached", sam_cache_refresh_epochs=1)
CPAC = dict(sam_backend="sam_med3d", sam_random_init=True, cpac_warmup=0.0, num_epochs=2, num_iterations_per_epoch=2,
            num_val_iterations_per_epoch=1, num_labeled=2, unlabeled_batch_size=2)

pytestmark = pytest.mark.slow


@dataclass
class Run:
    ranks: List[dict]  # what each rank recorded (ddp_cpu_rank.RECORD), by rank

    @property
    def output_folder(self) -> str:
        return self.ranks[0]["final"]["output_folder"]


def _overrides(settings: dict) -> str:
    """``nnUNet_samssl_overrides`` text (``key=value`` YAML scalars) of ``settings``."""
    return " ".join(f"{k}={'null' if v is None else v}" for k, v in settings.items())


@dataclass
class Phase:
    name: str
    trainer: str
    env: NnunetEnv
    settings: Optional[dict]  # None: no overrides (a bare --c)
    continue_training: bool = False
    interrupt_after: Optional[int] = None


def launch(phases: List[Phase], work: str, timeout: float = 600) -> Dict[str, Run]:
    """Starts 2 CPU rank processes that run the ``phases`` one after the other (see ``ddp_cpu_rank.py``)."""
    os.makedirs(work)
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    proc_env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "0",
                     "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    procs, logs = [], []
    for rank in range(WORLD):
        spec = {"rank": rank, "world_size": WORLD, "dataset": str(DATASET_ID), "configuration": CONFIG, "fold": 0,
                "out": work,
                # nnU-Net's own DDP validation is not what these tests check; its export pool costs start-up time.
                # A bare --c keeps it off through the saved settings.
                "phases": [{"name": p.name, "trainer": p.trainer, "env": p.env.env(),
                            "overrides": None if p.settings is None else _overrides(
                                {**p.settings, "final_validation": False}),
                            "continue_training": p.continue_training, "interrupt_after": p.interrupt_after}
                           for p in phases]}
        spec_path = os.path.join(work, f"spec{rank}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        log = open(os.path.join(work, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, RANK_SCRIPT, spec_path], env=proc_env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + timeout
        while any(p.poll() is None for p in procs):
            # a failed rank leaves the other one waiting in a collective: stop it at once
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if any(p.returncode != 0 for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n"
                          + open(os.path.join(work, f"rank{r}.log")).read()[-4000:] for r, p in enumerate(procs))
        pytest.fail(f"DDP ranks failed:\n{tails}")
    return {p.name: Run([torch.load(os.path.join(work, f"{p.name}_rank{r}.pt"), weights_only=False)
                         for r in range(WORLD)]) for p in phases}


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> Dict[str, Run]:
    """One launch of 2 CPU ranks running, one after the other (each a new trainer, process group and folder):

    - ``mt``: nnUNetTrainerMeanTeacher, 3 epochs x 2 iterations, uninterrupted;
    - ``mt_first``: the same training in another folder, stopped after epoch 1 (as a kill after its checkpoint);
    - ``mt_resumed``: ``mt_first`` resumed with a bare ``--c`` (the trainer rebuilt from its folder, as
      ``nnUNetv2_train ... --c`` does; the processes are reused only to save their start-up time);
    - ``semisam``: nnUNetTrainerSemiSAM with cached pseudo-labels (refreshed at the start of epoch 1), 2 epochs;
    - ``subset``: nnUNetTrainerLabeledSubset (nnU-Net's own step on the labeled subset), 2 epochs;
    - ``cpac``: nnUNetTrainerCPACSAM with the cross terms from the first step, 2 epochs.
    """
    def env(name: str) -> NnunetEnv:
        root = str(tmp_path_factory.mktemp(name))
        for sub in ("raw", "preprocessed"):
            shutil.copytree(os.path.join(tiny_dataset.root, sub), os.path.join(root, sub))
        e = NnunetEnv(root, os.path.join(root, "raw"), os.path.join(root, "preprocessed"),
                      os.path.join(root, "results"))
        os.makedirs(e.results)
        set_network_widths(e.dataset_pp, 4, 32)  # CPU steps of milliseconds
        return e

    mt, mt_resume, semisam, subset = env("ddp_mt"), env("ddp_mt_resume"), env("ddp_semisam"), env("ddp_subset")
    cpac = env("ddp_cpac")
    work = os.path.join(str(tmp_path_factory.mktemp("ddp_ranks")), "ranks")
    start = time.perf_counter()
    out = launch([Phase("mt", "nnUNetTrainerMeanTeacher", mt, MEAN_TEACHER),
                  Phase("mt_first", "nnUNetTrainerMeanTeacher", mt_resume, MEAN_TEACHER, interrupt_after=1),
                  Phase("mt_resumed", "nnUNetTrainerMeanTeacher", mt_resume, None, continue_training=True),
                  Phase("semisam", "nnUNetTrainerSemiSAM", semisam, SEMISAM_CACHED),
                  Phase("subset", "nnUNetTrainerLabeledSubset", subset, LABELED_SUBSET),
                  Phase("cpac", "nnUNetTrainerCPACSAM", cpac, CPAC)], work)
    print(f"DDP runs: {time.perf_counter() - start:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------------- checks
def _check_unlabeled_shares(run: Run, global_batch: int) -> None:
    finals = [r["final"] for r in run.ranks]
    assert all(f["is_ddp"] and f["device"] == "cpu" for f in finals)
    assert [f["local_rank"] for f in finals] == list(range(WORLD))
    sizes = [f["unlabeled_batch_size"] for f in finals]
    assert sum(sizes) == global_batch and min(sizes) >= 1, sizes
    assert max(sizes) - min(sizes) <= 1, sizes  # split like nnU-Net splits the labeled batch
    # nnU-Net's labeled batch is split the same way (the plans' batch size is global)
    assert sum(f["labeled_batch_size"] for f in finals) == finals[0]["global_batch_size"]
    assert all(s["labeled_batch"] == f["labeled_batch_size"] for r, f in zip(run.ranks, finals) for s in r["steps"])
    cases = finals[0]["unlabeled_cases"]
    assert all(f["unlabeled_cases"] == cases for f in finals)
    batches = [r["unlabeled"] for r in run.ranks]
    n_steps = len(run.ranks[0]["steps"])
    assert all(len(b) == n_steps for b in batches)
    for rank, (size, drawn) in enumerate(zip(sizes, batches)):
        assert all(len(b["keys"]) == len(b["patches"]) == size for b in drawn), rank
        assert all(k in cases for b in drawn for k in b["keys"])
    # same step, different patches: no rank repeats another rank's draw
    for step, per_rank in enumerate(zip(*batches)):
        patches = [set(b["patches"]) for b in per_rank]
        assert not set.intersection(*patches), f"step {step}: the ranks drew the same unlabeled patches"
    keys = [[k for b in drawn for k in b["keys"]] for drawn in batches]
    assert len(set(map(tuple, keys))) == WORLD  # and not the same sequence of cases


def _check_models_in_sync(run: Run, n_steps: int) -> None:
    steps = [r["steps"] for r in run.ranks]
    assert all(len(s) == n_steps for s in steps)
    assert [s["step"] for s in steps[0]] == list(range(n_steps))
    has_teacher = steps[0][0]["teacher"] is not None
    for per_rank in zip(*steps):
        step = per_rank[0]["step"]
        assert len({s["student"] for s in per_rank}) == 1, f"students differ across ranks after step {step}"
        assert len({s["teacher"] for s in per_rank}) == 1, f"EMA teachers differ across ranks after step {step}"
        assert len({s["optimizer"] for s in per_rank}) == 1, f"optimizer states differ after step {step}"
    assert len({s["student"] for s in steps[0]}) == n_steps  # the student is trained every step
    if has_teacher:
        teachers = [s["teacher"] for s in steps[0]]
        assert len(set(teachers)) == n_steps  # the teacher moves every step ...
        assert any(s["teacher"] != s["student"] for s in steps[0][1:])  # ... and averages (it is no copy)
    finals = [r["final"] for r in run.ranks]
    for key in ("student", "teacher", "optimizer") if has_teacher else ("student", "optimizer"):
        for name, value in finals[0][key].items():
            for other in finals[1:]:
                assert torch.equal(value, other[key][name]), (key, name)


def _check_checkpoint_writes(run: Run, expected_rank0: List[str]) -> None:
    rank0, *others = run.ranks
    assert rank0["checkpoint_writes"] == expected_rank0
    for other in others:
        assert other["checkpoint_writes"] == []
        assert not [p for p in other["torch_saves"] if "checkpoint" in os.path.basename(p)], other["torch_saves"]
    folder = run.output_folder
    files = sorted(os.listdir(folder))
    assert "checkpoint_final.pth" in files and "checkpoint_latest.pth" not in files, files
    assert not [f for f in files if f.startswith(".")], files  # no temporary files left
    final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    for name, value in run.ranks[0]["final"]["student"].items():
        assert torch.equal(final["network_weights"][name], value), name


def _expected_writes(epochs: range, num_epochs: int, best_epochs: List[int]) -> List[str]:
    out = []
    for epoch in epochs:
        if epoch != num_epochs - 1:
            out.append("checkpoint_latest.pth")
        if epoch in best_epochs:
            out.append("checkpoint_best.pth")
    return out + ["checkpoint_final.pth"]


def _best_epochs(run: Run) -> List[int]:
    """Epochs whose EMA pseudo Dice improved (nnU-Net writes checkpoint_best then), from the final checkpoint."""
    ckpt = torch.load(os.path.join(run.output_folder, "checkpoint_final.pth"), map_location="cpu",
                      weights_only=False)
    ema = ckpt["logging"]["ema_fg_dice"]
    best, out = None, []
    for epoch, value in enumerate(ema):
        if best is None or value > best:
            best = value
            out.append(epoch)
    return out


# ---------------------------------------------------------------------------------------------------- tests
def test_each_rank_draws_its_own_share_of_the_unlabeled_batch(runs):
    _check_unlabeled_shares(runs["mt"], UNLABELED_BATCH)
    _check_unlabeled_shares(runs["semisam"], SEMISAM_CACHED["unlabeled_batch_size"])


def test_students_and_ema_teachers_stay_identical_across_ranks(runs):
    for name, settings in (("mt", MEAN_TEACHER), ("semisam", SEMISAM_CACHED), ("subset", LABELED_SUBSET)):
        _check_models_in_sync(runs[name], settings["num_epochs"] * settings["num_iterations_per_epoch"])


def test_cpac_sam_branches_sam_part_and_prototypes_stay_identical_across_ranks(runs):
    run = runs["cpac"]
    n_steps = CPAC["num_epochs"] * CPAC["num_iterations_per_epoch"]
    _check_models_in_sync(run, n_steps)  # the dual network: both branches
    steps = [r["steps"] for r in run.ranks]
    for per_rank in zip(*steps):
        assert len({s["sam"] for s in per_rank}) == 1, f"SAM parts differ across ranks after step {per_rank[0]['step']}"
    assert len({s["sam"] for s in steps[0]}) == n_steps  # trained every step
    assert all(s["cpac_cross_loss"] == s["cpac_cross_loss"] for s in steps[0])  # finite: cross terms from the start
    finals = [r["final"]["sam"] for r in run.ranks]
    assert any(k.startswith("prototypes.") for k in finals[0])
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name


def test_only_rank_0_writes_checkpoints(runs):
    for name, settings in (("mt", MEAN_TEACHER), ("semisam", SEMISAM_CACHED), ("subset", LABELED_SUBSET)):
        n = settings["num_epochs"]
        _check_checkpoint_writes(runs[name], _expected_writes(range(n), n, _best_epochs(runs[name])))


def test_cached_pseudo_labels_are_made_in_disjoint_shares_and_published_once(runs):
    run = runs["semisam"]
    cases = run.ranks[0]["final"]["unlabeled_cases"]
    assert len(cases) >= 3
    writes = [r["pl_writes"] for r in run.ranks]
    made_by = {}
    for rank, written in enumerate(writes):
        assert {g for g, _ in written} == {"epoch_0001"}, written  # one refresh, at the start of epoch 1
        for _, case in written:
            assert case not in made_by, f"{case} made by ranks {made_by[case]} and {rank}"
            made_by[case] = rank
        assert written, f"rank {rank} made no pseudo-labels"
    assert sorted(made_by) == sorted(cases)  # every case, each by exactly one rank
    assert run.ranks[0]["pl_publish"] == ["epoch_0001"]
    assert all(r["pl_publish"] == [] for r in run.ranks[1:])
    assert all(r["pl_cleared"] == [] for r in run.ranks[1:])  # only rank 0 touches the staging folder
    log = "".join(open(f).read() for f in glob.glob(os.path.join(run.output_folder, "training_log_*.txt")))
    assert f"SAM pseudo-labels epoch_0001: {len(cases)} unlabeled cases" in log  # counted over all ranks
    # on disk: one complete generation with every case, nothing staged
    root = os.path.join(run.output_folder, "sam_pseudo_labels")
    assert sorted(os.listdir(root)) == ["CURRENT", "epoch_0001"]
    assert sorted(os.listdir(os.path.join(root, "epoch_0001"))) == sorted(["DONE"] + [c + ".b2nd" for c in cases])
    # every rank trains on that generation and reads all of it (also the cases the other rank made)
    finals = [r["final"] for r in run.ranks]
    assert all(f["generation"] == f["current_generation"] == "epoch_0001" for f in finals)
    assert all(f["served_maps"] == finals[0]["served_maps"] for f in finals)
    for case, digest in finals[0]["served_maps"].items():
        on_disk = torch.from_numpy(blosc2.open(os.path.join(root, "epoch_0001", case + ".b2nd"))[:])
        assert sha([on_disk]) == digest, case
    for r in run.ranks:
        epoch1 = [s for s in r["steps"] if s["epoch"] == 1]
        epoch0 = [s for s in r["steps"] if s["epoch"] == 0]
        assert epoch1 and all(s["sam_loss"] == s["sam_loss"] for s in epoch1)  # finite: maps reached the loss
        assert all(s["sam_loss"] != s["sam_loss"] for s in epoch0)  # NaN: no generation yet


def test_resume_with_c_under_ddp_continues_like_an_uninterrupted_run(runs):
    first, resumed, whole = runs["mt_first"], runs["mt_resumed"], runs["mt"]
    iters, n_epochs = SCHEDULE["num_iterations_per_epoch"], SCHEDULE["num_epochs"]
    assert all(r["interrupted"] and r["epochs"] == [0, 1] for r in first.ranks)
    assert "checkpoint_latest.pth" in first.ranks[0]["files"] and "checkpoint_final.pth" not in first.ranks[0]["files"]
    # the stopped run did what the uninterrupted one did up to there
    for a, b in zip(first.ranks, whole.ranks):
        assert a["steps"] == b["steps"][:2 * iters]
    # both ranks load the same state: the one the stopped run ended with, epoch 2
    last = first.ranks[0]["steps"][-1]
    for r in resumed.ranks:
        assert r["loaded"] == {"epoch": 2, "student": last["student"], "teacher": last["teacher"],
                               "optimizer": last["optimizer"]}
        assert r["epochs"] == [2]
    # ... and continue exactly as the uninterrupted run: same steps, same end state on both ranks
    for a, b in zip(resumed.ranks, whole.ranks):
        assert a["steps"] == b["steps"][2 * iters:]
        assert a["unlabeled"] == b["unlabeled"][2 * iters:]
        assert a["final"]["epoch"] == b["final"]["epoch"] == n_epochs
        for key in ("student", "teacher", "optimizer"):
            for name, value in b["final"][key].items():
                assert torch.equal(a["final"][key][name], value), (key, name)
    # only rank 0 wrote checkpoints in both parts
    assert first.ranks[0]["checkpoint_writes"] and resumed.ranks[0]["checkpoint_writes"][-1] == "checkpoint_final.pth"
    assert all(not r["checkpoint_writes"] for run in (first, resumed) for r in run.ranks[1:])
