"""The few-label protocol (``nnUNetv2_samssl_fewlabel``): Dice (and HD95) against the number of labeled cases.

For each count N of ``--labeled`` and one fold of the dataset:

- the N labeled cases are chosen ONCE from the fold's training cases with
  ``data.splits.choose_labeled_subset`` (seeded, nested: the 2 cases contain the 1) and passed to every
  trainer as an explicit ``labeled_cases`` list, so all trainers of a row see exactly the same labels;
- ``nnUNetTrainerLabeledSubset`` (plain nnU-Net training) is trained on those N cases only: the
  supervised baseline;
- every semi-supervised trainer (``-tr``) is trained on the same N labeled cases with the fold's other
  training cases as unlabeled data (labeled-subset mode; the ``imagesUnlabeled`` cases are added only
  with ``--use-unlabeled-folder``);
- every ``--variant NAME TRAINER OVERRIDES`` is one more semi-supervised row: TRAINER on the same cases with
  ``--overrides`` then OVERRIDES, under its own NAME (an ablation: one trainer, several settings);
- every run is validated by nnU-Net itself (``perform_actual_validation``: sliding-window prediction
  of the fold's validation cases, ``compute_metrics_on_folder`` -> ``validation/summary.json``), which is
  disjoint from the training cases of the fold.

All runs share one training schedule (from ``--epochs/--iters/--val-iters``, else from the
semi-supervised trainers' config, which must then agree), pinned explicitly for every run through
``nnUNet_samssl_overrides``. Each run is a separate ``nnUNetv2_train`` process (the stock CLI, memory
freed between runs) with its own ``nnUNet_results`` = ``OUTDIR/runs/<row>_N<n>/`` (``<row>``: the trainer, or
the variant's NAME), so runs never overwrite each other. ``--repeats R`` trains every run R times
(nnU-Net on CPU is not seeded: the repeats measure the run-to-run spread); repeat r >= 1 goes to
``runs/<row>_N<n>_r<r>/``, the first keeps the folder of a protocol without repeats. Re-running the command
resumes: a run with ``checkpoint_final.pth`` and ``validation/summary.json`` is reused, one with only the final
checkpoint is validated (``--val``), an interrupted one continues (``--c``). A run folder planned with other
settings is an error, never silently mixed in.

Written to OUTDIR: ``plan.json`` (every run: cases, overrides), ``runs/<run>/run.json`` (plan + attempts),
``runs/<run>/nnUNetv2_train.log``, and the results ``fewlabel_results.csv`` (one line per run, repeats
included), ``fewlabel_results.md`` (one line per row and N: mean ± sample standard deviation over the
repeats) and ``fewlabel_dice.png`` (mean foreground Dice against N, one line per row, error bars: the
standard deviation over the repeats).

HD95 (mm) is computed here from the validation predictions and nnU-Net's ``gt_segmentations``: per case
and class the larger of the two directed 95th-percentile surface distances (voxel spacing of the
file), averaged over the cases where both masks are non-empty (cases where only one is empty are
counted in ``hd95_undefined``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2_samssl.config.schema import CONFIG_ENV, OVERRIDES_ENV, ConfigError, parse_overrides

BASELINE_TRAINER = "nnUNetTrainerLabeledSubset"
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr")
PINNED_KEYS = ("num_labeled", "labeled_cases", "labeled_subset_seed", "use_unlabeled_folder", "training_seed")
RUNS_FOLDER = "runs"
RUN_RECORD = "run.json"
TRAIN_LOG = "nnUNetv2_train.log"
PLAN_FILE = "plan.json"
RESULTS_CSV = "fewlabel_results.csv"
TEST_FOLDER = "test_predictions"  # in each run's fold folder: the held-out test predictions and summary.json
RESULTS_MD = "fewlabel_results.md"
RESULTS_PNG = "fewlabel_dice.png"
PAIRED_GAIN = "dice_gain_paired"  # seeded runs: dice_mean minus that of the baseline with the same seed
COHORTS_FILE = "cohorts.json"  # a shifted-cohort dataset's sites (raw dataset folder)
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
# fields of a run that must match for a finished run folder to be reused
PLANNED_FIELDS = ("trainer", "variant", "kind", "num_labeled", "labeled_cases", "unlabeled_cases",
                  "validation_cases", "dataset", "configuration", "fold", "plans_identifier", "overrides", "config")
# a --variant NAME names run folders (runs/<NAME>_N<n>)
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ProtocolError(RuntimeError):
    """The protocol cannot run as asked (bad counts, conflicting settings, a failed or mismatching run)."""


# ----------------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldSplit:
    train: Tuple[str, ...]
    validation: Tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the protocol. ``results_dir`` is its ``nnUNet_results``: ``runs/<name>``."""

    trainer: str
    kind: str  # "supervised" (baseline) or "semi-supervised"
    num_labeled: int
    labeled_cases: Tuple[str, ...]
    unlabeled_cases: Tuple[str, ...]  # fold training cases used unlabeled (empty for the baseline)
    unused_cases: Tuple[str, ...]  # fold training cases the run never sees (the baseline's left-out cases)
    validation_cases: Tuple[str, ...]
    uses_unlabeled_folder: bool
    dataset: str
    configuration: str
    fold: int
    plans_identifier: str
    overrides: str
    config: Optional[str]
    results_dir: str
    variant: Optional[str] = None  # the --variant NAME of its row; None for the baseline and the -tr trainers
    repeat: int = 0  # 0-based index among the --repeats of the same row and N

    @property
    def row(self) -> str:
        """Its row's name in the results: the variant's NAME, else the trainer."""
        return self.variant or self.trainer

    @property
    def name(self) -> str:
        """Its run folder's name (:func:`run_name`)."""
        return run_name(self.row, self.num_labeled, self.repeat)

    @property
    def output_folder(self) -> str:
        """``fold_X`` folder nnU-Net writes (checkpoints, ``validation/``)."""
        return os.path.join(self.results_dir, self.dataset,
                            f"{self.trainer}__{self.plans_identifier}__{self.configuration}", f"fold_{self.fold}")

    @property
    def summary_file(self) -> str:
        return os.path.join(self.output_folder, "validation", "summary.json")

    def environment(self, base: Mapping[str, str]) -> Dict[str, str]:
        """The environment of its ``nnUNetv2_train`` process."""
        env = {k: v for k, v in base.items() if k not in (CONFIG_ENV, OVERRIDES_ENV)}
        env["nnUNet_results"] = self.results_dir
        env[OVERRIDES_ENV] = self.overrides
        if self.config:
            env[CONFIG_ENV] = self.config
        return env


@dataclass(frozen=True)
class Variant:
    """``--variant NAME TRAINER OVERRIDES``: the semi-supervised TRAINER as one more row, named NAME, with
    ``--overrides`` then OVERRIDES (``key=value ...``) as its settings."""

    name: str
    trainer: Union[str, type]
    overrides: str = ""


