"""What every semi-supervised trainer of this package shares, on top of nnU-Net's ``nnUNetTrainer``.

One training step::

    labeled batch (nnU-Net's loader)            unlabeled batch (UnlabeledBatch: own loader, same augmentation)
          \\                                      /            \\
           student: one fused forward over both               teacher_outputs (Mean Teacher: the EMA teacher)
          /                      \\                            /
    nnU-Net's loss          NetworkOutputs(student_u, teacher_u)
                                 |-> consistency_terms (a trainer hook; Mean Teacher's softmax MSE)
                                 |-> for each PseudoLabelSource: PseudoTargets -> weight * PseudoLabelLoss
    loss = sup + terms  -> backward_and_step over the TrainableParts -> after_optimizer_step (EMA update)

A concrete trainer sets ``settings_layout`` / ``default_config`` / ``log_panels``, adds its models to
:attr:`parts` and its sources with :meth:`add_source` in ``initialize``, and overrides
:meth:`teacher_outputs` / :meth:`consistency_terms` where it has them. It never branches on how a source makes
its targets.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.config.settings import MEAN_TEACHER_LAYOUT
from nnunetv2_samssl.data.unlabeled_dataset import UnlabeledDataset, UnlabeledSource
from nnunetv2_samssl.data.unlabeled_loader import build_unlabeled_loader, split_batch_size
from nnunetv2_samssl.data.unlabeled_preprocessing import (UNLABELED_RAW_FOLDER, UnlabeledDataError,
                                                          check_unlabeled_folder, unlabeled_preprocessed_folder)
from nnunetv2_samssl.pseudo_labels.label_space import LabelSpace
from nnunetv2_samssl.pseudo_labels.base import (NetworkOutputs, PseudoLabelSource, SourceContext, StepInfo,
                                                UnlabeledBatch, as_scales)
from nnunetv2_samssl.pseudo_labels.loss import PseudoLabelLoss
from nnunetv2_samssl.training.labeled_subset import LabeledSubsetMixin

Outputs = Union[torch.Tensor, List[torch.Tensor]]


def split_outputs(outputs: Outputs, n_first: int) -> Tuple[Outputs, Outputs]:
    """Splits a network output (or a deep-supervision list) along the batch axis at ``n_first``."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:n_first], outputs[n_first:]
    return [o[:n_first] for o in outputs], [o[n_first:] for o in outputs]


