"""SAM pseudo-labels for unlabeled patches, prompted by the segmentation model's own prediction (SemiSAM/SemiSAM+).

Data path of one call::

    unlabeled images (B, C, *patch), student/teacher softmax (B, K, *patch)
      -> prompt source + voxel-wise uncertainty (never a label)
      -> ROI = predicted foreground -> SamSpaceMapper.to_model -> crops (Q, C, *size)   [tiles / slices]
      -> one decoder query per (crop, foreground class present in it)   -> Qp queries
      -> encoder once on the Q crops; decoder batched over the Qp queries
         point: initial SemiSAM points, then one new click per step, previous low-res logits as mask prompt
         mask:  the prediction, downsampled to the decoder's low-res grid, as the dense mask prompt (1 pass)
         unc:   as point, plus U = variance over (student map, SAM map of every click)
         grid:  CPAC-SAM's adaptive grid: positive points on the confident object, negative on the confident
                background (prompts.grid_prompts), one pass
      -> low-res logits -> SamSpaceMapper.to_patch (sigmoid, tiles averaged) -> classes combined
      -> SamPseudoLabel(probabilities (B, K, *patch), valid (B, *patch), uncertainty, stats)

Prompts are drawn in model space, on the student's probabilities resampled into each query's window: that
keeps every prompt inside its crop (tiles, slices) and lets the click loop compare SAM's output with the
segmentation model's prediction on SAM's own grid.

Region-based training (``regions=True``): the channels are independent sigmoid regions (nested or overlapping);
each region is an object with its own query (prompts from ``p_r > 0.5``, uncertainty the largest binary entropy
over regions), and the pseudo-label of region ``r`` is SAM's sigmoid of its query, with no combination step.

Combining classes: each foreground class ``k`` gets an independent SAM probability ``q_k`` (sigmoid of its own
query; 0 where the class was not queried). Overlaps are resolved per voxel by
``p_0 = 1 - max_k q_k`` and ``p_k = max_j q_j * q_k / sum_j q_j``: the foreground mass is the strongest class's
probability (the union), shared among the classes in proportion to their probabilities.

Complexity per call (Q crops, Qp = sum over crops of the classes present, V voxels of the model window,
P patch voxels, n clicks): the encoder runs once on Q crops (the dominant cost, e.g. ~24 ms per 128^3 crop for
SAM-Med3D on an H100); the decoder runs ``n`` times (``point``/``unc``) or once (``mask``) on all Qp queries
together. Resampling is separable matmuls, ``O((Q + Qp) * C * V * max side)``. Each click costs a few
``O(Qp * V)`` tensor operations plus ``max_click_depth`` separable erosions (``O(Qp * V * max_click_depth)``).
Python loops run over clicks, spatial axes and encoder / decoder chunks only, never over samples, classes or voxels;
a handful of host synchronisations per call size the data-dependent query batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunetv2_samssl.config.settings import PROMPT_MODES, SamLabelerSettings
from nnunetv2_samssl.prompts.grid_prompts import adaptive_grid_points
from nnunetv2_samssl.prompts.semisam_points import next_click, semisam_points
from nnunetv2_samssl.prompts.uncertainty import prompt_uncertainty
from nnunetv2_samssl.sam.embedding_cache import EmbeddingCache, window_keys
from nnunetv2_samssl.sam.interface import PromptableModel
from nnunetv2_samssl.sam.space import ModelBatch, SamSpaceMapper, bounding_boxes, downsample_to_scales

Tensor = torch.Tensor

__all__ = ["SamPseudoLabel", "SamPseudoLabeler", "StageTimes", "combine_class_probabilities", "PROMPT_MODES",
           "WINDOWS"]

WINDOWS = ("roi", "whole")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as PyTorch's CPU checks report it
    (asked once per process: the SAM branch checks it at every call)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


class StageTimes:
    """Seconds per stage, summed over calls; CUDA work is synchronised at each stage boundary (use it for
    profiling and whole-case refreshes, not in the training step)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, device: torch.device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())