@dataclass
class ProtocolSettings:
    dataset: str  # name (DatasetXXX_Name) or id
    configuration: str
    labeled_counts: Sequence[int]
    trainers: Sequence[Union[str, type]] = ()  # semi-supervised trainers
    fold: int = 0
    plans_identifier: str = "nnUNetPlans"
    outdir: str = "fewlabel"
    device: str = "cuda"
    epochs: Optional[int] = None
    iters: Optional[int] = None
    val_iters: Optional[int] = None
    seed: int = 12345
    config: Optional[str] = None  # nnUNet_samssl_config of the semi-supervised runs
    ssl_overrides: str = ""  # extra nnUNet_samssl_overrides of the semi-supervised runs
    trainer_overrides: Dict[str, str] = field(default_factory=dict)  # ... of one trainer's runs (after those)
    use_unlabeled_folder: bool = False
    hd95: bool = True
    labeled_from: Sequence[str] = ()  # the labeled cases are drawn from these (e.g. one site's cases); () = all
    test: bool = False  # also predict and score the raw dataset's held-out imagesTs / labelsTs cases
    variants: Sequence[Variant] = ()  # more semi-supervised rows: a trainer under a name, with its own settings
    repeats: int = 1  # independent trainings of every run
    finished_only: bool = False  # tabulate the finished runs of the plan, train nothing
    training_seed: Optional[int] = None  # repeat r of every row trains with training_seed + r (None: unseeded)


def read_case_pool(values: Sequence[str]) -> Tuple[str, ...]:
    """``--labeled-from`` values: case ids, or one JSON file with a ``source`` list (the ``cohorts.json`` of a
    shifted-cohort dataset, ``nnUNetv2_samssl_make_fewlabel_dataset --shifted``)."""
    if len(values) == 1 and values[0].endswith(".json"):
        path = values[0]
        if not os.path.isfile(path):
            raise ProtocolError(f"--labeled-from {path}: no such file (give case ids or a cohorts.json).")
        with open(path) as f:
            content = json.load(f)
        if not isinstance(content, dict) or not isinstance(content.get("source"), list) or not content["source"]:
            raise ProtocolError(f"--labeled-from {path}: expected a JSON object with a non-empty 'source' list of "
                                f"case ids (the cohorts.json a shifted-cohort dataset has).")
        return tuple(str(c) for c in content["source"])
    return tuple(values)


def labeled_pool(split: FoldSplit, labeled_from: Sequence[str], fold: int) -> Tuple[Tuple[str, ...], List[str]]:
    """The fold's training cases the labeled subsets are drawn from, and the ``labeled_from`` cases the fold
    validates on (they stay validation cases)."""
    if not labeled_from:
        return tuple(split.train), []
    wanted = set(labeled_from)
    unknown = sorted(wanted - set(split.train) - set(split.validation))
    if unknown:
        raise ProtocolError(f"--labeled-from lists {unknown[:5]}, which are not cases of fold {fold}'s split "
                            f"(training or validation).")
    return tuple(c for c in split.train if c in wanted), sorted(wanted & set(split.validation))


def dataset_name(dataset: Union[str, int]) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    return maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)


def fold_split(dataset: str, configuration: str, fold: int, plans_identifier: str = "nnUNetPlans") -> FoldSplit:
    """The fold's training and validation cases from ``splits_final.json``.

    A missing file is created exactly as ``nnUNetTrainer.do_split`` creates it (5 folds, seed 12345, over
    the sorted preprocessed cases), so the trainers read the same split.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = os.path.join(nnUNet_preprocessed.require(), dataset)
    plans_file = os.path.join(base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise ProtocolError(f"No plans {plans_file}: run nnUNetv2_plan_and_preprocess -d {dataset} first, or pick "
                            f"the plans with -p.")
    data_folder = os.path.join(base, PlansManager(plans_file).get_configuration(configuration).data_identifier)
    if not os.path.isdir(data_folder):
        raise ProtocolError(f"{data_folder} does not exist: preprocess configuration {configuration} first.")
    splits_file = os.path.join(base, "splits_final.json")
    if not os.path.isfile(splits_file):
        identifiers = sorted(infer_dataset_class(data_folder).get_identifiers(data_folder))
        save_json(generate_crossval_split(identifiers, seed=12345, n_splits=5), splits_file)
    splits = load_json(splits_file)
    if not 0 <= fold < len(splits):
        raise ProtocolError(f"Fold {fold} is not in {splits_file} ({len(splits)} folds); pick one with -f.")
    train, val = tuple(splits[fold]["train"]), tuple(splits[fold]["val"])
    if set(train) & set(val):
        raise ProtocolError(f"Fold {fold} of {splits_file} has cases in both train and val; the protocol needs "
                            f"disjoint validation cases.")
    return FoldSplit(train, val)


def trainer_kind(trainer: Union[str, type]) -> Tuple[type, str]:
    """(class, 'supervised' | 'semi-supervised'); raises for trainers the protocol cannot restrict to N cases.

    The supervised baseline is checked first: ``nnUNetTrainerLabeledSubset`` (and its subclasses) is
    'supervised' whether or not it derives from ``nnUNetTrainerSSLBase``.
    """
    from nnunetv2_samssl.benchmark.speed import find_trainer_class
    from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
    from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase

    cls = find_trainer_class(trainer)
    if issubclass(cls, nnUNetTrainerLabeledSubset):
        return cls, "supervised"
    if issubclass(cls, nnUNetTrainerSSLBase):
        return cls, "semi-supervised"
    raise ProtocolError(f"{cls.__name__} cannot be restricted to N labeled cases. The supervised baseline "
                        f"({BASELINE_TRAINER}, plain nnU-Net training on the N cases) is always run; -tr takes "
                        f"semi-supervised trainers of this package.")


def format_override(key: str, value: Any) -> str:
    """One ``key=value`` token of ``nnUNet_samssl_overrides`` (YAML value without whitespace)."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, (list, tuple)):
        bad = [c for c in value if not isinstance(c, str) or not c or any(ch.isspace() or ch == "'" for ch in c)]
        if bad:
            raise ProtocolError(f"Case identifiers {bad[:3]} contain whitespace or quotes and cannot be passed "
                                f"through {OVERRIDES_ENV}.")
        # YAML single quotes keep the text literally, so identifiers such as 001 or yes stay strings
        quoted = ",".join("'" + c + "'" for c in value)
        return f"{key}=[{quoted}]"
    return f"{key}={value}"


def ssl_override_text(settings: ProtocolSettings, trainer: str, variant: Optional[Variant] = None) -> str:
    """The user's extra settings for one semi-supervised row: ``--overrides`` then the trainer's ``--set``, or for a
    variant ``--overrides`` then the variant's own (``--set`` is for the ``-tr`` rows only)."""
    extra = variant.overrides if variant is not None else settings.trainer_overrides.get(trainer, "")
    return f"{settings.ssl_overrides} {extra}".strip()


