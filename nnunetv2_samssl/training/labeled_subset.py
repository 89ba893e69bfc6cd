"""Settings and the labeled subset: what every trainer of this package adds to ``nnUNetTrainer``.

:class:`LabeledSubsetMixin` goes before ``nnUNetTrainer`` in a trainer's bases. It

- resolves the trainer's settings once (``trainer_configs/`` + ``nnUNet_samssl_config`` / ``_overrides``; a bare
  ``--c`` resumes with the saved ``samssl_config.yaml``) into :attr:`settings` (frozen objects per component,
  ``config.settings``) and applies the schedule keys to nnU-Net's attributes;
- restricts the fold's training cases to the labeled subset by extending nnU-Net's ``do_split``; the other
  training cases (:attr:`demoted_cases`) are left out by the supervised baseline and used as unlabeled by the
  semi-supervised trainers;
- saves the settings in force as ``samssl_config.yaml`` when training starts;
- skips nnU-Net's final validation when ``final_validation`` is false (``--val`` still runs it);
- with ``training_seed``, seeds the initial weights and every data stream (``seeding.py``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Mapping, Tuple, Type

import torch
import yaml
from torch import distributed as dist

from nnunetv2_samssl.config.schema import CONFIG_ENV, OVERRIDES_ENV, Option, resolve_config, resolve_saved_config
from nnunetv2_samssl.config.settings import LABELED_SUBSET_LAYOUT, Settings, SettingsGroup, options_of
from nnunetv2_samssl.data.splits import choose_labeled_subset
from nnunetv2_samssl.training.nnunet_seam import nnUNetSeam
from nnunetv2_samssl.training.seeding import reseed_loader, seed_everything, stream_seeds

SAVED_CONFIG = "samssl_config.yaml"


def started_for_validation() -> bool:
    """This process is ``nnUNetv2_train ... --val``: nnU-Net tells the trainer about ``--c`` (the plans'
    ``continue_training``) but not about ``--val``, so its command line is read."""
    argv = sys.argv
    return bool(argv) and os.path.basename(argv[0]).startswith("nnUNetv2_train") and "--val" in argv[1:]


class LabeledSubsetMixin(nnUNetSeam):
    """Settings + labeled subset (see the module docstring). Class attributes:

    - ``settings_layout``: ``{component name: settings dataclass}``; the schema is generated from it;
    - ``default_config``: the bundled YAML used when the user chooses none.
    """

    settings_layout: Mapping[str, Type[SettingsGroup]] = LABELED_SUBSET_LAYOUT
    default_config: str = "labeled_subset"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # --c, and nnUNetv2_train --val (which validates the trained model), use the fold's saved settings
        config, self.settings_sources = self._resolve_settings(self.continue_training  # set by nnUNetSeam
                                                               or started_for_validation())
        self.settings = Settings.from_config(self.settings_layout, config)
        for key, value in self.settings.training.to_config().items():
            if value is not None:
                setattr(self, key, value)
        self.labeled_cases: List[str] = []
        self.demoted_cases: List[str] = []  # training cases of the fold outside the labeled subset

    @classmethod
    def config_schema(cls) -> Tuple[Option, ...]:
        return options_of(cls.settings_layout)

    # ------------------------------------------------------------------ settings
    def _resolve_settings(self, continue_training: bool) -> Tuple[Dict[str, Any], List[str]]:
        schema = self.config_schema()
        saved = os.path.join(self.output_folder, SAVED_CONFIG) if self.output_folder else None
        user_chose = bool(os.environ.get(CONFIG_ENV) or os.environ.get(OVERRIDES_ENV))
        if continue_training and saved and os.path.isfile(saved) and not user_chose:
            # resume with exactly the settings of the interrupted run
            cfg, sources, added = resolve_saved_config(schema, self.default_config, saved)
            self._log_added_settings(saved, added)
        else:
            cfg, sources = resolve_config(schema, self.default_config)
            if continue_training and saved and os.path.isfile(saved):
                old, _, added = resolve_saved_config(schema, self.default_config, saved)
                self._log_added_settings(saved, added)
                # a null schedule key keeps nnU-Net's value, which the saved file holds as a number
                schedule = [o.name for o in options_of({"training": self.settings_layout["training"]})]
                keeps = {k for k in schedule if cfg[k] is None and old[k] == getattr(self, k)}
                changed = {k: (old[k], cfg[k]) for k in cfg if old[k] != cfg[k] and k not in keeps}
                if changed:
                    self.print_to_log_file(f"WARNING: resuming with settings that differ from {saved}: "
                                           + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.print_to_log_file(f"samssl settings from: {' + '.join(sources)}")
        return cfg, sources

    def _log_added_settings(self, saved: str, added: Dict[str, Any]) -> None:
        if added:
            self.print_to_log_file(f"{saved} was written by an older version without the settings "
                                   + ", ".join(f"{k}: {v!r}" for k, v in added.items())
                                   + f"; they take these defaults of the bundled config '{self.default_config}'.")

    def effective_config(self) -> Dict[str, Any]:
        """The settings actually in force (schedule values as set on the trainer, e.g. by a subclass)."""
        cfg = self.settings.to_config()
        for key in self.settings.training.to_config():
            cfg[key] = getattr(self, key)
        return cfg

    def save_effective_config(self) -> None:
        if self.local_rank != 0:
            return
        header = (f"# Settings used by {self.__class__.__name__} (sources: {' + '.join(self.settings_sources)}).\n"
                  f"# Reuse with: export {CONFIG_ENV}={os.path.join(self.output_folder, SAVED_CONFIG)}\n")
        path = os.path.join(self.output_folder, SAVED_CONFIG)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(header + yaml.safe_dump(self.effective_config(), sort_keys=False))
        os.replace(tmp, path)

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {**super().checkpoint_extras(), "config": self.effective_config()}

    # ------------------------------------------------------------------ the subset
    def do_split(self):
        """nnU-Net's split of the fold, with the training cases narrowed to the labeled subset. Under DDP rank 0
        splits first: nnU-Net lets every rank write a missing ``splits_final.json``, and a rank reading it while
        another writes it reads an empty file."""
        first = not self.is_ddp or dist.get_rank() == 0
        if not first:
            dist.barrier()  # ... until rank 0 has split (and written the file)
        tr_keys, val_keys = super().do_split()
        if self.is_ddp and first:
            dist.barrier()
        subset = self.settings.labeled_subset
        labeled, demoted = choose_labeled_subset(tr_keys, subset.num_labeled, subset.labeled_cases,
                                                 subset.labeled_subset_seed)
        overlap = set(val_keys) & set(demoted)
        if overlap:
            raise RuntimeError(f"Validation cases {sorted(overlap)[:5]} are also training cases of fold {self.fold}; "
                               f"labeled-subset mode needs disjoint validation cases (check splits_final.json).")
        self.labeled_cases, self.demoted_cases = labeled, demoted
        return labeled, val_keys

    def on_train_start(self):
        super().on_train_start()
        self.save_effective_config()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation of the fold's validation cases, unless ``final_validation`` is false and this is the
        run that trained (``nnUNetv2_train ... --val`` always validates)."""
        if self.skips_final_validation():
            self.print_to_log_file("final_validation is false: nnU-Net's validation of the fold's validation cases "
                                   "is skipped (no validation/ folder); run it with nnUNetv2_train ... --val")
            return
        return super().perform_actual_validation(save_probabilities)

    def skips_final_validation(self) -> bool:
        """True when ``perform_actual_validation`` will skip nnU-Net's validation (``final_validation`` false and
        not started with ``--val``)."""
        return not self.final_validation and not started_for_validation()

    # ------------------------------------------------------------------ seeding
    def initialize(self):
        if self.settings.seeding.training_seed is not None and not self.was_initialized:
            seed_everything(self.settings.seeding.training_seed)  # before nnU-Net builds the network
        super().initialize()

    def stream_seeds(self, stream: str, n: int) -> List[int]:
        """Seeds of one data stream's ``n`` workers on this rank (``training_seed`` set)."""
        return stream_seeds(self.settings.seeding.training_seed, stream, self.local_rank, self.current_epoch, n)

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
        if self.settings.seeding.training_seed is not None:
            reseed_loader(dl_tr, self.stream_seeds("train", getattr(dl_tr, "num_processes", 1)))
            reseed_loader(dl_val, self.stream_seeds("val", getattr(dl_val, "num_processes", 1)))
            seed_everything(self.stream_seeds("main", 1)[0])  # teacher noise, views, prompts, in-process loaders
        return dl_tr, dl_val