@dataclass
class SamPseudoLabel:
    """What the SAM branch returns for a batch of unlabeled patches (all detached, float32 / bool).

    Attributes:
        probabilities: ``(B, K, *patch)`` pseudo-label probabilities, summing to 1 over ``K``. Where ``valid``
            is false they are a copy of the prompt-source probabilities, so a loss that forgot the mask would
            degrade to self-consistency rather than to a wrong target.
        valid: ``(B, *patch)`` bool, voxels covered by at least one SAM query.
        uncertainty: ``(B, *patch)`` SemiSAM+ ``unc`` map in ``[0, 0.25]`` (population variance over the
            student's and SAM's per-click probabilities, max over classes; 0 where invalid); ``None`` in the
            other modes.
        stats: ``num_crops`` (windows placed), ``num_encoded`` (windows some query uses: encoded, or found in an
            embedding cache), ``num_queries`` (decoder queries), ``num_decoder_calls``, ``points_per_query``,
            ``valid_fraction``.
        regions: the probabilities are ``(B, R, *patch)`` independent region probabilities.
    """

    probabilities: Tensor
    valid: Tensor
    uncertainty: Optional[Tensor]
    stats: Dict[str, float] = field(default_factory=dict)
    regions: bool = False

    @property
    def hard_label(self) -> Tensor:
        """Hard targets: ``(B, *patch)`` long argmax of :attr:`probabilities`, or ``(B, R, *patch)`` float region
        masks (``p > 0.5``)."""
        return (self.probabilities > 0.5).float() if self.regions else self.probabilities.argmax(1)

    def at_scales(self, scales: Sequence, min_valid_fraction: float = 0.5) -> List[Tuple[Tensor, Tensor]]:
        """``(probabilities, valid)`` at nnU-Net's deep-supervision scales (see :func:`downsample_to_scales`)."""
        return downsample_to_scales(self.probabilities, self.valid, scales, min_valid_fraction)


def combine_class_probabilities(foreground: Tensor) -> Tensor:
    """Independent per-class foreground probabilities ``(B, K-1, *patch)`` -> a distribution ``(B, K, *patch)``.

    ``p_0 = 1 - max_k q_k``; ``p_k = max_j q_j * q_k / sum_j q_j`` (0 for all ``k`` where every ``q`` is 0).
    """
    union = foreground.amax(1, keepdim=True)
    total = foreground.sum(1, keepdim=True)
    has_foreground = total > 1e-12
    share = torch.where(has_foreground, foreground / total.clamp_min(1e-12), torch.zeros_like(foreground))
    background = 1.0 - torch.where(has_foreground, union, torch.zeros_like(union))
    return torch.cat([background, union * share], 1)


