"""Training-step speed of nnU-Net trainers on identical batches (``nnUNetv2_samssl_benchmark``).

All trainers run in one process, one after the other, on the same preprocessed dataset, configuration
and fold. For each trainer:

1. it is built like ``nnUNetv2_train`` builds it (class found by name with nnU-Net's
   ``recursive_find_trainer_class_by_name``, so stock and plugin trainers both work; settings from
   ``nnUNet_samssl_config`` / ``nnUNet_samssl_overrides`` as in training, plus the trainer's own
   ``--set TRAINER 'key=value ...'`` additions, e.g. ``sam_random_init=true`` for a SAM trainer without
   weights) and ``on_train_start`` runs (network, optimizer, loaders with their worker processes);
2. **data pipeline**: its own loaders are drawn from: ``next(dataloader_train)`` plus
   ``next(unlabeled_loader)`` where the trainer has one. Background workers prefetch, so the prefetch
   cache is drained first (untimed) and then ``data_iters`` draws are timed: the mean is the wait per
   iteration of a consumer that does nothing else, i.e. the pipeline's throughput limit (the pipeline
   keeps up with training when this is below the step time). With ``nnUNet_n_proc_DA=0`` it is the
   main-process cost of one batch, which adds to every iteration;
3. **training step**: ``warmup`` + ``iters`` calls of ``train_step`` on batches that do NOT come from the
   pipeline: ``num_batches`` labeled and unlabeled batches are drawn once (by the first trainer whose
   batches have that layout) and every later trainer with the same layout gets copies of the very same
   batches (the JSON records a checksum per trainer). The unlabeled batches are served through
   ``trainer.unlabeled_loader`` while the steps run. Each step is timed with ``time.perf_counter``
   between ``torch.cuda.synchronize()`` calls on GPU. Mixed precision is whatever the trainer's
   ``train_step`` does (nnU-Net: autocast + GradScaler on CUDA, float32 on CPU). The ratio to the reference
   is that of the MEAN time per iteration (what a training of N iterations costs): a trainer whose SAM
   branch runs every k-th step (``sam_every``) pays it in the mean, which a median would hide; the median
   and quartiles are reported as the spread;
4. **SAM share**: a trainer with a SAM branch reports that branch's time per iteration as
   ``train_step(...)["sam_time_s"]`` (seconds, measured by the trainer with its own synchronisation);
   the share is the mean over the timed steps of ``sam_time_s / step time`` (a NaN ``sam_time_s``, a step
   in which the branch did not run, counts as 0);
   A trainer that does its SAM work outside the step at intervals (``nnUNetTrainerSemiSAM`` with
   ``sam_pseudo_labels: cached``) exposes ``timed_periodic_work() -> (seconds, iterations served)``:
   it runs BEFORE the timed steps (so they are timed as training runs them, with pseudo-labels in
   place and their loss computed) and reports a refresh as nearly all refreshes of a training run (with reused
   image embeddings: the second one; the first, which also encodes, is in the log), its cost per iteration (``periodic_ms_per_iteration``) is reported,
   ``ratio_incl_periodic`` adds it to the mean step, and the SAM share becomes
   ``periodic / (mean step + periodic)``;
5. **peak memory**: on GPU ``torch.cuda.max_memory_allocated`` over warm-up + timed steps, with the peak
   reset for each trainer (weights, optimizer state and activations); on CPU the peak of the process's
   resident memory (``VmRSS`` of ``/proc/self/status``, sampled every 2 ms by a background thread) minus
   its value before the first step (activations, gradients, optimizer state; not the weights);
6. its loader workers are shut down and the trainer is freed before the next one starts.

``nnUNetTrainer`` is the reference (ratio 1.0) and is added when not listed. Trainer logs and
checkpoint folders go to a temporary ``nnUNet_results`` that is deleted at the end, so nothing of a
real training is touched.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

REFERENCE_TRAINER = "nnUNetTrainer"
SAM_TIME_KEY = "sam_time_s"
TrainerSpec = Union[str, type]


# ----------------------------------------------------------------------------------------------------
# statistics and memory
# ----------------------------------------------------------------------------------------------------
@dataclass
class TimeStats:
    """Summary of per-iteration times, in milliseconds."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    mean: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> "TimeStats":
        if len(seconds) == 0:
            raise ValueError("no timed iterations")
        ms = np.asarray(seconds, dtype=float) * 1000.0
        q1, med, q3 = np.percentile(ms, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(ms.min()), float(ms.max()), float(ms.mean()))