@dataclass(frozen=True)
class ProtocolRow:
    """One row of the results, planned at every N and repeat: the baseline, a ``-tr`` trainer or a variant.
    ``overrides``: the user's settings of its runs (empty for supervised rows)."""

    trainer: type
    kind: str
    variant: Optional[str] = None
    overrides: str = ""

    @property
    def name(self) -> str:
        return self.variant or self.trainer.__name__


def protocol_rows(settings: ProtocolSettings) -> List[ProtocolRow]:
    """The baseline, the ``-tr`` trainers (each once) and the variants, in this order; checks the trainers and
    the variants' names."""
    from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset

    rows = [ProtocolRow(nnUNetTrainerLabeledSubset, "supervised")]
    for t in settings.trainers:
        cls, kind = trainer_kind(t)
        if cls.__name__ not in [r.name for r in rows]:
            rows.append(ProtocolRow(cls, kind, overrides=ssl_override_text(settings, cls.__name__)
                                    if kind == "semi-supervised" else ""))
    trainer_rows = [r.name for r in rows]
    for i, v in enumerate(settings.variants):
        if not VARIANT_NAME.fullmatch(v.name):
            raise ProtocolError(f"--variant {v.name!r}: the name of a variant names its run folders "
                                f"(runs/<NAME>_N<n>); use letters, digits, '_', '.' and '-', starting with a letter "
                                f"or digit.")
        if v.name in trainer_rows:
            raise ProtocolError(f"--variant {v.name}: {v.name} is the name of the "
                                f"{'baseline' if v.name == BASELINE_TRAINER else '-tr trainer'}'s rows and run "
                                f"folders; give the variant another name.")
        if any(other.name == v.name for other in settings.variants[:i]):
            raise ProtocolError(f"--variant {v.name} is given twice; give every variant its own name.")
        cls, kind = trainer_kind(v.trainer)
        if kind != "semi-supervised":
            raise ProtocolError(f"--variant {v.name}: {cls.__name__} trains on the labeled cases only (the "
                                f"supervised baseline, which always runs with the protocol's settings); a variant "
                                f"takes a semi-supervised trainer of this package.")
        rows.append(ProtocolRow(cls, kind, v.name, ssl_override_text(settings, cls.__name__, v)))
    return rows


def _row_settings(settings: ProtocolSettings, row: ProtocolRow, cli: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a semi-supervised row's runs resolve to, before the protocol pins their cases."""
    from nnunetv2_samssl.config.schema import resolve_config

    user = parse_overrides(row.overrides)
    clash = sorted(set(user) & set(PINNED_KEYS))
    if clash:
        raise ProtocolError(f"{row.name}: --overrides / --set / --variant must not set {clash}: the protocol chooses "
                            f"the labeled cases and the seeds itself (--labeled, --seed, --use-unlabeled-folder, "
                            f"--training-seed).")
    cfg, _ = resolve_config(row.trainer.config_schema(), row.trainer.default_config, config=settings.config,
                            overrides={**user, **{k: v for k, v in cli.items() if v is not None}}, environ={})
    return cfg


def resolve_schedule(settings: ProtocolSettings, rows: Sequence[ProtocolRow]) -> Dict[str, Any]:
    """The schedule every run gets: CLI values, else what the semi-supervised rows' settings give
    (they must agree), else nnU-Net's defaults (null)."""
    cli = {"num_epochs": settings.epochs, "num_iterations_per_epoch": settings.iters,
           "num_val_iterations_per_epoch": settings.val_iters}
    schedule: Dict[str, Any] = {k: None for k in SCHEDULE_KEYS}
    seen: Dict[str, Tuple[Any, str]] = {}
    for row in rows:
        if row.kind != "semi-supervised":
            continue
        try:
            cfg = _row_settings(settings, row, cli)
        except ConfigError as e:
            raise ProtocolError(f"The settings of the {row.name} runs are invalid: {e}") from e
        for key in SCHEDULE_KEYS:
            if key in seen and seen[key][0] != cfg[key]:
                raise ProtocolError(f"{seen[key][1]} and {row.name} resolve {key} differently ({seen[key][0]!r} "
                                    f"vs {cfg[key]!r}); give the schedule explicitly (--epochs, --iters, "
                                    f"--val-iters, or {key} in --overrides).")
            seen.setdefault(key, (cfg[key], row.name))
            schedule[key] = cfg[key]
    for key, value in cli.items():
        if value is not None:
            schedule[key] = value
    return schedule


def run_name(row: str, num_labeled: int, repeat: int = 0) -> str:
    """A run's folder name: ``<row>_N<n>``, with ``_r<repeat>`` from the second repeat on (the first keeps the
    name of a protocol without repeats, so its finished runs are reused)."""
    return f"{row}_N{num_labeled}" + (f"_r{repeat}" if repeat else "")


def plan_runs(settings: ProtocolSettings) -> List[RunSpec]:
    """Every run of the protocol (nothing is trained here): repeat by repeat (so the whole protocol is trained once
    before any run a second time), N by N, the baseline first within each N, then the -tr trainers and the
    variants."""
    from nnunetv2_samssl.data.splits import LabeledSubsetError, choose_labeled_subset

    name = dataset_name(settings.dataset)
    split = fold_split(name, settings.configuration, settings.fold, settings.plans_identifier)
    counts = sorted(set(int(n) for n in settings.labeled_counts))
    if not counts:
        raise ProtocolError("--labeled needs at least one number of labeled cases.")
    if settings.repeats < 1:
        raise ProtocolError(f"--repeats {settings.repeats}: every run is trained at least once; give 1 or more.")
    rows = protocol_rows(settings)
    schedule = resolve_schedule(settings, rows)
    schedule_tokens = [format_override(k, v) for k, v in schedule.items()]
    outdir = os.path.abspath(settings.outdir)
    pool, _ = labeled_pool(split, settings.labeled_from, settings.fold)
    subsets: Dict[int, Tuple[List[str], List[str]]] = {}  # N -> (labeled, the fold's other training cases)
    for n in counts:
        try:
            labeled, _ = choose_labeled_subset(pool, n, None, settings.seed)
        except LabeledSubsetError as e:
            if settings.labeled_from:
                raise ProtocolError(f"--labeled {n}: only {len(pool)} of fold {settings.fold}'s training cases are "
                                    f"in --labeled-from ({list(pool)}); ask for at most {len(pool)} labeled cases "
                                    f"or give more cases.") from e
            raise ProtocolError(f"--labeled {n}: fold {settings.fold} has {len(split.train)} training cases. "
                                f"{e}") from e
        rest = [c for c in sorted(split.train) if c not in set(labeled)]
        if not rest and any(r.kind == "semi-supervised" for r in rows) and not settings.use_unlabeled_folder:
            raise ProtocolError(f"--labeled {n} uses every training case of fold {settings.fold}: the "
                                f"semi-supervised trainers would have no unlabeled case (add "
                                f"--use-unlabeled-folder or use fewer labeled cases).")
        subsets[n] = (labeled, rest)
    runs = []
    for repeat in range(settings.repeats):
        for n, (labeled, rest) in subsets.items():
            pin = [format_override("num_labeled", None), format_override("labeled_cases", labeled)]
            if settings.training_seed is not None:  # one seed per repeat, shared by every row: paired runs
                pin.append(format_override("training_seed", settings.training_seed + repeat))
            for row in rows:
                semi = row.kind == "semi-supervised"
                tokens = schedule_tokens + pin
                if semi:
                    tokens = schedule_tokens + row.overrides.split() + pin + \
                             [format_override("use_unlabeled_folder", bool(settings.use_unlabeled_folder))]
                runs.append(RunSpec(
                    trainer=row.trainer.__name__, kind=row.kind, num_labeled=n, labeled_cases=tuple(labeled),
                    unlabeled_cases=tuple(rest) if semi else (), unused_cases=() if semi else tuple(rest),
                    validation_cases=split.validation, uses_unlabeled_folder=semi and settings.use_unlabeled_folder,
                    dataset=name, configuration=settings.configuration, fold=settings.fold,
                    plans_identifier=settings.plans_identifier, overrides=" ".join(tokens),
                    config=_config_reference(settings.config) if semi else None,
                    results_dir=os.path.join(outdir, RUNS_FOLDER, run_name(row.name, n, repeat)),
                    variant=row.variant, repeat=repeat))
    return runs


def _config_reference(config: Optional[str]) -> Optional[str]:
    """A bundled config name as given, a file as its absolute path (the runs start in other folders)."""
    if config and (os.path.isfile(config) or os.path.sep in config):
        return os.path.abspath(config)
    return config or None


def check_plan(runs: Sequence[RunSpec]) -> None:
    """Invariants of the protocol; raises :class:`ProtocolError` naming the run that breaks one."""
    by_n: Dict[int, List[RunSpec]] = {}
    for r in runs:
        by_n.setdefault(r.num_labeled, []).append(r)
        labeled, unlabeled, val = set(r.labeled_cases), set(r.unlabeled_cases), set(r.validation_cases)
        if len(labeled) != r.num_labeled:
            raise ProtocolError(f"{r.name}: {len(labeled)} labeled cases, expected {r.num_labeled}.")
        if labeled & unlabeled or val & (labeled | unlabeled | set(r.unused_cases)):
            raise ProtocolError(f"{r.name}: labeled, unlabeled and validation cases overlap.")
    for n, group in by_n.items():
        if len({r.labeled_cases for r in group}) != 1 or len({r.validation_cases for r in group}) != 1:
            raise ProtocolError(f"N={n}: the runs do not share the same labeled and validation cases.")
    folders: Dict[str, str] = {}
    for r in runs:
        if r.results_dir in folders:
            raise ProtocolError(f"{folders[r.results_dir]} and {r.name} share the results folder {r.results_dir}; "
                                f"every run needs its own.")
        folders[r.results_dir] = r.name


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------
def run_state(spec: RunSpec) -> str:
    """``finished`` (final checkpoint + validation summary), ``trained`` (final checkpoint only),
    ``interrupted`` (some checkpoint) or ``new``."""
    out = spec.output_folder
    if os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
        return "finished" if os.path.isfile(spec.summary_file) else "trained"
    if any(os.path.isfile(os.path.join(out, c)) for c in CHECKPOINTS):
        return "interrupted"
    return "new"


# trainers that need a command run per fold before nnUNetv2_train (same environment; it resumes or skips when done)
STAGE_COMMANDS = {"nnUNetTrainerSFR": "nnUNetv2_samssl_sfr_finetune"}


def _console_script(name: str) -> str:
    exe = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise ProtocolError(f"{name} is not on PATH (install nnunetv2 and this package in this environment).")
    return exe


def stage_command(spec: RunSpec, device: str) -> Optional[List[str]]:
    """The command a trainer needs before ``nnUNetv2_train`` (SFR's stage 1 fine-tuning), or ``None``."""
    name = STAGE_COMMANDS.get(spec.trainer)
    if name is None:
        return None
    return [_console_script(name), "-d", spec.dataset, "-c", spec.configuration, "-f", str(spec.fold), "-tr",
            spec.trainer, "-p", spec.plans_identifier, "-device", device]


def train_command(spec: RunSpec, device: str, state: str) -> List[str]:
    exe = _console_script("nnUNetv2_train")
    cmd = [exe, spec.dataset, spec.configuration, str(spec.fold), "-tr", spec.trainer, "-p", spec.plans_identifier,
           "-device", device]
    if state == "trained":
        cmd.append("--val")
    elif state == "interrupted":
        cmd.append("--c")
    return cmd


def _planned(spec: RunSpec) -> Dict[str, Any]:
    """The run's plan in its ``run.json``: the fields that must match for reuse, and its repeat index (which its
    folder name already holds)."""
    d = asdict(spec)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in PLANNED_FIELDS + ("repeat",)}


