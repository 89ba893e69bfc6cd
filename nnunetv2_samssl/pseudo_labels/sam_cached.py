"""SAM pseudo-labels made on whole cases every k epochs and carried through the augmentation by the loader.

At the start of epochs k, 2k, ... (``sam_cache_refresh_epochs``) every unlabeled case is predicted whole
(nnU-Net's sliding window, no mirroring), SAM labels it once, prompted by that prediction, and the hard maps are
stored (:mod:`nnunetv2_samssl.data.pseudo_label_cache`) and served by the unlabeled dataset as the cases'
segmentation, so nnU-Net's crop, augmentation and deep-supervision downsampling move them with the images.
Differences to the papers' online mode: pseudo-labels are up to k epochs old, hard rather than soft, prompted on
whole cases rather than patches, and absent in the first k epochs; the few batches the loader workers prefetched
before a refresh still carry the previous generation.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunetv2_samssl.config.settings import PseudoLabelLossSettings
from nnunetv2_samssl.data.pseudo_label_cache import PseudoLabelCache, generation_name
from nnunetv2_samssl.pseudo_labels.base import NetworkOutputs, PseudoTargets, SourceContext, StepInfo, UnlabeledBatch
from nnunetv2_samssl.pseudo_labels.sam_online import SamSource, sam_weight
from nnunetv2_samssl.sam.branch import StageTimes
from nnunetv2_samssl.sam.embedding_cache import EmbeddingCache


def _nanmean(values: Sequence[float]) -> float:
    return float(np.nanmean(values)) if len(values) and not np.all(np.isnan(values)) else float("nan")


class CachedSamSource(SamSource):
    """Whole-case SAM pseudo-labels, refreshed every ``refresh_epochs`` epochs.

    Args:
        labeler: the SAM branch (as for the online source).
        loss_settings: weight schedule and which scales the loss uses.
        context: the trainer's services; ``predict_case`` gives whole-case softmax maps.
        refresh_epochs: k.
        diagnostics: score whole-case pseudo-labels of labeled-subset cases against their hidden labels at each
            refresh (logged only).
        needs_teacher: the prompts need the teacher's whole-case map too.
        windows: ``whole`` (SAM's windows on whole slices / tiles of the whole case, embeddings reused between
            refreshes) or ``roi`` (on the predicted object, as online mode); see ``SamPseudoLabeler``.
        embedding_cache_mib: host memory for the reused embeddings (``whole`` only; 0: none kept).
    """

    uses_loader_maps = True

    def __init__(self, labeler, loss_settings: PseudoLabelLossSettings, context: SourceContext, refresh_epochs: int,
                 diagnostics: bool = False, needs_teacher: bool = False, seed: int = 12345, windows: str = "whole",
                 embedding_cache_mib: int = 4096):
        super().__init__(labeler, loss_settings, context, diagnostics, seed)
        self.refresh_epochs = refresh_epochs
        self.needs_teacher = needs_teacher
        self.windows = windows
        # the frozen model's embeddings of the same windows of the same images never change
        self.embeddings = EmbeddingCache(embedding_cache_mib) if windows == "whole" and embedding_cache_mib > 0 \
            else None
        self.stage_times: Optional[StageTimes] = None  # while a refresh runs
        self.stage_seconds: Dict[str, float] = {}  # of the last refresh
        self.cache = PseudoLabelCache(os.path.join(context.output_folder, "sam_pseudo_labels"),
                                      context.space.unknown_label)
        self.dataset = None
        self.demoted: frozenset = frozenset()
        self.generation: Optional[str] = None  # the generation the unlabeled batches carry (None: none yet)
        self._resume_generation: Optional[str] = None  # the generation a loaded checkpoint trained with
        self._stale = False
        self._stats: Dict[str, float] = {}

    # ------------------------------------------------------------------ life cycle
    def attach(self, unlabeled_dataset: Any, demoted_cases: Sequence[str]) -> None:
        """Fresh training: a cache left by an earlier run in this folder is deleted. Resumed training: the
        generation the checkpoint trained with becomes current again, or is rebuilt at once if it is gone."""
        self.dataset, self.demoted = unlabeled_dataset, frozenset(demoted_cases)
        rank0 = self.context.rank == 0
        generation = self._resume_generation
        if generation is not None and self.cache.has_generation(generation):
            if rank0:
                self.cache.activate(generation)
            self.generation = generation
        else:
            if generation is not None:
                self.context.log(f"WARNING: the SAM pseudo-labels this checkpoint trained with ({generation}) are "
                                 f"gone from {self.cache.root}; they are rebuilt now.")
                self._stale = True
            if rank0 and os.path.isdir(self.cache.root):
                shutil.rmtree(self.cache.root)
        self.context.barrier()
        unlabeled_dataset.pseudo_labels = self.cache  # before the loader workers start reading it

    def on_epoch_start(self, epoch: int) -> None:
        if self._stale or (epoch > 0 and epoch % self.refresh_epochs == 0):
            self.refresh(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {"generation": self.generation}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume_generation = state.get("generation")

    def timed_periodic_work(self) -> Tuple[float, int]:
        """Speed benchmarks: seconds of a refresh as nearly every refresh of a training runs it, and the epochs
        it serves. With reused embeddings that is the second refresh (the first also encodes the images; its
        seconds are in the log)."""
        seconds = self.refresh(self.refresh_epochs)
        if self.embeddings is not None:
            seconds = self.refresh(2 * self.refresh_epochs)
        return seconds, self.refresh_epochs

    # ------------------------------------------------------------------ refresh
    @torch.no_grad()
    def refresh(self, epoch: int) -> float:
        """Makes the pseudo-labels of every unlabeled case for ``epoch``; returns seconds.

        Each DDP rank labels its share of the cases; rank 0 publishes the generation once all are written.
        """
        ctx = self.context
        start = time.perf_counter()
        name = generation_name(epoch)
        if ctx.rank == 0:
            self.cache.clear_staging(name)
        ctx.barrier()
        unknown = self.cache.unknown_label
        sam_dice: List[float] = []
        prompt_dice: List[float] = []
        covered: List[float] = []
        stages = self.stage_times = StageTimes()
        if self.labeler is not None:
            self.labeler.stage_times = stages
        if self.embeddings is not None:
            self.embeddings.reset_counts()
        for case in self.dataset.identifiers[ctx.rank::ctx.world_size]:
            with stages("load", ctx.device):
                image = torch.from_numpy(np.asarray(self.dataset.load_image(case)[:], dtype=np.float32))
            labels, valid, prompting = self.label_case(image, case)
            with stages("write", ctx.device):
                stored = torch.where(valid, labels, torch.full_like(labels, unknown))
                self.cache.write_case(name, case, stored.cpu().numpy(), ctx.patch_size)
            covered.append(float(valid.float().mean()))
            if self.diagnostics and case in self.demoted:  # logged only: nothing here reaches a loss or a prompt
                reference = torch.from_numpy(np.asarray(self.dataset.load_hidden_label(case)[:])[0].astype(np.int64))
                scores = self.dice_diagnostics(reference.to(ctx.device)[None], labels[None],
                                               labels[None] if prompting is None else prompting[None])
                sam_dice.append(scores["sam_pseudo_dice"])
                prompt_dice.append(float("nan") if prompting is None else scores["prompt_dice"])
        # the log line and the logged Dice speak for every case, whichever rank made it; the gather is a collective,
        # so every rank has written its share when rank 0 publishes
        shares = ctx.gather((covered, sam_dice, prompt_dice))
        covered, sam_dice, prompt_dice = ([x for share in shares for x in share[i]] for i in range(3))
        if ctx.rank == 0:
            self.cache.publish(name)
        ctx.barrier()
        self.generation = name
        self._stale = False
        seconds = time.perf_counter() - start
        self.stage_times = None
        if self.labeler is not None:
            self.labeler.stage_times = None
        self.stage_seconds = dict(stages.seconds)
        self._stats = {"sam_pseudo_dice": _nanmean(sam_dice), "prompt_dice": _nanmean(prompt_dice)}
        ctx.log(f"SAM pseudo-labels {name}: {len(covered)} unlabeled cases in {seconds:.1f} s, covered fraction "
                f"{_nanmean(covered):.3f}" + (f", Dice vs hidden labels (logged only): SAM "
                                              f"{self._stats['sam_pseudo_dice']:.4f}, prompting prediction "
                                              f"{self._stats['prompt_dice']:.4f}" if sam_dice else ""))
        ctx.log(f"  rank {ctx.rank} stages: {stages.describe()}" + self._describe_embeddings())
        return seconds

    def _describe_embeddings(self) -> str:
        cache = self.embeddings
        if cache is None:
            return ""
        text = f"; embeddings: {cache.hits} reused, {cache.misses} encoded, {cache.bytes / 2 ** 20:.0f} MiB kept"
        if cache.refused:
            text += (f" ({cache.refused} did not fit sam_embedding_cache_mib={cache.budget_bytes // 2 ** 20} and are "
                     f"encoded at every refresh)")
        return text

    def label_case(self, image: torch.Tensor, case: Optional[str] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Pseudo-label map, validity and the prompting prediction's label map (``None`` when nothing prompted
        it), each ``(*shape)``, of a whole preprocessed case ``(C, *shape)``: the student's (and teacher's)
        sliding-window prediction prompts SAM. ``case`` names the image for the embedding cache."""
        ctx = self.context
        with self._stage("predict"):
            student = ctx.predict_case("student", image)
            teacher = ctx.predict_case("teacher", image) if self.needs_teacher else None
        labels, valid = self._label_whole_case(image, student, teacher, case)
        return labels, valid, ctx.space.to_label_map(student[None])[0]

    def _stage(self, name: str):
        times = self.stage_times
        return times(name, self.context.device) if times is not None else contextlib.nullcontext()

    def _label_whole_case(self, image: torch.Tensor, student: torch.Tensor, teacher: Optional[torch.Tensor],
                          case: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM label map and validity ``(*shape)`` of a whole case ``(C, *shape)`` from the probability maps
        ``(channels, *shape)``; region pseudo-labels are stored as the label map nnU-Net paints from them
        (``regions_class_order``). A 2D configuration labels the case's slices (its patch axes) as one batch."""
        slices = self.context.patch_ndim == 2
        as_batch = (lambda t: t.movedim(1, 0)) if slices else (lambda t: t[None])
        cache = self.embeddings if case is not None else None
        pseudo = self.label(as_batch(image.to(self.context.device)), as_batch(student),
                            None if teacher is None else as_batch(teacher), windows=self.windows,
                            embedding_cache=cache, case_key=case)
        labels = self.context.space.to_label_map(pseudo.probabilities)
        if slices:
            return labels, pseudo.valid
        return labels[0], pseudo.valid[0]

    # ------------------------------------------------------------------ per step
    def pseudo_labels(self, batch: UnlabeledBatch, outputs: NetworkOutputs, step: StepInfo
                      ) -> Optional[PseudoTargets]:
        if self.generation is None:
            # before the first refresh: no SAM loss at all (the loader's padding would read as background)
            return None
        space, unknown = self.context.space, self.cache.unknown_label
        maps = batch.loader_maps if self.loss_settings.sam_loss_scales == "all" else batch.loader_maps[:1]
        labels = [m[:, 0].long() for m in maps]
        valid = [(m >= 0) & (m < unknown) for m in labels]
        if space.has_regions:  # the stored label map -> the region masks it paints
            targets = [space.region_masks(m).float() for m in labels]
        else:
            targets = [m.clamp(0, unknown - 1) for m in labels]
        metrics = {"sam_time_s": float("nan"), "sam_valid_fraction": float(valid[0].float().mean()),
                   "sam_pseudo_dice": self._stats.get("sam_pseudo_dice", float("nan")),
                   "prompt_dice": self._stats.get("prompt_dice", float("nan"))}
        return PseudoTargets(targets, valid, sam_weight(self.loss_settings, step), None, metrics)