def read_vmrss_kib() -> Optional[int]:
    """Resident set size of this process in KiB (``VmRSS`` of ``/proc/self/status``), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _max_rss_kib() -> int:
    import resource  # POSIX only; used where /proc is missing
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


class PeakMemoryMeter:
    """Peak memory of the code run inside ``with meter:``, in MiB (``meter.peak_mib``).

    CUDA: ``torch.cuda.max_memory_allocated(device)`` after resetting the peak on entry (absolute: every
    live tensor counts). CPU: peak ``VmRSS`` minus ``VmRSS`` on entry, sampled every ``interval_s`` by a
    background thread (torch releases the GIL in its kernels, so sampling goes on during a step); where
    ``/proc`` is missing, ``resource.getrusage`` ``ru_maxrss`` growth (which only sees new all-time peaks).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak_mib = float("nan")
        self.method = self.describe(device)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start_kib = 0
        self._peak_kib = 0

    @staticmethod
    def describe(device: torch.device) -> str:
        if device.type == "cuda":
            return ("torch.cuda.max_memory_allocated over warm-up + timed steps, peak reset per trainer "
                    "(weights, optimizer state, activations)")
        if read_vmrss_kib() is not None:
            return ("CPU: peak VmRSS (/proc/self/status, sampled every 2 ms by a background thread) minus VmRSS "
                    "before the first step (activations, gradients, optimizer state; not the weights)")
        return "CPU: growth of resource.getrusage ru_maxrss during the steps (sees only new all-time peaks)"

    def __enter__(self) -> "PeakMemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        current = read_vmrss_kib()
        if current is None:
            self._start_kib = self._peak_kib = _max_rss_kib()
            return self
        self._start_kib = self._peak_kib = current
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = read_vmrss_kib()
            if value is not None and value > self._peak_kib:
                self._peak_kib = value
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            return
        if self._thread is None:
            self._peak_kib = _max_rss_kib()
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
            last = read_vmrss_kib()
            if last is not None:
                self._peak_kib = max(self._peak_kib, last)
        self.peak_mib = (self._peak_kib - self._start_kib) / 1024.0


def release_memory(device: torch.device) -> None:
    """Frees what the previous trainer left: Python garbage, the CUDA cache, glibc's free lists (CPU RSS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------
def batch_layout(batch: Any) -> Any:
    """A hashable description of a batch's structure: keys, tensor shapes and dtypes (values ignored)."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", tuple(batch.shape), str(batch.dtype))
    if isinstance(batch, np.ndarray):
        return ("array", batch.shape, str(batch.dtype))
    if isinstance(batch, dict):
        return ("dict",) + tuple((k, batch_layout(batch[k])) for k in sorted(batch) if k != "keys")
    if isinstance(batch, (list, tuple)):
        return ("list",) + tuple(batch_layout(b) for b in batch)
    return ("other", type(batch).__name__)