def _read_record(spec: RunSpec) -> Optional[Dict[str, Any]]:
    path = os.path.join(spec.results_dir, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_record(spec: RunSpec, record: Dict[str, Any]) -> None:
    os.makedirs(spec.results_dir, exist_ok=True)
    path = os.path.join(spec.results_dir, RUN_RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def _logged_run(cmd: List[str], spec: RunSpec, base_env: Mapping[str, str], log_path: str):
    """Runs ``cmd`` in the run's environment, appending its output to the run's log; ``(process, seconds)``."""
    t0 = time.perf_counter()
    with open(log_path, "a") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n"
                f"===== {OVERRIDES_ENV}={spec.overrides}\n")
        f.flush()
        proc = subprocess.run(cmd, env=spec.environment(base_env), stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    return proc, time.perf_counter() - t0


def execute_run(spec: RunSpec, device: str, base_env: Mapping[str, str],
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Trains / resumes / validates one run in an ``nnUNetv2_train`` subprocess, or reuses it when finished.

    Returns its record (``run.json``): the plan and one entry per attempt (command, state, seconds).
    """
    record = _read_record(spec)
    planned = _planned(spec)
    if record is not None:
        differs = [k for k in PLANNED_FIELDS if record.get("plan", {}).get(k) != planned[k]]
        if differs:
            raise ProtocolError(f"{spec.results_dir} holds a run planned with other settings ({', '.join(differs)}"
                                f"); use another output folder (-o) or delete that run folder.")
    else:
        record = {"plan": planned, "attempts": []}
    state = run_state(spec)
    if state == "finished":
        log(f"{spec.name}: reusing the finished run (checkpoint_final.pth and validation/summary.json exist)")
        record["reused"] = record.get("reused", 0) + 1
        _write_record(spec, record)
        return record
    cmd = train_command(spec, device, state)
    action = {"new": "training", "interrupted": "resuming (--c)", "trained": "validating (--val)"}[state]
    _write_record(spec, record)
    log_path = os.path.join(spec.results_dir, TRAIN_LOG)
    stage = stage_command(spec, device) if state != "trained" else None
    if stage is not None:
        log(f"{spec.name}: {os.path.basename(stage[0])} ...")
        proc, seconds = _logged_run(stage, spec, base_env, log_path)
        record["attempts"].append({"state": "stage", "command": stage, "returncode": proc.returncode,
                                   "seconds": seconds})
        _write_record(spec, record)
        if proc.returncode != 0:
            raise ProtocolError(f"{spec.name}: {os.path.basename(stage[0])} exited with code {proc.returncode}; "
                                f"see {log_path}")
    log(f"{spec.name}: {action} ...")
    proc, seconds = _logged_run(cmd, spec, base_env, log_path)
    record["attempts"].append({"state": state, "command": cmd, "returncode": proc.returncode, "seconds": seconds})
    _write_record(spec, record)
    if proc.returncode != 0 or run_state(spec) != "finished":
        with open(log_path) as f:
            tail = "".join(f.readlines()[-40:])
        raise ProtocolError(f"{spec.name}: nnUNetv2_train exited with code {proc.returncode} "
                            f"(state now: {run_state(spec)}). Last lines of {log_path}:\n{tail}")
    log(f"{spec.name}: done in {seconds:.0f} s")
    return record


@dataclass(frozen=True)
class TestSet:
    """The raw dataset's held-out labeled cases: ``imagesTs`` and ``labelsTs``."""

    images: str
    labels: str
    cases: Tuple[str, ...]
    file_ending: str
    sites: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()  # (site, its test cases) from cohorts.json's 'target'


def test_sites(folder: str, cases: Sequence[str]) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """The target sites of a shifted-cohort dataset (``cohorts.json`` in the raw dataset folder, ``target``:
    site -> case ids) with the held-out ``cases`` each holds, sites without test cases left out; () when the
    dataset has no ``cohorts.json``."""
    path = os.path.join(folder, COHORTS_FILE)
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        target = json.load(f).get("target")
    if not isinstance(target, dict) or not all(isinstance(v, list) for v in target.values()):
        raise ProtocolError(f"{path}: 'target' must map each site to a list of case ids (as the shifted-cohort "
                            f"builders write it); fix or remove the file.")
    held_out = set(cases)
    return tuple((str(site), tuple(c for c in members if c in held_out)) for site, members in target.items()
                 if any(c in held_out for c in members))


def held_out_test_set(dataset: str) -> TestSet:
    """``nnUNet_raw/<dataset>/imagesTs`` and ``labelsTs``; every labelled test case must have its images."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_raw

    folder = os.path.join(nnUNet_raw.require(), dataset)
    images, labels = os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")
    if not (os.path.isdir(images) and os.path.isdir(labels)):
        raise ProtocolError(f"--test needs held-out labeled cases: {images} and {labels} (images named as in "
                            f"imagesTr, labels as in labelsTr); this dataset has "
                            f"{'no imagesTs' if not os.path.isdir(images) else 'no labelsTs'}.")
    ending = load_json(os.path.join(folder, "dataset.json"))["file_ending"]
    cases = tuple(sorted(f[:-len(ending)] for f in os.listdir(labels) if f.endswith(ending)))
    if not cases:
        raise ProtocolError(f"--test: {labels} holds no label file ending in {ending}.")
    missing = [c for c in cases if not os.path.isfile(os.path.join(images, f"{c}_0000{ending}"))]
    if missing:
        raise ProtocolError(f"--test: {images} has no images of the labelled test cases {missing[:5]}.")
    return TestSet(images, labels, cases, ending, test_sites(folder, cases))


def test_summary_file(spec: RunSpec) -> str:
    return os.path.join(spec.output_folder, TEST_FOLDER, "summary.json")


def predict_test_set(spec: RunSpec, test_set: TestSet, device: str, base_env: Mapping[str, str],
                     log: Callable[[str], None] = print) -> None:
    """Predicts the held-out test cases with the run's final checkpoint (``nnUNetv2_predict``) and scores them
    against ``labelsTs`` with nnU-Net's evaluation; reused while newer than the checkpoint and complete."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2
    from nnunetv2.paths import nnUNet_preprocessed

    summary, checkpoint = test_summary_file(spec), os.path.join(spec.output_folder, "checkpoint_final.pth")
    if os.path.isfile(summary) and os.path.getmtime(summary) >= os.path.getmtime(checkpoint):
        scored = sorted(os.path.basename(c["reference_file"]) for c in load_json(summary)["metric_per_case"])
        if scored == sorted(c + test_set.file_ending for c in test_set.cases):
            log(f"{spec.name}: reusing its test-set predictions ({len(scored)} cases)")
            return
    out = os.path.dirname(summary)
    if os.path.isdir(out):
        shutil.rmtree(out)
    # nnU-Net's 3 preprocessing + 3 export workers, fewer on small machines: on 2 cores 1 + 1 predicts the 6 test
    # cases of dataset 903 in 25 s where 3 + 3 take 62 s
    workers = str(min(3, max(1, (os.cpu_count() or 2) // 2)))
    cmd = [_console_script("nnUNetv2_predict"), "-i", test_set.images, "-o", out, "-d", spec.dataset, "-c",
           spec.configuration, "-tr", spec.trainer, "-p", spec.plans_identifier, "-f", str(spec.fold),
           "-device", device, "--disable_progress_bar", "-npp", workers, "-nps", workers]
    log(f"{spec.name}: predicting the {len(test_set.cases)} held-out test cases ...")
    log_path = os.path.join(spec.results_dir, TRAIN_LOG)
    proc, _ = _logged_run(cmd, spec, base_env, log_path)
    if proc.returncode != 0:
        raise ProtocolError(f"{spec.name}: nnUNetv2_predict exited with code {proc.returncode}; see {log_path}")
    base = os.path.join(nnUNet_preprocessed.require(), spec.dataset)
    compute_metrics_on_folder2(test_set.labels, out, os.path.join(base, "dataset.json"),
                               os.path.join(base, spec.plans_identifier + ".json"), output_file=summary,
                               num_processes=2)


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------
def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the image border counts as outside)."""
    from scipy import ndimage
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance between two binary masks, in the units of ``spacing``.

    Args:
        prediction, reference: boolean arrays of the same shape (any number of axes).
        spacing: voxel size along each axis of the arrays (same axis order).
    Returns:
        max(p95 of distances from prediction surface to reference surface, p95 the other way);
        0.0 when both masks are empty, NaN when exactly one is.
    """
    from scipy import ndimage
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape or len(spacing) != prediction.ndim:
        raise ValueError(f"hd95: shapes {prediction.shape} / {reference.shape} and spacing {tuple(spacing)} "
                         f"do not match")
    if not prediction.any() and not reference.any():
        return 0.0
    if not prediction.any() or not reference.any():
        return float("nan")
    surf_p, surf_r = surface_mask(prediction), surface_mask(reference)
    dist_to_r = ndimage.distance_transform_edt(~surf_r, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    return float(max(np.percentile(dist_to_r[surf_p], 95), np.percentile(dist_to_p[surf_r], 95)))


def _label_names(dataset_json: Mapping[str, Any]) -> Dict[str, str]:
    """summary.json label key (``"1"``, ``"(1, 2)"``) -> readable name."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
    out = {}
    for name, value in dataset_json["labels"].items():
        key = label_or_region_to_key(tuple(value) if isinstance(value, (list, tuple)) else int(value))
        out[key] = name
    return out


def evaluate_run(spec: RunSpec, compute_hd95: bool = True, test_set: Optional[TestSet] = None) -> Dict[str, Any]:
    """Dice per class and mean from the run's ``validation/summary.json`` (with ``test_set``: from the summary of
    its held-out test predictions); HD95 from the predictions.

    Also checks that exactly the planned validation (or test) cases were evaluated.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    summary = load_json(spec.summary_file if test_set is None else test_summary_file(spec))
    base = os.path.join(nnUNet_preprocessed.require(), spec.dataset)
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    ending = dataset_json["file_ending"]
    cases = sorted(os.path.basename(c["prediction_file"])[:-len(ending)] for c in summary["metric_per_case"])
    planned = sorted(spec.validation_cases if test_set is None else test_set.cases)
    if cases != planned:
        raise ProtocolError(f"{spec.name}: {'validation' if test_set is None else 'the test set'} evaluated "
                            f"{cases}, planned {planned}.")
    names = _label_names(dataset_json)
    keys = [k for k in summary["mean"]]
    result: Dict[str, Any] = {"dice": {names.get(k, k): summary["mean"][k]["Dice"] for k in keys},
                              "dice_mean": summary["foreground_mean"]["Dice"], "cases": cases,
                              "evaluated_on": "validation" if test_set is None else "test"}
    if test_set is not None and test_set.sites:
        # per case: the mean over the classes; per site: the mean over its held-out cases
        per_case = {os.path.basename(c["prediction_file"])[:-len(ending)]:
                    _nanmean([c["metrics"][k]["Dice"] for k in keys]) for c in summary["metric_per_case"]}
        result["dice_site"] = {site: _nanmean([per_case[c] for c in members]) for site, members in test_set.sites}
    if compute_hd95:
        plans_manager = PlansManager(os.path.join(base, spec.plans_identifier + ".json"))
        reader = plans_manager.image_reader_writer_class()
        ignore = plans_manager.get_label_manager(dataset_json).ignore_label
        per_class: Dict[str, List[float]] = {k: [] for k in keys}
        for case in summary["metric_per_case"]:
            pred, props = reader.read_seg(case["prediction_file"])
            ref, _ = reader.read_seg(case["reference_file"])
            pred, ref = pred[0], ref[0]
            valid = ref != ignore if ignore is not None else np.ones(ref.shape, bool)
            spacing = list(props["spacing"])[-ref.ndim:]
            for k in keys:
                label = _key_to_label(k)
                per_class[k].append(hd95(region_or_label_to_mask(pred, label) & valid,
                                         region_or_label_to_mask(ref, label) & valid, spacing))
        result["hd95"] = {names.get(k, k): _nanmean(v) for k, v in per_class.items()}
        result["hd95_mean"] = _nanmean([_nanmean(v) for v in per_class.values()])
        result["hd95_undefined"] = int(sum(np.isnan(v).sum() for v in per_class.values()))
    return result


def _key_to_label(key: str):
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region
    return key_to_label_or_region(key)


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ----------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------
def result_rows(runs: Sequence[RunSpec], evaluations: Sequence[Mapping[str, Any]],
                records: Sequence[Mapping[str, Any]]) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows) of the per-run results (the csv), one row per run: ``variant`` is the variant's NAME (empty
    for the baseline and the -tr trainers), ``repeat`` the 0-based repeat index."""
    classes = list(evaluations[0]["dice"]) if evaluations else []
    with_hd95 = bool(evaluations) and "hd95" in evaluations[0]
    sites = list(evaluations[0].get("dice_site", {})) if evaluations else []
    header = ["trainer", "variant", "kind", "num_labeled", "num_unlabeled", "repeat"] + \
        [f"dice_{c}" for c in classes] + ["dice_mean"] + [site_column(s) for s in sites]
    if with_hd95:
        header += [f"hd95_{c}" for c in classes] + ["hd95_mean", "hd95_undefined"]
    paired = bool(runs) and all(training_seed_of(spec) is not None for spec in runs)
    if paired:  # seeded runs: each run against the baseline of its repeat (same seed, same start)
        header.insert(header.index("dice_mean") + 1, PAIRED_GAIN)
        baseline = {(spec.num_labeled, spec.repeat): ev["dice_mean"] for spec, ev in zip(runs, evaluations)
                    if spec.kind == "supervised"}
    header += [f"num_{evaluations[0]['evaluated_on'] if evaluations else 'validation'}", "train_seconds"]
    rows = []
    for spec, ev, rec in zip(runs, evaluations, records):
        unlabeled = f"{len(spec.unlabeled_cases)}{'+folder' if spec.uses_unlabeled_folder else ''}"
        row = [spec.trainer, spec.variant or "", spec.kind, spec.num_labeled, unlabeled, spec.repeat] + \
              [ev["dice"][c] for c in classes] + [ev["dice_mean"]]
        if paired:
            reference = baseline.get((spec.num_labeled, spec.repeat))
            row += [float("nan") if spec.kind == "supervised" or reference is None else ev["dice_mean"] - reference]
        row += [ev["dice_site"][s] for s in sites]
        if with_hd95:
            row += [ev["hd95"][c] for c in classes] + [ev["hd95_mean"], ev["hd95_undefined"]]
        row += [len(ev["cases"]), int(round(sum(a["seconds"] for a in rec.get("attempts", []))))]
        rows.append(row)
    return header, rows


def training_seed_of(spec: RunSpec) -> Optional[int]:
    """The ``training_seed`` a run was planned with (``--training-seed``), ``None`` if unseeded."""
    value = parse_overrides(spec.overrides).get("training_seed")
    return None if value is None else int(value)


def site_column(site: str) -> str:
    """The results column of a site's Dice: ``dice_site_contrast`` for the site ``site_contrast`` (the builders'
    names), ``dice_site_<site>`` for other names."""
    return f"dice_site_{site[len('site_'):] if site.startswith('site_') else site}"


@dataclass(frozen=True)
class Spread:
    """One result of a row and N over its repeats: the mean and the sample standard deviation (``None`` for a
    single repeat, which has no spread to estimate)."""

    values: Tuple[Any, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> Optional[float]:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None


def _spread_column(column: str) -> bool:
    """Columns that differ between the repeats of a run (its results); the others are the same for all of them."""
    return column.startswith(("dice_", "hd95_")) or column == "train_seconds"


def aggregate_rows(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows) of the summary table (markdown, console, plot) from :func:`result_rows`: one row per row name
    (the variant, else the trainer) and N, in the order they first appear, each result a :class:`Spread` over the
    repeats. ``repeat`` becomes ``runs`` (how many repeats); ``variant`` is left out when no run is a variant."""
    col = {c: i for i, c in enumerate(header)}
    groups: Dict[Tuple[Any, ...], List[Sequence[Any]]] = {}
    for row in rows:
        groups.setdefault((row[col["trainer"]], row[col["variant"]], row[col["num_labeled"]]), []).append(row)
    keep = [c for c in header if c != "variant" or any(row[col["variant"]] for row in rows)]
    out = []
    for members in groups.values():
        out.append([len(members) if c == "repeat" else
                    Spread(tuple(m[col[c]] for m in members)) if _spread_column(c) else members[0][col[c]]
                    for c in keep])
    return ["runs" if c == "repeat" else c for c in keep], out


def _cell(value: Any) -> str:
    if isinstance(value, Spread):
        if value.std is None:
            return _cell(value.values[0])
        if not np.isfinite(value.mean):
            return "nan"
        if all(isinstance(v, int) for v in value.values):  # counts and seconds
            return f"{value.mean:.1f} ± {value.std:.1f}"
        return f"{value.mean:.4f} ± {value.std:.4f}"
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.4f}"
    return str(value)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[_cell(v) for v in row] for row in rows])


