"""What every semi-supervised trainer of this package shares, on top of nnU-Net's ``nnUNetTrainer``.

- settings from ``trainer_configs/`` (validated; the config used is saved as ``samssl_config.yaml``),
- the labeled-subset split and the unlabeled batch stream,
- atomic checkpoints with the extra SSL state, resumed from the newest complete one,
- per-epoch SSL metrics in the log and in ``progress.png``.

A concrete trainer sets ``config_schema`` / ``default_config`` / ``log_panels``, builds its extra models in
``initialize`` and writes ``train_step`` with the helpers below.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_samssl.config.schema import (CONFIG_ENV, MEAN_TEACHER_SCHEMA, OVERRIDES_ENV, ConfigError, Option,
                                           resolve_config)
from nnunetv2_samssl.data.splits import choose_labeled_subset
from nnunetv2_samssl.data.unlabeled_dataset import UnlabeledDataset, UnlabeledSource
from nnunetv2_samssl.data.unlabeled_loader import build_unlabeled_loader, split_batch_size
from nnunetv2_samssl.data.unlabeled_preprocessing import (UNLABELED_RAW_FOLDER, UnlabeledDataError,
                                                          check_unlabeled_folder, unlabeled_preprocessed_folder)
from nnunetv2_samssl.ssl.ema import unwrap
from nnunetv2_samssl.training.checkpointing import RESUME_CANDIDATES, atomic_torch_save, newest_checkpoint
from nnunetv2_samssl.training.progress import SSLLocalLogger

SAVED_CONFIG = "samssl_config.yaml"
NNUNET_SETTINGS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr",
                   "save_every")


class nnUNetTrainerSSLBase(nnUNetTrainer):
    """Base of the semi-supervised trainers (not meant to be trained directly)."""

    config_schema: Sequence[Option] = MEAN_TEACHER_SCHEMA
    default_config: str = "mean_teacher"
    log_panels: Dict[str, Sequence[str]] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        continue_training = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ssl_config, self.ssl_config_sources = self._resolve_ssl_config(continue_training)
        for key in NNUNET_SETTINGS:
            if self.ssl_config[key] is not None:
                setattr(self, key, self.ssl_config[key])
        self.logger.local_logger = SSLLocalLogger(self.log_panels)
        self.unlabeled_dataset: Optional[UnlabeledDataset] = None
        self.unlabeled_loader = None
        self.labeled_cases: List[str] = []
        self.demoted_cases: List[str] = []  # training cases used as unlabeled (labeled-subset mode)
        self.unlabeled_batch_size: Optional[int] = None
        self.iteration_in_epoch = 0
        self._ssl_step_logs: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ settings
    def _resolve_ssl_config(self, continue_training: bool) -> Tuple[Dict[str, Any], List[str]]:
        saved = os.path.join(self.output_folder, SAVED_CONFIG) if self.output_folder else None
        user_chose = bool(os.environ.get(CONFIG_ENV) or os.environ.get(OVERRIDES_ENV))
        if continue_training and saved and os.path.isfile(saved) and not user_chose:
            # resume with exactly the settings of the interrupted run
            cfg, sources = resolve_config(self.config_schema, self.default_config, config=saved, overrides={})
        else:
            cfg, sources = resolve_config(self.config_schema, self.default_config)
            if continue_training and saved and os.path.isfile(saved):
                old, _ = resolve_config(self.config_schema, self.default_config, config=saved, overrides={})
                changed = {k: (old[k], cfg[k]) for k in cfg if old[k] != cfg[k]}
                if changed:
                    self.print_to_log_file(f"WARNING: resuming with settings that differ from {saved}: "
                                           + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.print_to_log_file(f"samssl settings from: {' + '.join(sources)}")
        return cfg, sources

    def effective_config(self) -> Dict[str, Any]:
        """The settings actually in force (nnU-Net values as set on the trainer, e.g. by a subclass)."""
        cfg = dict(self.ssl_config)
        for key in NNUNET_SETTINGS:
            cfg[key] = getattr(self, key)
        if "unlabeled_batch_size" in cfg and cfg["unlabeled_batch_size"] is None:
            cfg["unlabeled_batch_size"] = self.configuration_manager.batch_size
        return cfg

    def save_effective_config(self) -> None:
        if self.local_rank != 0:
            return
        header = (f"# Settings used by {self.__class__.__name__} (sources: {' + '.join(self.ssl_config_sources)}).\n"
                  f"# Reuse with: export {CONFIG_ENV}={os.path.join(self.output_folder, SAVED_CONFIG)}\n")
        path = os.path.join(self.output_folder, SAVED_CONFIG)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(header + yaml.safe_dump(self.effective_config(), sort_keys=False))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.label_manager.has_regions:
            raise ConfigError(f"{self.__class__.__name__} does not support region-based training (dataset.json "
                              f"'regions_class_order'); use label-based training.")
        super().initialize()

    def on_train_start(self):
        super().on_train_start()
        self.save_effective_config()
        self.print_to_log_file(
            f"Labeled training cases: {len(self.labeled_cases)}; unlabeled cases: {len(self.unlabeled_dataset.identifiers)}"
            f" ({len(self.demoted_cases)} from labeled-subset mode); unlabeled batch size per rank: "
            f"{self.unlabeled_batch_size}")

    def get_tr_and_val_datasets(self):
        tr_keys, val_keys = self.do_split()
        labeled, demoted = choose_labeled_subset(tr_keys, self.ssl_config["num_labeled"],
                                                 self.ssl_config["labeled_cases"],
                                                 self.ssl_config["labeled_subset_seed"])
        overlap = set(val_keys) & set(demoted)
        if overlap:
            raise RuntimeError(f"Validation cases {sorted(overlap)[:5]} are also training cases of fold {self.fold}; "
                               f"labeled-subset mode needs disjoint validation cases (check splits_final.json).")
        self.labeled_cases, self.demoted_cases = labeled, demoted
        self.unlabeled_dataset = self._build_unlabeled_dataset(demoted)
        if demoted and self.wants_hidden_label_diagnostics():
            self.unlabeled_dataset.hidden_label_cases = frozenset(demoted)
        folder_prev = self.folder_with_segs_from_previous_stage
        dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, labeled,
                                        folder_with_segs_from_previous_stage=folder_prev)
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys,
                                         folder_with_segs_from_previous_stage=folder_prev)
        return dataset_tr, dataset_val

    def _build_unlabeled_dataset(self, demoted: Sequence[str]) -> UnlabeledDataset:
        sources = []
        if demoted:
            sources.append(UnlabeledSource(self.preprocessed_dataset_folder, tuple(demoted)))
        folder_cases = self._unlabeled_folder_cases()
        if folder_cases:
            sources.append(UnlabeledSource(self._unlabeled_folder(), tuple(folder_cases)))
        if not sources:
            raise UnlabeledDataError(
                f"{self.__class__.__name__} needs unlabeled data and found none. Either put unlabeled images in "
                f"nnUNet_raw/{self.plans_manager.dataset_name}/{UNLABELED_RAW_FOLDER}/ and run "
                f"nnUNetv2_samssl_preprocess_unlabeled -d {self.plans_manager.dataset_name} -c "
                f"{self.configuration_name}, or use labeled-subset mode (setting num_labeled or labeled_cases).")
        return UnlabeledDataset(sources)

    def wants_hidden_label_diagnostics(self) -> bool:
        """Whether the unlabeled batches should carry the hidden labels of labeled-subset cases for LOGGING."""
        return False

    def _unlabeled_folder(self) -> str:
        return unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                             self.configuration_manager.data_identifier)

    def _unlabeled_folder_cases(self) -> List[str]:
        from nnunetv2.paths import nnUNet_raw
        mode = self.ssl_config["use_unlabeled_folder"]
        if mode is False:
            return []
        raw = os.path.join(nnUNet_raw, self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        raw_has_folder = raw is not None and os.path.isdir(os.path.join(raw, UNLABELED_RAW_FOLDER))
        out = self._unlabeled_folder()
        if mode == "auto" and not raw_has_folder and not os.path.isdir(out):
            return []
        return check_unlabeled_folder(out, self.plans_manager.plans["configurations"][self.configuration_name],
                                      self.dataset_json, self.plans_manager.dataset_name, self.configuration_name,
                                      self.plans_manager.plans_name, raw_dataset_folder=raw if raw_has_folder else None)

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()  # runs get_tr_and_val_datasets
        self.unlabeled_loader = self._make_unlabeled_loader()
        next(self.unlabeled_loader)  # start the workers now, as nnU-Net does for its loaders
        return dl_tr, dl_val

    def _make_unlabeled_loader(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes,
            dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        global_bs = self.ssl_config["unlabeled_batch_size"] or self.configuration_manager.batch_size
        world = dist.get_world_size() if self.is_ddp else 1
        self.unlabeled_batch_size = split_batch_size(global_bs, world, self.local_rank)
        return build_unlabeled_loader(self.unlabeled_dataset, self.unlabeled_batch_size, initial_patch_size,
                                      self.configuration_manager.patch_size, self.label_manager, transforms,
                                      num_processes=get_allowed_n_proc_DA(), pin_memory=self.device.type == "cuda")

    def on_train_end(self):
        super().on_train_end()
        finish = getattr(self.unlabeled_loader, "_finish", None)
        if finish is not None:
            finish()

    # ------------------------------------------------------------------ training-step helpers
    def next_unlabeled_batch(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The next unlabeled patches ``(b_u, C, *patch)`` on the device, and for diagnostics only the hidden
        full-resolution labels ``(b_u, 1, *patch)`` with -1 for samples without one (``None`` unless
        :meth:`wants_hidden_label_diagnostics`). Never pass the second value to a loss or a prompt."""
        batch = self.unlabeled_loader.__next__()
        images = batch["data"].to(self.device, non_blocking=True)
        hidden = self.unlabeled_dataset.hidden_label_cases
        if not hidden:
            return images, None
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        known = torch.tensor([k in hidden for k in batch["keys"]]).view(-1, *([1] * (target.dim() - 1)))
        return images, torch.where(known, target, torch.full_like(target, -1)).to(self.device, non_blocking=True)

    @property
    def global_step(self) -> int:
        """Optimizer steps done so far (derived, so it is exact after a resume)."""
        return self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def deep_supervision_weights(self) -> Optional[List[float]]:
        """nnU-Net's per-scale loss weights (1/2^i, lowest scale 0, normalised), or None without deep supervision."""
        if not self.enable_deep_supervision:
            return None
        w = np.array([1 / (2 ** i) for i in range(len(self._get_deep_supervision_scales()))])
        w[-1] = 0
        return list(w / w.sum())

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's update (grad scaler on CUDA, clip at 12), then :meth:`after_optimizer_step`."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.after_optimizer_step()
        self.iteration_in_epoch += 1

    def after_optimizer_step(self) -> None:
        """Hook, e.g. the EMA teacher update."""

    # ------------------------------------------------------------------ logging
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.iteration_in_epoch = 0

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for keys in self.log_panels.values():
            for key in keys:
                value = self.epoch_metric(key, outputs)
                self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {np.round(self.logger.get_value(k, step=-1), 5)}"
                                         for keys in self.log_panels.values() for k in keys))

    def epoch_metric(self, key: str, outputs: Mapping[str, Any]) -> float:
        """Mean of a per-iteration value over the epoch (over all DDP ranks); NaN when absent."""
        values = np.asarray(outputs.get(key, [np.nan]), dtype=float).ravel()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    # ------------------------------------------------------------------ checkpoints
    def prediction_weights(self) -> Dict[str, torch.Tensor]:
        """Weights written as ``network_weights`` (what ``nnUNetv2_predict`` loads)."""
        return unwrap(self.network).state_dict()

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        """SSL state to restore on resume (e.g. the teacher)."""
        return {}

    def load_extra_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        pass

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.prediction_weights(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "samssl": {"student_weights": unwrap(self.network).state_dict(), "config": self.effective_config(),
                       **self.extra_checkpoint_state()},
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            checkpoint = filename_or_checkpoint
        else:
            filename = str(filename_or_checkpoint)
            load = lambda p: torch.load(p, map_location=self.device, weights_only=False)  # noqa: E731
            folder = os.path.dirname(os.path.abspath(filename))
            if os.path.basename(filename) in RESUME_CANDIDATES and folder == os.path.abspath(self.output_folder):
                found = newest_checkpoint(folder, load, self.print_to_log_file)
                if found is None:
                    raise RuntimeError(f"No readable checkpoint in {folder}; start a new training without --c.")
                filename, checkpoint = found
            else:
                checkpoint = load(filename)
            self.print_to_log_file(f"Resuming from {filename} (epoch {checkpoint['current_epoch']})")
        samssl = checkpoint.get("samssl", {})
        weights = samssl.get("student_weights", checkpoint["network_weights"])
        weights = {k[7:] if k.startswith("module.") else k: v for k, v in weights.items()}
        unwrap(self.network).load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.load_extra_checkpoint_state(samssl)