def batch_checksum(batches: Sequence[Any]) -> float:
    """Sum (float64) of every tensor value in ``batches``: equal for equal batches."""
    total = 0.0
    stack = list(batches)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += float(item.detach().double().sum())
        elif isinstance(item, np.ndarray) and item.dtype.kind in "fiub":
            total += float(item.astype(np.float64).sum())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def copy_batch(batch: Any) -> Any:
    """A deep copy with fresh tensor storage (pinned again where the original was pinned)."""
    if isinstance(batch, torch.Tensor):
        copy = batch.clone()
        return copy.pin_memory() if batch.is_pinned() else copy
    if isinstance(batch, np.ndarray):
        return batch.copy()
    if isinstance(batch, dict):
        return {k: copy_batch(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [copy_batch(b) for b in batch]
    if isinstance(batch, tuple):
        return tuple(copy_batch(b) for b in batch)
    return batch


class BatchPool:
    """``size`` batches per (stream, layout), drawn once and then given (as copies) to every trainer."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"num_batches must be >= 1, got {size}")
        self.size = size
        self._batches: Dict[Tuple[str, Any], List[Any]] = {}
        self.owner: Dict[Tuple[str, Any], str] = {}

    def offer(self, stream: str, batch: Any, trainer_name: str) -> None:
        key = (stream, batch_layout(batch))
        pool = self._batches.setdefault(key, [])
        if len(pool) < self.size and self.owner.setdefault(key, trainer_name) == trainer_name:
            pool.append(batch)

    def batches(self, stream: str, layout: Any) -> List[Any]:
        return self._batches[(stream, layout)]


class CyclingBatches:
    """Endless iterator over fixed batches; stands in for ``trainer.unlabeled_loader`` while steps are timed."""

    def __init__(self, batches: Sequence[Any]):
        if not batches:
            raise ValueError("CyclingBatches needs at least one batch")
        self._batches = list(batches)
        self._i = 0

    def __iter__(self) -> "CyclingBatches":
        return self

    def __next__(self) -> Any:
        batch = self._batches[self._i % len(self._batches)]
        self._i += 1
        return batch


# ----------------------------------------------------------------------------------------------------
# one trainer
# ----------------------------------------------------------------------------------------------------
@dataclass
class TrainerResult:
    """One trainer's numbers (times in ms, memory in MiB; ``ratio_to_reference`` = mean / reference mean)."""

    trainer: str
    step_ms: TimeStats
    step_ms_all: List[float]
    data_ms_per_iteration: float
    data_draws: int
    data_streams: List[str]
    sam_share: Optional[float]
    sam_ms_median: Optional[float]  # over the steps in which the SAM branch ran
    sam_steps_run: Optional[int]
    peak_memory_mib: float
    labeled_batch: Dict[str, Any]
    unlabeled_batch: Optional[Dict[str, Any]]
    ratio_to_reference: Optional[float] = None
    periodic_ms_per_iteration: Optional[float] = None  # amortised SAM work outside the step (cached pseudo-labels)
    periodic_s: Optional[float] = None
    periodic_serves_iterations: Optional[int] = None
    ratio_incl_periodic: Optional[float] = None


@dataclass
class BenchmarkSettings:
    """What to measure: the dataset/configuration/fold/plans, the device and the iteration counts."""

    dataset: str
    configuration: str
    fold: Union[int, str] = 0
    plans_identifier: str = "nnUNetPlans"
    device: str = "cuda"
    warmup: int = 5
    iters: int = 20
    num_batches: int = 4
    data_iters: int = 10
    seed: int = 12345
    verbose: bool = False
    # extra nnUNet_samssl_overrides per trainer name, appended to the environment's while it is built
    trainer_overrides: Dict[str, str] = field(default_factory=dict)


def trainer_name(trainer: TrainerSpec) -> str:
    return trainer if isinstance(trainer, str) else trainer.__name__


def find_trainer_class(trainer: TrainerSpec) -> type:
    """A trainer class from its name (nnU-Net's lookup: stock trainers and ``nnUNet_extTrainer`` folders)."""
    if not isinstance(trainer, str):
        return trainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(trainer)


def build_trainer(trainer: TrainerSpec, dataset: str, configuration: str, fold: Union[int, str],
                  plans_identifier: str, device: torch.device):
    """The trainer as ``nnUNetv2_train`` builds it (new training, settings from the environment)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    cls = find_trainer_class(trainer)
    dataset_id = int(dataset) if str(dataset).isdigit() else dataset
    base = os.path.join(nnUNet_preprocessed.require(), maybe_convert_to_dataset_name(dataset_id))
    plans_file = os.path.join(base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"No plans {plans_file}: run nnUNetv2_plan_and_preprocess for this dataset, or pick "
                                f"the plans with -p.")
    plans = load_json(plans_file)
    plans["continue_training"] = False
    trainer = cls(plans, configuration, fold, load_json(os.path.join(base, "dataset.json")), device=device)
    prepare = getattr(trainer, "prepare_for_speed_benchmark", None)  # e.g. SFR's stage-1 model, stood in for
    if prepare is not None:
        prepare()
    return trainer


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefetched(loader: Any) -> int:
    """Batches a background loader may hold ready (worker queue + pin-memory queue); 0 without workers."""
    return 2 * int(getattr(loader, "num_cached", 0))


def _finish_loader(loader: Any) -> None:
    finish = getattr(loader, "_finish", None)
    if finish is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            finish()


def measure_data_pipeline(trainer, pool: BatchPool, name: str,
                          data_iters: int) -> Tuple[float, int, Dict[str, Any]]:
    """Times ``next`` on the trainer's loaders after draining their prefetch cache; fills ``pool`` on the way.

    Returns (mean ms per iteration over the timed draws, number of timed draws, {stream: batch layout}),
    streams being ``labeled`` and, for trainers with an ``unlabeled_loader``, ``unlabeled``.
    """
    streams = [("labeled", trainer.dataloader_train)]
    unlabeled = getattr(trainer, "unlabeled_loader", None)
    if unlabeled is not None:
        streams.append(("unlabeled", unlabeled))
    layouts: Dict[str, Any] = {}

    def draw(stream: str, batch: Any) -> None:
        layouts.setdefault(stream, batch_layout(batch))
        pool.offer(stream, batch, name)

    # untimed: empty the prefetch cache and fill the pool (at least pool.size draws)
    for _ in range(max(pool.size, max(_prefetched(loader) for _, loader in streams))):
        for stream, loader in streams:
            draw(stream, next(loader))
    times = []
    for _ in range(data_iters):
        t0 = time.perf_counter()
        drawn = [(stream, next(loader)) for stream, loader in streams]
        times.append(time.perf_counter() - t0)
        for stream, batch in drawn:
            draw(stream, batch)
    mean_ms = float(np.mean(times) * 1000.0) if times else float("nan")
    return mean_ms, len(times), layouts


def time_train_steps(trainer, labeled: Sequence[dict], warmup: int, iters: int,
                     device: torch.device) -> Tuple[List[float], List[Optional[float]]]:
    """Calls ``train_step`` ``warmup + iters`` times on ``labeled`` (cycled).

    Returns the timed steps' durations (s) and their ``sam_time_s`` (s, None where not reported).
    """
    step_s: List[float] = []
    sam_s: List[Optional[float]] = []
    for i in range(warmup + iters):
        batch = labeled[i % len(labeled)]
        _synchronize(device)
        t0 = time.perf_counter()
        out = trainer.train_step(batch)
        _synchronize(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            step_s.append(dt)
            sam = out.get(SAM_TIME_KEY) if isinstance(out, dict) else None
            sam_s.append(None if sam is None else float(torch.as_tensor(sam).double().mean()))
    return step_s, sam_s


@contextlib.contextmanager
def _console(verbose: bool) -> Iterator[None]:
    """Hides the trainers' console chatter (replayed on stderr if something fails)."""
    if verbose:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-20000:])
        raise


