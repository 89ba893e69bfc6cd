"""SemiSAM on nnU-Net: Mean Teacher + a frozen promptable model whose pseudo-labels supervise the student.

  loss = L_sup + lambda_c(t) L_con(student_u, teacher_u) + lambda_s(t) L_sam(student_u, SAM(x_u, prompts(student_u)))

Pieces: everything of :mod:`nnUNetTrainerMeanTeacher`, the promptable backend (``sam.registry``), the SAM
branch (``sam.branch.SamPseudoLabeler``: space mapping, uncertainty-aware prompts, click loop) and the
pseudo-label losses (``ssl.sam_losses``). Prompts come from the student's (or teacher's) prediction only;
the hidden labels of labeled-subset cases feed logged diagnostics at most.
Settings: ``trainer_configs/semisam.yaml``.

``sam_pseudo_labels: cached`` moves SAM out of the training step: at the start of epochs k, 2k, ...
(``sam_cache_refresh_epochs``) every unlabeled case is predicted whole (nnU-Net's sliding window, no
mirroring), SAM labels it once, prompted by that prediction, and the hard maps are stored
(``data.pseudo_label_cache``) and loaded as the unlabeled cases' segmentation, so they pass through the same
crop and augmentation as the images. Differences to the papers' online mode: pseudo-labels are up to k epochs
old, hard rather than soft, prompted on whole cases rather than patches, and absent in the first k epochs;
the few batches the loader workers prefetched before a refresh still carry the previous generation.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import distributed as dist

from nnunetv2_samssl.config.schema import SEMISAM_SCHEMA
from nnunetv2_samssl.data.pseudo_label_cache import PseudoLabelCache, generation_name
from nnunetv2_samssl.ssl.ema import unwrap
from nnunetv2_samssl.ssl.ramps import sigmoid_rampdown
from nnunetv2_samssl.ssl.sam_losses import SamPseudoLabelLoss
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import Outputs, nnUNetTrainerMeanTeacher


def multiclass_dice(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice over classes present in either map; voxels with reference < 0 are ignored.

    Args:
        prediction: ``(B, *spatial)`` integer labels. reference: ``(B, *spatial)`` integer labels (-1 = unknown).
    """
    known = reference >= 0
    dices = []
    for c in range(1, num_classes):
        p, r = (prediction == c) & known, (reference == c) & known
        denominator = p.sum() + r.sum()
        if denominator > 0:
            dices.append(float(2 * (p & r).sum()) / float(denominator))
    return float(sum(dices) / len(dices)) if dices else float("nan")