class SamPseudoLabeler:
    """Frozen promptable model + space mapper + prediction-driven prompts -> SAM pseudo-labels.

    Args:
        model: the promptable backend; it is frozen (``requires_grad_(False)``, ``eval()``) and must live on the
            device of the tensors passed to :meth:`__call__`.
        settings: :class:`~nnunetv2_samssl.config.settings.SamLabelerSettings` (validated when built; each field
            documents its meaning). In short: ``mode`` (``point``, ``mask``, ``unc``: SemiSAM+); ``num_clicks``
            decoder passes in ``point``/``unc`` mode, the first with the initial SemiSAM points, every later one
            adding exactly one click (all earlier points kept) with the previous low-res logits as mask prompt
            (when the model accepts masks); prompts only where the uncertainty is below ``uncertainty_threshold``;
            ``prompt_kind`` ``auto`` means the model's ``input_space.trained_prompt`` (LiteMedSAM: boxes), else
            points when the model accepts them, else boxes (in ``mask`` mode a box
            goes with the mask prompt for box-only models); ``max_crops`` encodes a random subset of the crops
            (drawn with the call's generator), the voxels of the others stay uncovered (invalid) in this call;
            ``roi_margin`` ``None`` resolves to 0.05 for fixed-spacing (SAM-Med3D) and 0.3 for resized (2D) models.
        **overrides: fields of the settings to replace (``SamPseudoLabeler(model, mode="mask")``).
    """

    def __init__(self, model: PromptableModel, settings: Optional[SamLabelerSettings] = None, **overrides):
        settings = settings if settings is not None else SamLabelerSettings()
        if overrides:
            settings = dataclasses.replace(settings, **overrides)  # validated again by the dataclass
        kinds = set(model.input_space.prompt_kinds)
        if settings.prompt_kind == "auto":
            trained = model.input_space.trained_prompt
            sparse = (trained if trained in kinds else
                      "points" if "points" in kinds else "boxes" if "boxes" in kinds else None)
        else:
            sparse = settings.prompt_kind if settings.prompt_kind in kinds else None
        if settings.mode == "grid":
            if "points" not in kinds:
                raise ValueError(f"mode='grid' needs a model that accepts point prompts; the model accepts "
                                 f"{sorted(kinds)}")
            sparse = "points"
        if settings.mode in ("point", "unc") and sparse is None:
            raise ValueError(f"mode={settings.mode!r} needs a model that accepts point or box prompts (prompt_kind="
                             f"{settings.prompt_kind!r}); the model accepts {sorted(kinds)}")
        if settings.mode == "mask" and "masks" not in kinds:
            if sparse != "boxes":
                raise ValueError(f"mode='mask' needs a model whose input_space.prompt_kinds contains 'masks' "
                                 f"(or 'boxes'); the model accepts {sorted(kinds)}")
            warnings.warn("mode='mask': the model accepts no mask prompts; it is prompted with the box of the "
                          "confident predicted foreground only", stacklevel=2)
        self.settings = settings
        self._warned_emulated_bf16 = False
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.mode = settings.mode
        # mask mode never adds points; it adds a box when boxes were asked for or are all the model takes
        self.sparse_prompt = sparse if settings.mode != "mask" else ("boxes" if sparse == "boxes" else None)
        self.accepts_masks = "masks" in kinds
        roi_margin = settings.resolved_roi_margin(model.input_space.spacing_mm is not None)
        self.mapper_settings = dict(roi_margin=roi_margin, tile_overlap=settings.tile_overlap,
                                    slice_axis=settings.slice_axis, max_zoom=settings.max_zoom)
        self._mappers: Dict[Tuple, SamSpaceMapper] = {}
        self._decoder_calls = 0
        self.stage_times: Optional[StageTimes] = None  # set to time the stages of the next calls

    @classmethod
    def from_settings(cls, model: PromptableModel, settings: SamLabelerSettings) -> "SamPseudoLabeler":
        return cls(model, settings)

    # ------------------------------------------------------------------ helpers
    def mapper(self, patch_spacing: Sequence[float], whole: bool = False) -> SamSpaceMapper:
        """The (cached) mapper for patches of this spacing; ``whole``: windows placed on whole slices / the whole
        case, without a margin (see ``windows`` in :meth:`__call__`)."""
        spacing = tuple(float(s) for s in patch_spacing)
        key = (spacing, whole)
        if key not in self._mappers:
            settings = dict(self.mapper_settings, roi_margin=0.0) if whole else self.mapper_settings
            self._mappers[key] = SamSpaceMapper(self.model.input_space, spacing, **settings)
        return self._mappers[key]

    def _stage(self, name: str, device: torch.device):
        return self.stage_times(name, device) if self.stage_times is not None else contextlib.nullcontext()

    def _autocast(self, device: torch.device):
        cpu_bf16 = device.type == "cpu" and self.settings.cpu_bf16
        if cpu_bf16 and not self._warned_emulated_bf16 and not cpu_has_native_bf16():
            self._warned_emulated_bf16 = True
            warnings.warn("sam_cpu_bf16=true on a CPU without native bf16 (no AVX512-BF16 or AMX, PyTorch reports "
                          f"{torch.backends.cpu.get_cpu_capability()}): bf16 is emulated there and SAM runs many times "
                          "slower than in float32; set sam_cpu_bf16=false", RuntimeWarning, stacklevel=2)
        if cpu_bf16 or (device.type == "cuda" and self.settings.autocast_bf16):
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # chunk sizes on a CPU where the settings leave them open: per image / per query the fastest there (LiteMedSAM
    # on 2 cores: encoder 0.60 s per image alone, 0.99 in batches of 4; decoder 0.034 s per query in chunks of 4,
    # 0.096 in one batch of 64; scripts/bench_lite_medsam.py). Large batches stop fitting the caches.
    CPU_ENCODER_BATCH = 1
    CPU_DECODER_BATCH = 4

    def _chunk_size(self, configured: Optional[int], on_cpu: int, device: torch.device) -> Optional[int]:
        return configured if configured is not None else (on_cpu if device.type == "cpu" else None)

    def _encode(self, images: Tensor) -> Tensor:
        size = self._chunk_size(self.settings.encoder_batch_size, self.CPU_ENCODER_BATCH, images.device)
        with self._autocast(images.device):
            return torch.cat([self.model.encode(self.model.normalize(chunk))
                              for chunk in (images.split(size) if size else (images,))], 0)

    def _decode(self, embeddings: Tensor, points: Optional[Tensor], labels: Optional[Tensor],
                boxes: Optional[Tensor], mask_logits: Optional[Tensor]) -> Tensor:
        """One decoder call per query (counted once in ``num_decoder_calls``), run in chunks of queries."""
        size = self._chunk_size(self.settings.decoder_batch_size, self.CPU_DECODER_BATCH, embeddings.device)
        starts = range(0, embeddings.shape[0], size) if size else (0,)
        size = size or embeddings.shape[0]

        def part(tensor: Optional[Tensor], start: int) -> Optional[Tensor]:
            return None if tensor is None else tensor[start:start + size]
        outputs = []
        with self._autocast(embeddings.device):
            for start in starts:
                low_res, _ = self.model.decode(part(embeddings, start), points=part(points, start),
                                               point_labels=part(labels, start), boxes=part(boxes, start),
                                               mask_logits=part(mask_logits, start))
                outputs.append(low_res.float())
        self._decoder_calls += 1
        return torch.cat(outputs, 0) if len(outputs) > 1 else outputs[0]

    def _box(self, foreground: Tensor, confident: Tensor) -> Tensor:
        """Box ``(Qp, 2 * d)`` (min corner..., max corner...) of the confident foreground (the whole foreground
        where nothing is confident), widened by ``box_margin`` and clipped to the window."""
        core = foreground & confident
        use_core = core.flatten(1).any(1).view(-1, *([1] * (foreground.dim() - 1)))
        lo, hi, _ = bounding_boxes(torch.where(use_core, core, foreground))
        upper = torch.tensor(foreground.shape[1:], device=lo.device) - 1
        lo = (lo - self.settings.box_margin).clamp_min(0)
        hi = torch.minimum(hi + self.settings.box_margin, upper)
        return torch.cat([lo, hi], 1).float()

    def _empty(self, source: Tensor, crops: int, regions: bool) -> "SamPseudoLabel":
        b, patch = source.shape[0], source.shape[2:]
        valid = torch.zeros((b, *patch), dtype=torch.bool, device=source.device)
        uncertainty = torch.zeros((b, *patch), device=source.device) if self.mode == "unc" else None
        stats = dict(num_crops=float(crops), num_encoded=0.0, num_queries=0.0, num_decoder_calls=0.0,
                     points_per_query=0.0, valid_fraction=0.0)
        return SamPseudoLabel(source.clone(), valid, uncertainty, stats, regions)

    # ------------------------------------------------------------------ main entry
    def __call__(self, images: Tensor, student_probs: Tensor, teacher_probs: Optional[Tensor] = None, *,
                 patch_spacing: Sequence[float], generator: Optional[torch.Generator] = None,
                 regions: bool = False, windows: str = "roi", embedding_cache: Optional[EmbeddingCache] = None,
                 case_key: Optional[str] = None) -> SamPseudoLabel:
        """SAM pseudo-labels for a batch of unlabeled patches.

        Args:
            images: ``(B, C, *patch)`` nnU-Net-normalised unlabeled images (2D or 3D patches).
            student_probs: ``(B, K, *patch)`` softmax probabilities of the student (channel 0 background).
            teacher_probs: optional ``(B, K, *patch)`` softmax probabilities of the EMA teacher.
            patch_spacing: voxel spacing (mm) of the patch, tensor axis order (the nnU-Net configuration's).
            generator: makes prompt sampling deterministic.
            regions: the probabilities are ``(B, R, *patch)`` independent sigmoid regions (R >= 1), not a softmax.
            windows: ``roi``: each window is placed on the predicted object plus ``roi_margin`` (the papers);
                ``whole``: on the whole slice (2D models, as LiteMedSAM's and SAM's own longest-side resize) or
                tiles of the whole patch (fixed-spacing models), wherever something is predicted; such windows do
                not depend on the prediction, so their embeddings can be reused (``embedding_cache``).
            embedding_cache: encoder outputs kept between calls on the same images (with ``case_key``).
            case_key: names the images (the case) in ``embedding_cache``.
        Returns:
            :class:`SamPseudoLabel`. No label is read anywhere on this path.
        """
        if windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, got {windows!r}")
        if embedding_cache is not None and (case_key is None or windows != "whole"):
            raise ValueError("embedding_cache needs windows='whole' and a case_key: other windows follow the "
                             "prediction, so their embeddings cannot be reused")
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (B, C, *patch) with a 2D or 3D patch, got {tuple(images.shape)}")
        if student_probs.dim() != images.dim() or student_probs.shape[0] != images.shape[0] \
                or student_probs.shape[2:] != images.shape[2:] or student_probs.shape[1] < (1 if regions else 2):
            raise ValueError(f"student_probs must be (B, K>=2, *patch) softmax (or (B, R>=1, *patch) region) "
                             f"probabilities matching images "
                             f"{tuple(images.shape)}, got {tuple(student_probs.shape)}")
        if teacher_probs is not None and teacher_probs.shape != student_probs.shape:
            raise ValueError(f"teacher_probs {tuple(teacher_probs.shape)} must match student_probs "
                             f"{tuple(student_probs.shape)}")
        if self.settings.prompt_source != "student" and teacher_probs is None:
            raise ValueError(f"prompt_source={self.settings.prompt_source!r} needs teacher_probs")
        with torch.no_grad():
            return self._pseudo_label(images, student_probs, teacher_probs, patch_spacing, generator, regions,
                                      windows, embedding_cache, case_key)

    def _pseudo_label(self, images: Tensor, student_probs: Tensor, teacher_probs: Optional[Tensor],
                      patch_spacing: Sequence[float], generator: Optional[torch.Generator],
                      regions: bool = False, windows: str = "roi", embedding_cache: Optional[EmbeddingCache] = None,
                      case_key: Optional[str] = None) -> SamPseudoLabel:
        self.model.eval()
        self._decoder_calls = 0
        student = student_probs.detach().float()
        teacher = None if teacher_probs is None else teacher_probs.detach().float()
        source = {"student": student, "teacher": teacher,
                  "mean": None if teacher is None else 0.5 * (student + teacher)}[self.settings.prompt_source]
        # (B, *patch); the entropy is the prompt source's, so per-patch and whole-case labelling agree
        uncertainty = prompt_uncertainty(source, self.settings.uncertainty_measure, student, teacher,
                                         regions=regions)
        ndim = source.dim() - 2
        num_objects = source.shape[1] if regions else source.shape[1] - 1  # foreground channels, one query each
        if regions:
            foreground = source > 0.5  # (B, R, *patch)
        else:
            classes = torch.arange(1, num_objects + 1, device=source.device).view(1, -1, *([1] * ndim))
            foreground = source.argmax(1, keepdim=True) == classes  # (B, K-1, *patch)

        device = source.device
        with self._stage("map", device):
            plan = self._plan_queries(images, source, foreground, uncertainty, patch_spacing, generator, regions,
                                      windows == "whole")
        if isinstance(plan, int):  # no query: the number of crops
            return self._empty(source, plan, regions)
        crops, queries, crop_of_query, fg_model, inside, unc_model = plan
        mapper = self.mapper(patch_spacing, whole=windows == "whole")

        # the encoder runs on the crops some query uses (or finds them in the cache)
        used, of_query = crop_of_query.unique(return_inverse=True)
        with self._stage("encode", device):
            if embedding_cache is not None:
                keys = window_keys(case_key, crops.sample_index[used],
                                   None if crops.slice_index is None else crops.slice_index[used],
                                   crops.offset[used], crops.scale[used])
                encoded = embedding_cache.embeddings(keys, lambda index: crops.images[used[index.to(device)]],
                                                     self._encode, device)
            else:
                encoded = self._encode(crops.images[used])
        embeddings = encoded[of_query]
        points_per_query = 0
        variance = None
        with self._stage("decode", device):
            if self.mode == "mask":
                low_res = self._mask_prompt_pass(embeddings, queries, source if regions else source[:, 1:], fg_model,
                                                 unc_model)
            elif self.mode == "grid":
                low_res, points_per_query = self._grid_pass(embeddings, fg_model, unc_model, inside, generator)
            else:
                student_model = queries.patch_to_model(student if regions else student[:, 1:],
                                                       select_channel=True)[:, 0] if self.mode == "unc" else None
                low_res, variance, points_per_query = self._click_loop(embeddings, fg_model, unc_model, inside,
                                                                       student_model, generator)

        with self._stage("to_patch", device):
            return self._to_patch(mapper, low_res, variance, queries, source, crops.num_queries, used.numel(),
                                  points_per_query, regions)

    def _to_patch(self, mapper: SamSpaceMapper, low_res: Tensor, variance: Optional[Tensor], queries: ModelBatch,
                  source: Tensor, num_crops: int, num_encoded: int, points_per_query: int,
                  regions: bool) -> SamPseudoLabel:
        fg_probs, covered = mapper.to_patch(low_res, queries, activation="sigmoid")  # (B, K-1 or R, *patch)
        valid = covered.any(1)
        probabilities = fg_probs if regions else combine_class_probabilities(fg_probs)
        probabilities = torch.where(valid.unsqueeze(1), probabilities, source)
        unc_map = None
        if variance is not None:
            per_class, _ = mapper.to_patch(variance.unsqueeze(1), queries)
            unc_map = per_class.amax(1) * valid
        stats = dict(num_crops=float(num_crops), num_encoded=float(num_encoded),
                     num_queries=float(queries.num_queries), num_decoder_calls=float(self._decoder_calls),
                     points_per_query=float(points_per_query),
                     valid_fraction=float(valid.float().mean()))
        return SamPseudoLabel(probabilities, valid, unc_map, stats, regions)

    def _plan_queries(self, images: Tensor, source: Tensor, foreground: Tensor, uncertainty: Tensor,
                      patch_spacing: Sequence[float], generator: Optional[torch.Generator], regions: bool,
                      whole: bool):
        """Crops (model-space windows), the decoder queries on them (one per crop and object present), and each
        query's predicted object, in-patch mask and uncertainty on the model grid; or the number of crops when no
        query remains."""
        ndim = source.dim() - 2
        num_objects = foreground.shape[1]
        # crops: one per sample (union of the classes) or per sample and class; tiles / slices as needed
        mapper = self.mapper(patch_spacing, whole=whole)
        roi = foreground.any(1, keepdim=True) if self.settings.roi == "union" else foreground
        if whole:  # the whole slice (slice-wise) or patch wherever something is predicted
            sliced = ndim == self.model.input_space.ndim + 1
            spatial = [2 + a for a in range(ndim) if not (sliced and a == self.settings.slice_axis)]
            roi = roi.any(dim=tuple(spatial), keepdim=True).expand_as(roi)
        crops = mapper.to_model(images.detach().float(), roi, keep_empty=False)
        if crops.num_queries == 0:
            return 0
        if self.settings.max_crops is not None and crops.num_queries > self.settings.max_crops:
            draw_on = generator.device if generator is not None else source.device
            subset = torch.randperm(crops.num_queries, generator=generator, device=draw_on)[:self.settings.max_crops]
            crops = crops.select(subset.sort().values.to(source.device))
        if self.settings.roi == "union":
            present = foreground.flatten(2).any(2)  # (B, K-1)
            crop_of_query, channel = present[crops.sample_index].nonzero(as_tuple=True)
        else:
            crop_of_query, channel = torch.arange(crops.num_queries, device=source.device), crops.channel_index
        queries = crops.select(crop_of_query, channel_index=channel, num_channels=num_objects,
                               with_images=False)

        # the prediction in each query's window: foreground of its class = argmax there (margin > 0), of its
        # region = sigmoid above 0.5
        if regions:
            margin = source - 0.5
        else:
            top = source.topk(2, dim=1)
            is_best = torch.arange(num_objects + 1, device=source.device).view(1, -1, *([1] * ndim)) \
                == top.indices[:, :1]
            best_other = torch.where(is_best, top.values[:, 1:2], top.values[:, :1])
            margin = (source - best_other)[:, 1:]
        inside = queries.inside_patch()
        fg_model = (queries.patch_to_model(margin, select_channel=True)[:, 0] > 0) & inside
        keep = fg_model.flatten(1).any(1)
        if not bool(keep.all()):  # a tile or slice without this class: no prompt, no query
            kept = keep.nonzero(as_tuple=True)[0]
            queries, crop_of_query = queries.select(kept, with_images=False), crop_of_query[kept]
            fg_model, inside = fg_model[kept], inside[kept]
        if queries.num_queries == 0:
            return crops.num_queries
        unc_model = queries.patch_to_model(uncertainty.unsqueeze(1), pad_value=1.0)[:, 0]
        return crops, queries, crop_of_query, fg_model, inside, unc_model

    # ------------------------------------------------------------------ prompt modes
    def _mask_prompt_pass(self, embeddings: Tensor, queries: ModelBatch, objects: Tensor, fg_model: Tensor,
                          unc_model: Tensor) -> Tensor:
        """``mask`` mode: one decoder pass with the predicted probability of each query's object (``objects``: the
        foreground channels of the prompt source), area-resampled
        onto the decoder's low-res grid and turned into clamped logits (plus a box for box-only models)."""
        space = self.model.input_space
        mask_logits = None
        if self.accepts_masks:
            low_res_probs = queries.patch_to_model(objects, size=space.low_res_size, select_channel=True)
            eps = self.settings.mask_prompt_eps
            mask_logits = torch.logit(low_res_probs.clamp(eps, 1.0 - eps))
        boxes = self._box(fg_model, unc_model < self.settings.uncertainty_threshold) if self.sparse_prompt == "boxes" \
            else None
        return self._decode(embeddings, None, None, boxes, mask_logits)

    def _grid_pass(self, embeddings: Tensor, fg_model: Tensor, unc_model: Tensor, inside: Tensor,
                   generator: Optional[torch.Generator]) -> Tuple[Tensor, int]:
        """``grid`` mode: CPAC-SAM's adaptive grid (``prompts.grid_prompts``) on the confident predicted object
        (positive points) and the confident background of the window (negative points), one decoder pass."""
        confident = unc_model < self.settings.uncertainty_threshold
        regions = torch.stack([~fg_model & inside & confident, fg_model & confident], 1)  # (Qp, 2, *size)
        prompts = adaptive_grid_points(regions, self.settings.grid_density, generator=generator,
                                       max_points_per_class=self.settings.grid_max_points)
        mask_prompt = None
        if self.model.input_space.first_pass_mask_prompt:
            mask_prompt = embeddings.new_zeros((embeddings.shape[0], 1, *self.model.input_space.low_res_size),
                                               dtype=torch.float32)
        # grid labels are the region index: 0 background (negative), 1 object (positive), -1 padding
        low_res = self._decode(embeddings, prompts.points, prompts.labels, None, mask_prompt)
        return low_res, int(prompts.points.shape[1])

    def _click_loop(self, embeddings: Tensor, fg_model: Tensor, unc_model: Tensor, inside: Tensor,
                    student_model: Optional[Tensor], generator: Optional[torch.Generator]
                    ) -> Tuple[Tensor, Optional[Tensor], int]:
        """``point`` / ``unc`` mode. Returns the last low-res logits ``(Qp, 1, *low_res)``, the ``unc`` variance
        ``(Qp, *size)`` (or ``None``) and the number of points per query at the last step."""
        confident = unc_model < self.settings.uncertainty_threshold
        if self.sparse_prompt == "points":
            points, labels = semisam_points(
                fg_model, unc_model, num_positive=self.settings.num_positive, num_negative=self.settings.num_negative,
                uncertainty_threshold=self.settings.uncertainty_threshold, band_radius=self.settings.negative_band,
                background=~fg_model & inside, region=inside, positive_selection=self.settings.positive_selection,
                max_depth=self.settings.max_click_depth, generator=generator)
            boxes, steps = None, self.settings.num_clicks
        else:  # box-only model: one pass with the box of the confident predicted foreground
            points = labels = None
            boxes, steps = self._box(fg_model, confident), 1

        total = sum_sq = None
        if student_model is not None:
            total, sum_sq = student_model.clone(), student_model.pow(2)
        previous = None
        for step in range(steps):
            if step > 0:
                prompted = self.model.upscale(previous)[:, 0] > 0
                click, click_label = next_click(prompted, fg_model, uncertainty=unc_model,
                                                uncertainty_threshold=self.settings.uncertainty_threshold, region=inside,
                                                max_depth=self.settings.max_click_depth, min_depth=self.settings.min_click_depth,
                                                generator=generator)
                points = torch.cat([points, click], 1)
                labels = torch.cat([labels, click_label], 1)
            mask_prompt = previous if self.accepts_masks else None
            if previous is None and self.model.input_space.first_pass_mask_prompt:
                mask_prompt = embeddings.new_zeros((embeddings.shape[0], 1, *self.model.input_space.low_res_size),
                                                   dtype=torch.float32)
            previous = self._decode(embeddings, points, labels, boxes, mask_prompt)
            if total is not None:
                sam_probs = torch.sigmoid(self.model.upscale(previous)[:, 0].float())
                total += sam_probs
                sum_sq += sam_probs.pow(2)
        variance = None
        if total is not None:
            count = steps + 1
            variance = (sum_sq / count - (total / count).pow(2)).clamp_min(0.0)
        return previous, variance, 0 if points is None else int(points.shape[1])