@contextlib.contextmanager
def _overrides_added(extra: str) -> Iterator[None]:
    """``nnUNet_samssl_overrides`` with ``extra`` appended (later keys win), restored afterwards."""
    from nnunetv2_samssl.config.schema import OVERRIDES_ENV
    old = os.environ.get(OVERRIDES_ENV)
    if extra.strip():
        os.environ[OVERRIDES_ENV] = f"{old or ''} {extra}".strip()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OVERRIDES_ENV, None)
        else:
            os.environ[OVERRIDES_ENV] = old


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _describe_batches(stream: str, layout: Any, pool: BatchPool, batches: Sequence[Any]) -> Dict[str, Any]:
    data = batches[0]["data"] if isinstance(batches[0], dict) and "data" in batches[0] else None
    return {"data_shape": list(data.shape) if data is not None else None, "count": len(batches),
            "drawn_by": pool.owner[(stream, layout)], "checksum": batch_checksum(batches)}


def sam_summary(sam_s: Sequence[Optional[float]],
                step_s: Sequence[float]) -> Tuple[Optional[float], Optional[float], Optional[int]]:
    """(mean of sam_time_s / step time, median SAM ms over the steps it ran, steps it ran), all None when the
    trainer reports no ``sam_time_s``. A NaN ``sam_time_s`` is a step without the SAM branch (0 s)."""
    if all(s is None for s in sam_s):
        return None, None, None
    shares = [(0.0 if s is None or np.isnan(s) else s) / t for s, t in zip(sam_s, step_s)]
    ran = [s for s in sam_s if s is not None and not np.isnan(s)]
    return float(np.mean(shares)), (float(np.median(ran) * 1000.0) if ran else None), len(ran)