def write_markdown(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]], title: str,
                   test: bool = False) -> None:
    """The summary table (:func:`aggregate_rows`) with a note on where its numbers come from."""
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    source = ("nnU-Net's evaluation of each run's final checkpoint on the held-out test cases (`imagesTs` / "
              "`labelsTs`, `test_predictions/summary.json`)" if test else
              "nnU-Net's validation of each run (`validation/summary.json`, mean over the fold's validation cases)")
    lines += ["", f"Dice: {source}; HD95 in mm (both directions' 95th percentile surface distance, max of the "
              "two)."]
    if PAIRED_GAIN in header:
        lines += ["", f"`{PAIRED_GAIN}`: each run's `dice_mean` minus that of the labeled-only run of the same repeat, "
                  "trained with the same `training_seed` (`--training-seed`: same initial weights, same labeled "
                  "patches), so the run-to-run spread of the starts cancels."]
    if any(c.startswith("dice_site_") for c in header):
        lines += ["", "`dice_site_*`: the test cases of one target site of `cohorts.json`, each case's mean over "
                  "the classes, averaged over the site's cases."]
    if any(isinstance(v, Spread) and v.std is not None for row in rows for v in row):
        lines += ["", "`a ± b`: mean ± sample standard deviation over the `runs` independent trainings of the row "
                  "(`--repeats`; one value per run in `fewlabel_results.csv`)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_dice(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]], title: str) -> None:
    """Mean foreground Dice against the number of labeled cases from the summary table (:func:`aggregate_rows`),
    one line per row name, error bars: the standard deviation over the repeats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = {c: i for i, c in enumerate(header)}
    names = [(row[col["variant"]] if "variant" in col else "") or row[col["trainer"]] for row in rows]
    repeated = any(row[col["runs"]] > 1 for row in rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name in dict.fromkeys(names):
        pts = sorted(((row[col["num_labeled"]], row[col["dice_mean"]]) for n, row in zip(names, rows) if n == name),
                     key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], marker="o", capsize=3, label=name,
                    yerr=[p[1].std or 0.0 for p in pts] if repeated else None)
    counts = sorted({row[col["num_labeled"]] for row in rows})
    ax.set_xticks(counts)
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel(f"mean foreground Dice ({'test' if 'num_test' in col else 'validation'})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, title="mean ± std over the repeats" if repeated else None, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def label_derived_normalization(plans: Mapping[str, Any], configuration: str) -> Optional[str]:
    """A warning when the configuration normalises a channel with statistics nnU-Net computed from labels.

    nnU-Net's dataset fingerprint takes the foreground intensity statistics (``CTNormalization``: clipping
    percentiles, mean, std) from the voxels inside the labels of EVERY training case, the ones this protocol
    then treats as unlabeled included. Their labels never reach training, but they did shape the intensity
    normalisation of every run. Returns ``None`` when no channel uses such a scheme.
    """
    schemes = plans["configurations"][configuration].get("normalization_schemes", [])
    label_derived = [i for i, s in enumerate(schemes) if s == "CTNormalization"]
    if not label_derived:
        return None
    return (f"WARNING: channel(s) {label_derived} of {configuration} use CTNormalization, whose intensity statistics "
            f"nnU-Net's fingerprint computed inside the labels of all training cases, including those this protocol "
            f"uses as unlabeled. For a strict protocol, plan from a copy of the dataset that holds only the labeled "
            f"cases (or fix the statistics), then preprocess the others with those plans.")


def finished_runs(runs: Sequence[RunSpec], log: Callable[[str], None] = print) -> List[RunSpec]:
    """The runs of the plan that have finished (``run_state``), each other one named in the log; a
    :class:`ProtocolError` when none has."""
    done = []
    for spec in runs:
        state = run_state(spec)
        if state == "finished":
            done.append(spec)
        else:
            log(f"{spec.name}: {state}, left out of the table (--finished-only)")
    if not done:
        raise ProtocolError("No run of this plan has finished yet (--finished-only tabulates finished runs only); "
                            "run the same command without --finished-only to train them.")
    log(f"--finished-only: {len(done)} of the {len(runs)} planned runs have finished and are tabulated.")
    return done


def run_protocol(settings: ProtocolSettings, log: Callable[[str], None] = print,
                 base_env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Plans, runs (or reuses) and evaluates every run; writes the table, plot and plan into ``outdir``.

    Returns ``{"runs": [...RunSpec], "evaluations": [...], "records": [...], "header", "rows": the per-run table
    (csv), "summary_header", "summary_rows": the table per row and N over the repeats (markdown), "files": {...}}``.
    """
    runs = plan_runs(settings)
    check_plan(runs)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    plans = load_json(os.path.join(nnUNet_preprocessed.require(), runs[0].dataset,
                                   runs[0].plans_identifier + ".json"))
    warning = label_derived_normalization(plans, settings.configuration)
    if warning:
        log(warning)
    if settings.labeled_from:
        split = fold_split(runs[0].dataset, settings.configuration, settings.fold, settings.plans_identifier)
        pool, in_validation = labeled_pool(split, settings.labeled_from, settings.fold)
        log(f"Labeled cases drawn from {len(pool)} --labeled-from cases of fold {settings.fold}'s training cases"
            + (f"; {in_validation} are validation cases of this fold and stay so" if in_validation else "") + ".")
    outdir = os.path.abspath(settings.outdir)
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, PLAN_FILE), "w") as f:
        json.dump([asdict(r) for r in runs], f, indent=2)
    if settings.finished_only:
        runs = finished_runs(runs, log)
    env = dict(os.environ if base_env is None else base_env)
    test_set = held_out_test_set(runs[0].dataset) if settings.test else None  # checked before any training
    records, evaluations = [], []
    for i, spec in enumerate(runs):
        log(f"[{i + 1}/{len(runs)}] {spec.row}" + (f" ({spec.trainer})" if spec.variant else "")
            + (f", repeat {spec.repeat + 1}/{settings.repeats}" if settings.repeats > 1 else "")
            + f", {spec.num_labeled} labeled / {len(spec.unlabeled_cases)} unlabeled, fold {spec.fold}")
        records.append(execute_run(spec, settings.device, env, log))
        if test_set is not None:
            predict_test_set(spec, test_set, settings.device, env, log)
        evaluations.append(evaluate_run(spec, settings.hd95, test_set))
    header, rows = result_rows(runs, evaluations, records)
    summary_header, summary_rows = aggregate_rows(header, rows)
    title = f"Few-label protocol: {runs[0].dataset}, {settings.configuration}, fold {settings.fold}" + \
        (f", held-out test cases ({len(test_set.cases)})" if test_set is not None else "")
    files = {"csv": os.path.join(outdir, RESULTS_CSV), "markdown": os.path.join(outdir, RESULTS_MD),
             "png": os.path.join(outdir, RESULTS_PNG), "plan": os.path.join(outdir, PLAN_FILE)}
    write_csv(files["csv"], header, rows)
    write_markdown(files["markdown"], summary_header, summary_rows, title, test=test_set is not None)
    plot_dice(files["png"], summary_header, summary_rows, title)
    return {"runs": runs, "evaluations": evaluations, "records": records, "header": header, "rows": rows,
            "summary_header": summary_header, "summary_rows": summary_rows, "files": files}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_fewlabel",
        description="Few-label protocol: for each number N of labeled cases, train nnUNetTrainerLabeledSubset "
                    "(plain nnU-Net on the N cases) and each semi-supervised trainer and variant (same N labeled cases, "
                    "the fold's other training cases unlabeled) with nnUNetv2_train, --repeats times each, validate "
                    "on the fold's validation cases, and tabulate/plot Dice (and HD95). Re-running resumes and "
                    "reuses runs.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    parser.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("--labeled", type=int, nargs="+", required=True, help="numbers of labeled cases, e.g. 1 2 4")
    parser.add_argument("-tr", "--trainers", nargs="*", default=["nnUNetTrainerMeanTeacher"],
                        help="semi-supervised trainers (default nnUNetTrainerMeanTeacher); the supervised "
                             "baseline nnUNetTrainerLabeledSubset always runs")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold of splits_final.json (default 0)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--epochs", type=int, default=None, help="num_epochs of every run")
    parser.add_argument("--iters", type=int, default=None, help="num_iterations_per_epoch of every run")
    parser.add_argument("--val-iters", type=int, default=None, help="num_val_iterations_per_epoch of every run")
    parser.add_argument("-device", "--device", default="cuda", choices=("cuda", "cpu", "mps"), help="default cuda")
    parser.add_argument("-o", "--outdir", default=None, help="output folder (default ./fewlabel_<dataset>)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the choice of the labeled cases")
    parser.add_argument("--training-seed", type=int, default=None,
                        help="seeded runs: repeat r of every row trains with training_seed S + r, so the rows of one "
                             "repeat start from the same weights and (nnUNet_n_proc_DA=1) see the same labeled "
                             "patches; default: unseeded, as nnU-Net")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV) or None,
                        help=f"settings of the semi-supervised runs (bundled name or YAML path; default "
                             f"${CONFIG_ENV}). ${OVERRIDES_ENV} is ignored: each run gets its own")
    parser.add_argument("--overrides", default="",
                        help="extra 'key=value ...' settings of the semi-supervised runs, e.g. 'ema_decay=0.999'")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("TRAINER", "OVERRIDES"),
                        help="extra settings of one -tr semi-supervised trainer, after --overrides, e.g. --set "
                             "nnUNetTrainerSemiSAM 'sam_checkpoint=/path/sam_med3d_turbo.pth' (repeatable)")
    parser.add_argument("--variant", nargs=3, action="append", default=[], metavar=("NAME", "TRAINER", "OVERRIDES"),
                        help="one more semi-supervised row: TRAINER with --overrides then OVERRIDES (not --set), "
                             "named NAME in the results and its run folders (runs/NAME_N<n>), e.g. --variant "
                             "mt_strong nnUNetTrainerMeanTeacher 'student_view=strong consistency_threshold=0.9' "
                             "(repeatable)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train every run this many times (default 1; nnU-Net on CPU is not seeded, so this "
                             "measures the run-to-run spread); repeat r >= 1 goes to runs/<row>_N<n>_r<r>, the "
                             "markdown table and the plot show mean ± std over the repeats")
    parser.add_argument("--labeled-from", nargs="+", default=(), metavar="CASE",
                        help="draw the labeled cases from these cases only (e.g. one site's), the fold's other "
                             "training cases stay unlabeled; case ids, or the cohorts.json of a shifted-cohort "
                             "dataset (its 'source' list)")
    parser.add_argument("--test", action="store_true",
                        help="score each run's final checkpoint on the raw dataset's held-out imagesTs / labelsTs "
                             "cases (nnUNetv2_predict + nnU-Net's evaluation) instead of the fold's validation "
                             "cases")
    parser.add_argument("--use-unlabeled-folder", action="store_true",
                        help="semi-supervised runs also use the preprocessed imagesUnlabeled cases")
    parser.add_argument("--no-hd95", action="store_true", help="skip the HD95 computation")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: tabulate (and with --test score) the runs of this plan that have "
                             "finished, e.g. while a long protocol is still running or after it was stopped; the "
                             "'runs' column says how many repeats each row has")
    parser.add_argument("--dry-run", action="store_true", help="print the plan of runs and exit")
    args = parser.parse_args(argv)
    settings = ProtocolSettings(
        dataset=args.dataset, configuration=args.configuration, labeled_counts=args.labeled, trainers=args.trainers,
        fold=args.fold, plans_identifier=args.plans, outdir=args.outdir or f"fewlabel_{args.dataset}",
        device=args.device, epochs=args.epochs, iters=args.iters, val_iters=args.val_iters, seed=args.seed,
        config=args.config, ssl_overrides=args.overrides, use_unlabeled_folder=args.use_unlabeled_folder,
        trainer_overrides={t: " ".join(text for name, text in args.set if name == t) for t, _ in args.set},
        hd95=not args.no_hd95, test=args.test, variants=[Variant(*v) for v in args.variant],
        repeats=args.repeats, finished_only=args.finished_only, training_seed=args.training_seed)
    try:
        settings.labeled_from = read_case_pool(args.labeled_from) if args.labeled_from else ()
        if args.dry_run:
            runs = plan_runs(settings)
            check_plan(runs)
            print(json.dumps([asdict(r) for r in runs], indent=2))
            return
        result = run_protocol(settings)
    except (ProtocolError, ConfigError) as e:
        raise SystemExit(f"nnUNetv2_samssl_fewlabel: {e}")
    header, rows = result["summary_header"], result["summary_rows"]
    widths = [max(len(_cell(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(_cell(v).ljust(w) for v, w in zip(row, widths)))
    for kind, path in result["files"].items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