class nnUNetTrainerSemiSAM(nnUNetTrainerMeanTeacher):
    config_schema = SEMISAM_SCHEMA
    default_config = "semisam"
    log_panels = {"Mean Teacher losses": ["sup_loss", "consistency_loss"],
                  "SAM loss": ["sam_loss"],
                  "SSL weights": ["consistency_weight", "sam_weight"],
                  "Dice vs hidden labels (logged only)": ["sam_pseudo_dice", "prompt_dice"],
                  "SAM branch": ["sam_time_s", "sam_valid_fraction"]}

    def initialize(self):
        super().initialize()
        from nnunetv2_samssl.sam.branch import SamPseudoLabeler
        from nnunetv2_samssl.sam.registry import build_promptable_model
        cfg = self.ssl_config
        backend_kwargs = {"random_init": cfg["sam_random_init"]}
        if cfg["sam_backend"].startswith("sam_med3d"):
            backend_kwargs["allow_pickle"] = cfg["sam_checkpoint_allow_pickle"]
        self.sam_model = build_promptable_model(cfg["sam_backend"], cfg["sam_checkpoint"], self.device,
                                                **backend_kwargs)
        roi_margin = cfg["sam_roi_margin"]
        if roi_margin is None:
            roi_margin = 0.05 if self.sam_model.input_space.spacing_mm is not None else 0.3
        prompt_kind = cfg["sam_prompt_kind"]
        if prompt_kind == "auto" and cfg["sam_backend"] == "litemedsam":
            prompt_kind = "boxes"
        self.sam_labeler = SamPseudoLabeler(
            self.sam_model, cfg["sam_prompt_mode"], num_clicks=cfg["sam_num_clicks"],
            num_positive=cfg["sam_num_positive"], num_negative=cfg["sam_num_negative"],
            uncertainty_threshold=cfg["sam_uncertainty_threshold"],
            uncertainty_measure=cfg["sam_uncertainty_measure"], prompt_source=cfg["sam_prompt_source"],
            prompt_kind=prompt_kind, slice_axis=cfg["sam_slice_axis"], max_crops=cfg["sam_max_crops"],
            roi_margin=roi_margin, box_margin=cfg["sam_box_margin"])
        scale_weights = self.deep_supervision_weights() if cfg["sam_loss_scales"] == "all" else None
        self.sam_loss = SamPseudoLabelLoss(cfg["sam_loss"], scale_weights)
        self.sam_generator = torch.Generator(device=self.device).manual_seed(12345 + self.local_rank)
        self.sam_cache = PseudoLabelCache(os.path.join(self.output_folder, "sam_pseudo_labels"),
                                          self.label_manager.num_segmentation_heads) if self.sam_cached else None
        self._sam_resume_generation: Optional[str] = None  # the generation a loaded checkpoint trained with
        self._sam_generation: Optional[str] = None  # the generation the unlabeled batches carry (None: none yet)
        self._sam_cache_stale = False
        self._sam_cache_stats: Dict[str, float] = {}
        self._sam_predictors: Dict[str, Any] = {}
        self._unlabeled_targets = None

    @property
    def sam_cached(self) -> bool:
        return self.ssl_config["sam_pseudo_labels"] == "cached"

    def wants_hidden_label_diagnostics(self) -> bool:
        # cached mode scores whole cases at each refresh instead (see refresh_sam_pseudo_labels)
        return self.ssl_config["sam_diagnostics"] in ("auto", True) and not self.sam_cached

    # ------------------------------------------------------------------ schedule
    def sam_weight(self) -> float:
        """lambda_s(t): strong SAM guidance early, vanishing late."""
        w, t, total = self.ssl_config["sam_weight"], self.global_step, self.total_steps
        if self.ssl_config["sam_weight_schedule"] == "exp_decay":
            return w * math.exp(-5.0 * t / max(total, 1))
        return w * sigmoid_rampdown(t, total, self.ssl_config["sam_rampdown"] * total)

    def runs_sam_now(self) -> bool:
        return self.global_step % self.ssl_config["sam_every"] == 0

    # ------------------------------------------------------------------ cached pseudo-labels
    def _build_unlabeled_dataset(self, demoted: Sequence[str]):
        dataset = super()._build_unlabeled_dataset(demoted)
        if self.sam_cached:
            self._prepare_sam_cache()  # before the loader workers start reading it
            dataset.pseudo_labels = self.sam_cache
        return dataset

    def _prepare_sam_cache(self) -> None:
        """Fresh training: a cache left by an earlier run in this folder is deleted. Resumed training: the
        generation the checkpoint trained with becomes current again, or is rebuilt at once if it is gone."""
        rank0 = not self.is_ddp or dist.get_rank() == 0
        generation = self._sam_resume_generation
        if generation is not None and self.sam_cache.has_generation(generation):
            if rank0:
                self.sam_cache.activate(generation)
            self._sam_generation = generation
        else:
            if generation is not None:
                self.print_to_log_file(f"WARNING: the SAM pseudo-labels this checkpoint trained with "
                                       f"({generation}) are gone from {self.sam_cache.root}; they are rebuilt now.")
                self._sam_cache_stale = True
            if rank0 and os.path.isdir(self.sam_cache.root):
                import shutil
                shutil.rmtree(self.sam_cache.root)
        if self.is_ddp:
            dist.barrier()

    def _sam_refresh_due(self, epoch: int) -> bool:
        k = self.ssl_config["sam_cache_refresh_epochs"]
        return epoch > 0 and epoch % k == 0

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.sam_cached and (self._sam_cache_stale or self._sam_refresh_due(self.current_epoch)):
            self.refresh_sam_pseudo_labels()

    @contextlib.contextmanager
    def _plain_outputs(self) -> Iterator[None]:
        """Student and teacher return full-resolution logits only (no deep-supervision list) inside."""
        self.set_deep_supervision_enabled(False)
        self.teacher.module.decoder.deep_supervision = False
        try:
            yield
        finally:
            self.set_deep_supervision_enabled(self.enable_deep_supervision)
            self.teacher.module.decoder.deep_supervision = self.enable_deep_supervision

    def _sliding_window_probabilities(self, which: str, image: torch.Tensor) -> torch.Tensor:
        """Softmax ``(K, *shape)`` of the student or teacher on a whole case (nnU-Net's sliding window, no
        mirroring), on the training device."""
        predictor = self._sam_predictors.get(which)
        if predictor is None:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                        perform_everything_on_device=self.device.type == "cuda", device=self.device, verbose=False,
                                        allow_tqdm=False)
            network = unwrap(self.network) if which == "student" else self.teacher.module
            predictor.manual_initialization(network, self.plans_manager, self.configuration_manager, None,
                                            self.dataset_json, self.__class__.__name__, None)
            self._sam_predictors[which] = predictor
        logits = predictor.predict_sliding_window_return_logits(image)
        return torch.softmax(logits.to(self.device).float(), 0)

    def _needs_teacher_probabilities(self) -> bool:
        cfg = self.ssl_config
        return cfg["sam_prompt_source"] != "student" or cfg["sam_uncertainty_measure"] != "entropy"

    @torch.no_grad()
    def refresh_sam_pseudo_labels(self) -> float:
        """Makes the SAM pseudo-labels of every unlabeled case for this epoch (cached mode); returns seconds.

        Each DDP rank labels its share of the cases; rank 0 publishes the generation once all are written.
        Demoted labeled-subset cases are also scored against their hidden labels, for the log only.
        """
        start = time.perf_counter()
        name = generation_name(self.current_epoch)
        world, rank = (dist.get_world_size(), dist.get_rank()) if self.is_ddp else (1, 0)
        if rank == 0:
            self.sam_cache.clear_staging(name)
        if self.is_ddp:
            dist.barrier()
        dataset = self.unlabeled_dataset
        diagnose = self.ssl_config["sam_diagnostics"] in ("auto", True) and bool(self.demoted_cases)
        demoted = set(self.demoted_cases)
        k = self.label_manager.num_segmentation_heads
        sam_dice: List[float] = []
        prompt_dice: List[float] = []
        valid_fraction: List[float] = []
        student_was_training = unwrap(self.network).training
        try:
            with self._plain_outputs():
                for case in dataset.identifiers[rank::world]:
                    image = torch.from_numpy(np.asarray(dataset.load_image(case)[:], dtype=np.float32))
                    student = self._sliding_window_probabilities("student", image)
                    teacher = self._sliding_window_probabilities("teacher", image) \
                        if self._needs_teacher_probabilities() else None
                    hard, valid = self._label_whole_case(image, student, teacher)
                    stored = torch.where(valid, hard, torch.full_like(hard, k))
                    self.sam_cache.write_case(name, case, stored.cpu().numpy(), self.configuration_manager.patch_size)
                    valid_fraction.append(float(valid.float().mean()))
                    if diagnose and case in demoted:  # logged only: nothing here reaches a loss or a prompt
                        reference = torch.from_numpy(np.asarray(dataset.load_hidden_label(case)[:])[0].astype(np.int64))
                        reference = reference.to(self.device)[None]
                        sam_dice.append(multiclass_dice(hard[None], reference, k))
                        prompt_dice.append(multiclass_dice(student.argmax(0)[None], reference, k))
        finally:
            if student_was_training:
                unwrap(self.network).train()
        if self.is_ddp:
            dist.barrier()
        if rank == 0:
            self.sam_cache.publish(name)
        if self.is_ddp:
            dist.barrier()
        self._sam_generation = name
        self._sam_cache_stale = False
        seconds = time.perf_counter() - start
        nanmean = lambda v: float(np.nanmean(v)) if v and not np.all(np.isnan(v)) else float("nan")  # noqa: E731
        self._sam_cache_stats = {"sam_pseudo_dice": nanmean(sam_dice), "prompt_dice": nanmean(prompt_dice)}
        self.print_to_log_file(
            f"SAM pseudo-labels {name}: {len(valid_fraction)} unlabeled cases in {seconds:.1f} s, covered fraction "
            f"{nanmean(valid_fraction):.3f}" + (f", Dice vs hidden labels (logged only): SAM "
                                               f"{self._sam_cache_stats['sam_pseudo_dice']:.4f}, prompting prediction "
                                               f"{self._sam_cache_stats['prompt_dice']:.4f}" if sam_dice else ""))
        return seconds

    def _label_whole_case(self, image: torch.Tensor, student: torch.Tensor,
                          teacher: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM hard labels and validity ``(*shape)`` of a whole case ``(C, *shape)`` from the softmax maps
        ``(K, *shape)``. A 2D configuration labels the case's slices (its patch axes) as one batch."""
        as_batch = (lambda t: t.movedim(1, 0)) if len(self.configuration_manager.patch_size) == 2 \
            else (lambda t: t[None])
        pseudo = self.sam_labeler(as_batch(image.to(self.device)), as_batch(student),
                                  None if teacher is None else as_batch(teacher),
                                  patch_spacing=self.configuration_manager.spacing, generator=self.sam_generator)
        if len(self.configuration_manager.patch_size) == 2:
            return pseudo.hard_label, pseudo.valid
        return pseudo.hard_label[0], pseudo.valid[0]

    def timed_periodic_sam_work(self) -> Optional[Tuple[float, int]]:
        """For speed benchmarks: (seconds of one pseudo-label refresh, training iterations it serves), or None
        in online mode (the SAM branch then runs inside the training step)."""
        if not self.sam_cached:
            return None
        seconds = self.refresh_sam_pseudo_labels()
        return seconds, self.ssl_config["sam_cache_refresh_epochs"] * self.num_iterations_per_epoch

    def next_unlabeled_batch(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.sam_cached:
            return super().next_unlabeled_batch()
        batch = self.unlabeled_loader.__next__()
        target = batch["target"]  # the cached pseudo-labels, augmented with the images
        self._unlabeled_targets = [t.to(self.device, non_blocking=True) for t in target] \
            if isinstance(target, list) else target.to(self.device, non_blocking=True)
        return batch["data"].to(self.device, non_blocking=True), None

    def _cached_pseudo_label(self, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cached label maps ``(B, 1, *s)`` -> one-hot probabilities ``(B, K, *s)`` and validity ``(B, *s)``."""
        k = self.label_manager.num_segmentation_heads
        labels = labels[:, 0].long()
        valid = (labels >= 0) & (labels < k)
        probabilities = F.one_hot(labels.clamp(0, k - 1), k).movedim(-1, 1).float()
        return probabilities, valid

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        state = super().extra_checkpoint_state()
        if self.sam_cached:
            state["sam_cache_generation"] = self._sam_generation
        return state

    def load_extra_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        if self.sam_cached:
            self._sam_resume_generation = state.get("sam_cache_generation")

    # ------------------------------------------------------------------ one iteration
    def ssl_losses(self, x_u: torch.Tensor, student_u: Outputs, teacher_u: Outputs,
                   hidden_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        terms = super().ssl_losses(x_u, student_u, teacher_u, hidden_labels)
        if self.sam_cached:
            return self._cached_sam_losses(terms, student_u)
        if not self.runs_sam_now():
            return self._without_sam(terms)
        full_res = lambda o: o[0] if isinstance(o, (list, tuple)) else o  # noqa: E731
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        student_probs = torch.softmax(full_res(student_u).detach().float(), 1)
        teacher_probs = torch.softmax(full_res(teacher_u).float(), 1)
        pseudo = self.sam_labeler(x_u, student_probs, teacher_probs,
                                  patch_spacing=self.configuration_manager.spacing, generator=self.sam_generator)
        if isinstance(student_u, (list, tuple)) and self.ssl_config["sam_loss_scales"] == "all":
            scaled = pseudo.at_scales(self._get_deep_supervision_scales())
            sam_loss = self.sam_loss(list(student_u), [p for p, _ in scaled], [v for _, v in scaled])
        else:
            sam_loss = self.sam_loss(full_res(student_u), pseudo.probabilities, pseudo.valid, pseudo.uncertainty)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        w = self.sam_weight()
        terms.update(sam_term=w * sam_loss, sam_loss=sam_loss.detach(), sam_weight=torch.tensor(w),
                     sam_time_s=torch.tensor(time.perf_counter() - start),
                     sam_valid_fraction=pseudo.valid.float().mean())
        if hidden_labels is not None:  # diagnostics only: nothing below reaches a loss
            reference = hidden_labels[:, 0].long()
            k = student_probs.shape[1]
            terms["sam_pseudo_dice"] = torch.tensor(multiclass_dice(pseudo.hard_label, reference, k))
            terms["prompt_dice"] = torch.tensor(multiclass_dice(student_probs.argmax(1), reference, k))
        else:
            nan = torch.tensor(float("nan"))
            terms.update(sam_pseudo_dice=nan, prompt_dice=nan)
        return terms

    @staticmethod
    def _without_sam(terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The SAM metrics of a step without SAM loss (NaN: not averaged into the epoch's log)."""
        nan = torch.tensor(float("nan"))
        terms.update(sam_loss=nan, sam_weight=nan, sam_time_s=nan, sam_valid_fraction=nan, sam_pseudo_dice=nan,
                     prompt_dice=nan)
        return terms

    def _cached_sam_losses(self, terms: Dict[str, torch.Tensor], student_u: Outputs) -> Dict[str, torch.Tensor]:
        if self._sam_generation is None:
            # before the first refresh: no SAM loss at all (the loader's padding would read as background)
            return self._without_sam(terms)
        nan = torch.tensor(float("nan"))
        targets = self._unlabeled_targets
        if isinstance(student_u, (list, tuple)) and self.ssl_config["sam_loss_scales"] == "all":
            pairs = [self._cached_pseudo_label(t) for t in targets]
            sam_loss = self.sam_loss(list(student_u), [p for p, _ in pairs], [v for _, v in pairs])
            valid = pairs[0][1]
        else:
            full = targets[0] if isinstance(targets, (list, tuple)) else targets
            probabilities, valid = self._cached_pseudo_label(full)
            output = student_u[0] if isinstance(student_u, (list, tuple)) else student_u
            sam_loss = self.sam_loss(output, probabilities, valid, None)
        w = self.sam_weight()
        stat = lambda key: torch.tensor(self._sam_cache_stats.get(key, float("nan")))  # noqa: E731
        terms.update(sam_term=w * sam_loss, sam_loss=sam_loss.detach(), sam_weight=torch.tensor(w),
                     sam_time_s=nan, sam_valid_fraction=valid.float().mean(),
                     sam_pseudo_dice=stat("sam_pseudo_dice"), prompt_dice=stat("prompt_dice"))
        return terms