def benchmark_trainer(trainer_spec: TrainerSpec, settings: BenchmarkSettings, pool: BatchPool,
                      device: torch.device) -> TrainerResult:
    """Builds one trainer, measures it (see the module docstring) and shuts it down."""
    name = trainer_name(trainer_spec)
    seed_everything(settings.seed)  # identical architectures start from identical weights
    trainer = None
    real_unlabeled = None
    try:
        with _console(settings.verbose):
            with _overrides_added(settings.trainer_overrides.get(name, "")):
                trainer = build_trainer(trainer_spec, settings.dataset, settings.configuration, settings.fold,
                                        settings.plans_identifier, device)
            trainer.on_train_start()
            real_unlabeled = getattr(trainer, "unlabeled_loader", None)
            data_ms, data_draws, layouts = measure_data_pipeline(trainer, pool, name, settings.data_iters)
            # private copies: a trainer that edits its batch in place cannot change what the next one gets
            batches = {s: [copy_batch(b) for b in pool.batches(s, layout)] for s, layout in layouts.items()}
            described = {s: _describe_batches(s, layouts[s], pool, batches[s]) for s in layouts}
            if real_unlabeled is not None:
                trainer.unlabeled_loader = CyclingBatches(batches["unlabeled"])
            trainer.on_train_epoch_start()
            periodic_work = getattr(trainer, "timed_periodic_work", None)
            periodic = periodic_work() if callable(periodic_work) else None  # before the steps: they use it
            with PeakMemoryMeter(device) as meter:
                step_s, sam_s = time_train_steps(trainer, batches["labeled"], settings.warmup, settings.iters,
                                                 device)
    finally:
        if trainer is not None:
            if real_unlabeled is not None:
                trainer.unlabeled_loader = real_unlabeled
            for loader in (trainer.dataloader_train, trainer.dataloader_val, real_unlabeled):
                _finish_loader(loader)
        trainer = real_unlabeled = None
        release_memory(device)

    sam_share, sam_ms_median, sam_steps_run = sam_summary(sam_s, step_s)
    step_ms = TimeStats.from_seconds(step_s)
    periodic_fields: Dict[str, Any] = {}
    if periodic is not None:
        seconds, serves = periodic
        per_it = seconds * 1000.0 / serves
        periodic_fields = dict(periodic_ms_per_iteration=per_it, periodic_s=seconds, periodic_serves_iterations=serves)
        sam_share = per_it / (step_ms.mean + per_it)
    return TrainerResult(
        trainer=name, step_ms=step_ms, step_ms_all=[t * 1000.0 for t in step_s],
        data_ms_per_iteration=data_ms, data_draws=data_draws, data_streams=list(layouts),
        sam_share=sam_share, sam_ms_median=sam_ms_median, sam_steps_run=sam_steps_run,
        peak_memory_mib=float(meter.peak_mib),
        labeled_batch=described["labeled"], unlabeled_batch=described.get("unlabeled"), **periodic_fields)