def _all_gather(value: Any) -> List[Any]:
    """The value of every DDP rank, in rank order."""
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class nnUNetTrainerSSLBase(LabeledSubsetMixin, nnUNetTrainer):
    """Base of the semi-supervised trainers (not meant to be trained directly)."""

    settings_layout = MEAN_TEACHER_LAYOUT
    default_config = "mean_teacher"
    log_panels: Dict[str, Sequence[str]] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unlabeled_dataset: Optional[UnlabeledDataset] = None
        self.unlabeled_loader = None
        self.unlabeled_batch_size: Optional[int] = None
        self.iteration_in_epoch = 0
        self.sources: List[PseudoLabelSource] = []
        self.pseudo_label_losses: Dict[str, PseudoLabelLoss] = {}
        # softmax classes, or sigmoid regions (dataset.json 'regions_class_order'): one space for every target
        self.label_space = LabelSpace.from_label_manager(self.label_manager)

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.is_cascaded:
            raise ConfigError(
                f"{self.__class__.__name__} does not train cascade stages ({self.configuration_name} uses the "
                f"predictions of {self.configuration_manager.previous_stage_name} as an input channel, which "
                f"unlabeled cases do not have). Train 3d_fullres (or 3d_lowres, 2d) with it instead; see the "
                f"README, 'Cascade'.")
        super().initialize()

    def finish_initialize(self) -> None:
        """Call at the end of a trainer's ``initialize``: registers the log keys of the trainer and its sources."""
        panels = {title: list(keys) for title, keys in self.log_panels.items()}
        for source in self.sources:
            panels.setdefault(f"{source.name} pseudo-label loss", []).append(f"{source.name}_loss")
            panels.setdefault("SSL weights", []).append(f"{source.name}_weight")
            for title, keys in source.log_panels.items():
                panels.setdefault(title, []).extend(keys)
        self.install_log_panels(panels)

    def source_context(self) -> SourceContext:
        """The trainer's services for pseudo-label sources."""
        ddp = self.is_ddp
        return SourceContext(
            device=self.device, num_classes=self.label_manager.num_segmentation_heads,
            patch_spacing=tuple(self.configuration_manager.spacing),
            patch_size=tuple(self.configuration_manager.patch_size),
            patch_ndim=len(self.configuration_manager.patch_size),
            deep_supervision_scales=self._get_deep_supervision_scales() if self.enable_deep_supervision else None,
            output_folder=self.output_folder, log=self.print_to_log_file, predict_case=self.predict_case,
            rank=dist.get_rank() if ddp else 0, world_size=dist.get_world_size() if ddp else 1,
            barrier=dist.barrier if ddp else (lambda: None), space=self.label_space,
            gather=_all_gather if ddp else (lambda value: [value]))

    def add_source(self, source: PseudoLabelSource, loss_form: str, loss_scales: str,
                   normalization: str = "patch") -> None:
        """Adds a pseudo-label source whose targets enter the loss as ``loss_form`` (``sam_losses`` forms) on the
        full-resolution output (``loss_scales='full_res'``) or every deep-supervision output (``'all'``),
        averaged over the whole patch or the voxels with a target (``normalization``)."""
        if any(s.name == source.name for s in self.sources):
            raise ValueError(f"a pseudo-label source named {source.name!r} exists already")
        weights = self.deep_supervision_weights() if loss_scales == "all" else None
        self.sources.append(source)
        self.pseudo_label_losses[source.name] = PseudoLabelLoss(loss_form, self.label_manager.num_segmentation_heads,
                                                                weights, normalization, self.label_space.has_regions)

    def predict_case(self, which: str, image: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(channels, *shape)`` of the student (or ``"teacher"``) on a whole preprocessed case
        (softmax, or per-region sigmoid)."""
        network = self.parts[which].plain
        others = [self.parts["teacher"].plain] if "teacher" in self.parts else []
        with self.plain_outputs(*others):
            return self.sliding_window_probabilities(network, image)

    # ------------------------------------------------------------------ data
    def get_tr_and_val_datasets(self):
        datasets = super().get_tr_and_val_datasets()  # do_split sets the labeled and demoted cases
        self.unlabeled_dataset = self._build_unlabeled_dataset(self.demoted_cases)
        return datasets

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
        hidden = demoted if self.wants_hidden_labels() else ()
        dataset = UnlabeledDataset(sources, hidden_label_cases=hidden)
        for source in self.sources:
            source.attach(dataset, demoted)
        return dataset

    def wants_hidden_labels(self) -> bool:
        """Whether the hidden labels of labeled-subset cases are loaded, for logged diagnostics only."""
        return any(s.wants_hidden_labels() for s in self.sources)

    def _unlabeled_folder(self) -> str:
        return unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                             self.configuration_manager.data_identifier)

    def _unlabeled_folder_cases(self) -> List[str]:
        from nnunetv2.paths import nnUNet_raw
        mode = self.settings.unlabeled.use_unlabeled_folder
        if mode is False:
            return []
        raw = os.path.join(nnUNet_raw, self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        raw_has_folder = raw is not None and os.path.isdir(os.path.join(raw, UNLABELED_RAW_FOLDER))
        out = self._unlabeled_folder()
        if mode == "auto" and not raw_has_folder and not os.path.isdir(out):
            return []
        return check_unlabeled_folder(out, self.plans_manager.plans,
                                      self.dataset_json, self.plans_manager.dataset_name, self.configuration_name,
                                      self.plans_manager.plans_name, raw_dataset_folder=raw if raw_has_folder else None)

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()  # builds the datasets, the unlabeled one included
        self.unlabeled_loader = self._make_unlabeled_loader()
        next(self.unlabeled_loader)  # start the workers now, as nnU-Net does for its loaders
        return dl_tr, dl_val

    def _make_unlabeled_loader(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.unlabeled_transforms(self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes,
            dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label))
        global_bs = self.settings.unlabeled.unlabeled_batch_size or self.configuration_manager.batch_size
        world = dist.get_world_size() if self.is_ddp else 1
        self.unlabeled_batch_size = split_batch_size(global_bs, world, self.local_rank)
        num_processes = get_allowed_n_proc_DA()
        seeds = None if self.settings.seeding.training_seed is None else self.stream_seeds("unlabeled", num_processes)
        return build_unlabeled_loader(self.unlabeled_dataset, self.unlabeled_batch_size, initial_patch_size,
                                      self.configuration_manager.patch_size, self.label_manager, transforms,
                                      num_processes=num_processes, pin_memory=self.device.type == "cuda",
                                      seeds=seeds)

    def unlabeled_transforms(self, transforms):
        """Hook: the augmentation of the unlabeled stream (nnU-Net's training transforms by default)."""
        return transforms

    def next_unlabeled_batch(self) -> UnlabeledBatch:
        """The next unlabeled batch on the device. Its ``loader_maps`` are filled when a source serves maps
        through the loader; its ``hidden_labels`` (diagnostics only) when a source asked for them."""
        batch = self.unlabeled_loader.__next__()
        images = batch["data"].to(self.device, non_blocking=True)
        maps = [t.to(self.device, non_blocking=True) for t in as_scales(batch["target"])] \
            if any(s.uses_loader_maps for s in self.sources) else None
        hidden = self.unlabeled_dataset.hidden_label_cases
        hidden_labels = None
        if hidden:
            target = as_scales(batch["target"])[0]
            known = torch.tensor([k in hidden for k in batch["keys"]]).view(-1, *([1] * (target.dim() - 1)))
            hidden_labels = torch.where(known, target, torch.full_like(target, -1)).to(self.device, non_blocking=True)
        return UnlabeledBatch(images, list(batch["keys"]), maps, hidden_labels)

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(
            f"Labeled training cases: {len(self.labeled_cases)}; unlabeled cases: {len(self.unlabeled_dataset.identifiers)}"
            f" ({len(self.demoted_cases)} from labeled-subset mode); unlabeled batch size per rank: "
            f"{self.unlabeled_batch_size}")

    def on_train_end(self):
        super().on_train_end()
        finish = getattr(self.unlabeled_loader, "_finish", None)
        if finish is not None:
            finish()

    # ------------------------------------------------------------------ schedule
    @property
    def global_step(self) -> int:
        """Optimizer steps done so far (derived, so it is exact after a resume)."""
        return self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def step_info(self) -> StepInfo:
        return StepInfo(self.global_step, self.total_steps)

    # ------------------------------------------------------------------ one iteration
    def teacher_outputs(self, batch: UnlabeledBatch) -> Optional[Outputs]:
        """Hook: the teacher's outputs on the unlabeled batch (no gradient), or ``None``."""
        return None

    def mix_unlabeled(self, batch: UnlabeledBatch, teacher: Optional[Outputs]
                      ) -> Tuple[UnlabeledBatch, Optional[Outputs]]:
        """Hook, under ``no_grad`` after the teacher predicted the patches as loaded: the unlabeled batch and the
        teacher's outputs as the student and every loss see them. Unchanged by default; Mean Teacher's
        ``student_mix: cutmix`` pastes a box of another patch into each one and mixes the teacher's outputs, the
        loader's maps and the hidden labels with the same boxes."""
        return batch, teacher

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """Hook: what the student sees of the unlabeled patches (the teacher's and the sources' patches by
        default; Mean Teacher's ``student_view: strong`` perturbs their intensities)."""
        return images

    def consistency_terms(self, outputs: NetworkOutputs,
                          masks: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Hook: weighted terms (keys ending in ``_term``) and detached metrics between student and teacher, over
        the voxels of ``masks`` (one ``(b, *scale)`` bool map per deep-supervision scale) when given."""
        return {}

    def unlabeled_diagnostics(self, batch: UnlabeledBatch, outputs: NetworkOutputs) -> Dict[str, float]:
        """Hook: metrics of the step's outputs on the unlabeled patches that may read ``batch.hidden_labels``
        (logged only: they return floats, never a term of the loss)."""
        return {}

    def source_terms(self, source: PseudoLabelSource, batch: UnlabeledBatch, outputs: NetworkOutputs,
                     masks: Optional[List[torch.Tensor]] = None) -> Dict[str, Any]:
        """``{name}_term`` (weight x loss against the source's targets, on its valid voxels within ``masks``)
        and the source's metrics; NaN metrics and no term when the source has no targets this step."""
        targets = source.pseudo_labels(batch, outputs, self.step_info())
        if targets is None:
            return {key: float("nan") for key in [f"{source.name}_loss", f"{source.name}_weight",
                                                  *source.metric_keys()]}
        if masks is not None:
            targets.valid = [v & m for v, m in zip(targets.valid, masks)]
        loss = self.pseudo_label_losses[source.name](outputs.student, targets)
        return {f"{source.name}_term": targets.weight * loss, f"{source.name}_loss": loss.detach(),
                f"{source.name}_weight": targets.weight, **targets.metrics}

    @property
    def learns_unannotated(self) -> bool:
        """``learn_unannotated`` on an ignore-label dataset: unannotated voxels of labeled patches get the
        unlabeled-data terms too."""
        return bool(self.settings.unlabeled.learn_unannotated) and self.label_manager.has_ignore_label

    def unannotated_masks(self, target: Union[torch.Tensor, List[torch.Tensor]], num_unlabeled: int
                          ) -> List[torch.Tensor]:
        """Per deep-supervision scale, ``(b_l + b_u, *scale)`` bool: the ignore-label voxels of the labeled
        patches, then every voxel of the unlabeled ones."""
        masks = []
        for t in as_scales(target):
            labeled = t[:, 0] == self.label_manager.ignore_label
            masks.append(torch.cat((labeled, labeled.new_ones((num_unlabeled, *labeled.shape[1:])))))
        return masks

    def labeled_on_device(self, batch: dict) -> Tuple[torch.Tensor, Union[torch.Tensor, List[torch.Tensor]]]:
        """The labeled batch's images and targets (one per deep-supervision scale) on the training device."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data, target

    def train_step(self, batch: dict) -> dict:
        data, target = self.labeled_on_device(batch)
        unlabeled = self.next_unlabeled_batch()
        b_l = data.shape[0]
        # with learn_unannotated the teacher and the online sources see the labeled patches as well, restricted
        # to their unannotated voxels; sources that serve maps through the loader see the unlabeled patches only
        wide = self.learns_unannotated
        masks = self.unannotated_masks(target, unlabeled.images.shape[0]) if wide else None
        ssl_batch = unlabeled if not wide else UnlabeledBatch(
            torch.cat((data, unlabeled.images)), [f"labeled:{k}" for k in batch["keys"]] + list(unlabeled.keys),
            None, None if unlabeled.hidden_labels is None else torch.cat(
                (unlabeled.hidden_labels.new_full((b_l, *unlabeled.hidden_labels.shape[1:]), -1),
                 unlabeled.hidden_labels)))

        self.parts.zero_grad()
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            with torch.no_grad():
                teacher = self.teacher_outputs(ssl_batch)
                if not wide:  # a trainer that mixes refuses learn_unannotated (labeled voxels keep their places)
                    unlabeled, teacher = self.mix_unlabeled(unlabeled, teacher)
                    ssl_batch = unlabeled
            # one fused student forward over labeled and unlabeled patches (instance norm is per sample,
            # so this equals two separate forwards)
            student = self.network(torch.cat((data, self.student_input(unlabeled.images))))
            student_l, student_u = split_outputs(student, b_l)
            sup = self.loss(student_l, target)
            outputs = NetworkOutputs(student if wide else student_u, teacher, self.label_space)
            terms = self.consistency_terms(outputs, masks)
            with torch.no_grad():
                terms.update(self.unlabeled_diagnostics(ssl_batch, outputs))
            for source in self.sources:
                if wide and source.uses_loader_maps:
                    narrow = NetworkOutputs(student_u, None if teacher is None else split_outputs(teacher, b_l)[1],
                                            self.label_space)
                    terms.update(self.source_terms(source, unlabeled, narrow))
                else:
                    terms.update(self.source_terms(source, ssl_batch, outputs, masks))
            loss = sup + sum(v for k, v in terms.items() if k.endswith("_term"))
        self.backward_and_step(loss)
        self.iteration_in_epoch += 1
        out = {"loss": loss.detach().cpu().numpy(), "sup_loss": sup.detach().cpu().numpy()}
        out.update({k: np.asarray(v.detach().float().cpu() if torch.is_tensor(v) else v, dtype=np.float32)
                    for k, v in terms.items() if not k.endswith("_term")})
        return out

    # ------------------------------------------------------------------ epochs, logging, checkpoints
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.iteration_in_epoch = 0
        for source in self.sources:
            source.on_epoch_start(self.current_epoch)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        panels = self.logger.local_logger.panels
        for keys in panels.values():
            for key in keys:
                self.logger.log(key, self.epoch_metric(key, outputs), self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {np.round(self.logger.get_value(k, step=-1), 5)}"
                                         for keys in panels.values() for k in keys))

    def epoch_metric(self, key: str, outputs: Mapping[str, Any]) -> float:
        """Mean of a per-iteration value over the epoch (over all DDP ranks); NaN when absent."""
        values = np.asarray(outputs.get(key, [np.nan]), dtype=float).ravel()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {**super().checkpoint_extras(), "sources": {s.name: s.state_dict() for s in self.sources}}

    def load_checkpoint_extras(self, state: Mapping[str, Any]) -> None:
        super().load_checkpoint_extras(state)
        saved = state.get("sources", {})
        for source in self.sources:
            source.load_state_dict(saved.get(source.name, {}))

    def timed_periodic_work(self) -> Optional[Tuple[float, int]]:
        """For speed benchmarks: (seconds of the sources' periodic work, training iterations it serves), or
        ``None`` when all their work happens inside the training step."""
        jobs = [j for j in (s.timed_periodic_work() for s in self.sources) if j is not None]
        if not jobs:
            return None
        seconds = sum(s for s, _ in jobs)
        epochs = min(e for _, e in jobs)
        return seconds, epochs * self.num_iterations_per_epoch