# ----------------------------------------------------------------------------------------------------
# all trainers
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def scratch_results_folder() -> Iterator[str]:
    """Points ``nnUNet_results`` at a temporary folder (trainer logs, debug files) and deletes it afterwards."""
    old = os.environ.get("nnUNet_results")
    folder = tempfile.mkdtemp(prefix="samssl_benchmark_")
    os.environ["nnUNet_results"] = folder
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old
        shutil.rmtree(folder, ignore_errors=True)


def with_reference(trainers: Sequence[TrainerSpec]) -> List[TrainerSpec]:
    """``trainers`` without duplicates, with ``nnUNetTrainer`` first (added when missing)."""
    out: List[TrainerSpec] = [REFERENCE_TRAINER]
    seen = {REFERENCE_TRAINER}
    for t in trainers:
        if trainer_name(t) not in seen:
            seen.add(trainer_name(t))
            out.append(t)
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} torch threads)"


def run_benchmark(trainers: Sequence[TrainerSpec], settings: BenchmarkSettings,
                  log=print) -> Dict[str, Any]:
    """Measures every trainer (``nnUNetTrainer`` first) and returns the report (the JSON's content)."""
    for key in ("warmup", "data_iters"):
        if getattr(settings, key) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0")
    if settings.iters < 1:
        raise ValueError("--iters must be >= 1")
    device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("-device cuda was requested but torch sees no CUDA device; use -device cpu.")
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train does
        device = torch.device("cuda", torch.cuda.current_device())
    pool = BatchPool(settings.num_batches)
    results: List[TrainerResult] = []
    with scratch_results_folder():
        for spec in with_reference(trainers):
            log(f"benchmarking {trainer_name(spec)} ...")
            results.append(benchmark_trainer(spec, settings, pool, device))
    reference = results[0].step_ms.mean
    for r in results:
        r.ratio_to_reference = r.step_ms.mean / reference
        if r.periodic_ms_per_iteration is not None:
            r.ratio_incl_periodic = (r.step_ms.mean + r.periodic_ms_per_iteration) / reference
    from nnunetv2_samssl.config.schema import CONFIG_ENV, OVERRIDES_ENV
    return {
        "dataset": str(settings.dataset), "configuration": settings.configuration, "fold": settings.fold,
        "plans": settings.plans_identifier, "device": device_description(device),
        "torch": torch.__version__, "nnUNet_compile": os.environ.get("nnUNet_compile", "(default: on for CUDA)"),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "(default)"),
        "samssl_config": os.environ.get(CONFIG_ENV) or None, "samssl_overrides": os.environ.get(OVERRIDES_ENV) or None,
        "trainer_overrides": dict(settings.trainer_overrides),
        "warmup": settings.warmup, "iters": settings.iters, "num_batches": settings.num_batches,
        "data_iters": settings.data_iters, "reference": REFERENCE_TRAINER,
        "memory_measure": PeakMemoryMeter.describe(device),
        "trainers": [asdict(r) for r in results],
    }


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def _fmt_share(r: Dict[str, Any]) -> str:
    if r["sam_share"] is None:
        return "-"
    text = f"{100 * r['sam_share']:.0f}%"
    if r.get("periodic_ms_per_iteration") is not None:
        return text + " (periodic)"
    ran, timed = r["sam_steps_run"], len(r["step_ms_all"])
    return text if ran == timed else f"{text} ({ran}/{timed} steps)"


def format_table(report: Dict[str, Any]) -> str:
    """The report as a fixed-width text table."""
    head = ["trainer", "ms/it mean", "median", "IQR", "min-max", f"x {report['reference']}", "periodic ms/it",
            "x incl. periodic", "data ms/it", "SAM share", "peak MiB"]
    rows = []
    for r in report["trainers"]:
        s = r["step_ms"]
        rows.append([r["trainer"], _fmt(s["mean"]), _fmt(s["median"]), f"{_fmt(s['q1'])}-{_fmt(s['q3'])}",
                     f"{_fmt(s['min'])}-{_fmt(s['max'])}", _fmt(r["ratio_to_reference"], ".2f"),
                     _fmt(r.get("periodic_ms_per_iteration")), _fmt(r.get("ratio_incl_periodic"), ".2f"),
                     _fmt(r["data_ms_per_iteration"]),
                     _fmt_share(r),
                     _fmt(r["peak_memory_mib"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"Training-step speed: dataset {report['dataset']}, {report['configuration']}, fold {report['fold']}, "
           f"plans {report['plans']}, {report['device']}",
           f"{report['warmup']} warm-up + {report['iters']} timed iterations on the same {report['num_batches']} "
           f"labeled/unlabeled batches per trainer; nnUNet_compile={report['nnUNet_compile']}",
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += ["data ms/it: next() on the trainer's own loaders after draining their prefetch cache (labeled + "
            "unlabeled stream), excluded from ms/it",
            "SAM share: mean of train_step()['sam_time_s'] / step time ('-': the trainer reports none; "
            "a NaN sam_time_s counts as a step without the SAM branch)",
            "periodic ms/it: SAM work done outside the step (cached pseudo-labels: one refresh / the iterations "
            "it serves); 'x incl. periodic' adds it to the mean step; the SAM share is then periodic / total",
            f"peak MiB: {report['memory_measure']}"]
    return "\n".join(out)


def write_json(report: Dict[str, Any], path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _merge_sets(pairs: Sequence[Sequence[str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for trainer, text in pairs:
        out[trainer] = f"{out.get(trainer, '')} {text}".strip()
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_benchmark",
        description="Times the training step of nnU-Net trainers on identical batches, in one process, "
                    "against nnUNetTrainer (added when not listed). Trainer settings come from "
                    "nnUNet_samssl_config / nnUNet_samssl_overrides as in training; the trainers' own output "
                    "goes to a temporary nnUNet_results.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    parser.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer class names")
    parser.add_argument("-f", "--fold", default="0", help="fold (default 0)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-device", "--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per trainer (default 5)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per trainer (default 20)")
    parser.add_argument("--num-batches", type=int, default=4,
                        help="labeled and unlabeled batches drawn once and shared by all trainers (default 4)")
    parser.add_argument("--data-iters", type=int, default=10,
                        help="timed draws from each trainer's own loaders (default 10)")
    parser.add_argument("--seed", type=int, default=12345, help="seed set before each trainer is built")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("TRAINER", "OVERRIDES"),
                        help="extra nnUNet_samssl_overrides for one trainer, e.g. --set nnUNetTrainerSemiSAM "
                             "'sam_random_init=true' (repeatable; appended to the environment's)")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show the trainers' console output")
    args = parser.parse_args(argv)
    fold: Union[int, str] = args.fold if args.fold == "all" else int(args.fold)
    # the thread settings nnUNetv2_train uses for each device
    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
    settings = BenchmarkSettings(args.dataset, args.configuration, fold, args.plans, args.device, args.warmup,
                                 args.iters, args.num_batches, args.data_iters, args.seed, args.verbose,
                                 _merge_sets(args.set))
    report = run_benchmark(args.trainers, settings, log=lambda m: print(m, file=sys.stderr))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
