"""Prototype-guided grid point prompts with adaptive intervals (CPAC-SAM), for 2D and 3D, several classes.

CPAC-SAM prompts a promptable model with a *regular grid* of points laid over each predicted class region,
instead of a handful of random clicks, and only where the prediction can be trusted.

Adaptive interval
-----------------
For class ``k`` of sample ``n`` with ``A`` voxels in its region, the grid spacing is

    ``interval = max(floor(A ** (1 / d) / s), 1)``

with ``d`` the number of spatial dimensions (square root in 2D, cube root in 3D, so the density ``s`` is
"points per axis": a square / cube region gets about ``s`` points along each side). The floor is computed
exactly: the largest integer ``m`` with ``(m s) ** d <= A`` (a float estimate corrected by one step either
way), so exact powers such as ``4096 ** (1/3) = 16`` are not lost to rounding.

The grid is anchored at the low corner ``lo`` of the region's inclusive bounding box ``[lo, hi]``: voxel
``v`` is on the grid when ``lo <= v <= hi`` and ``(v - lo) % interval == 0`` on every axis. Along an axis
where the box is thinner than two intervals (``hi - lo + 1 < 2 interval``: thin or elongated structures),
the box is first widened by one interval on both sides (clipped to the image), so that the grid still
crosses the structure. Grid voxels outside the region are dropped. A non-empty region that the grid misses
entirely gets one voxel drawn uniformly from the region (the *fallback*). Absent classes get no points.
Background (class 0) is a class like any other: it is prompted on its own grid.

Prototypes
----------
:class:`ClassPrototypes` keeps one exponential-moving-average prototype per class: the weighted mean of
L2-normalised feature vectors of the voxels of that class. A voxel's *prototype class* is the class whose
prototype is most cosine-similar to its feature. :func:`reliable_region` keeps the voxels where the
prototype class agrees with the predicted class; :func:`prompts_from_prediction` grids only those.

Conventions: masks are ``(N, K, *spatial)`` bool, label maps ``(N, *spatial)`` long, ``spatial`` being
``(H, W)`` or ``(D, H, W)``. Point coordinates are voxel indices in tensor axis order (what ``torch.argwhere``
returns), as float ``(N, P, d)``; point labels are class ids, ``-1`` for padding (coordinates 0).

Cost: ``V`` voxels per image. The grid is built from per-axis "on the grid" masks ``(N, K, L_axis)``
combined by an outer AND and intersected with the masks: ``O(N K V)`` time and memory (bool), the same as the
one-hot masks themselves. Packing is one ``nonzero`` plus a cumulative sum; the fallback and the per-class
cap draw noise only for the ``(sample, class)`` rows that need it (``O(V)`` each, a ``topk`` / ``argmax``).
Prototype updates and nearest-prototype lookups are single ``einsum`` contractions, ``O(N K C V)``. No
per-sample, per-class or per-voxel Python loop; everything runs on the tensors' device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = ["GridPrompts", "ClassPrototypes", "class_masks", "adaptive_grid_points", "adaptive_intervals",
           "two_density_prompts", "reliable_region", "prompts_from_prediction"]


# ----------------------------------------------------------------------------------------------------------------
# masks and the adaptive interval
# ----------------------------------------------------------------------------------------------------------------
def class_masks(labels: Tensor, num_classes: int, region: Optional[Tensor] = None) -> Tensor:
    """One-hot masks of a label map.

    Args:
        labels: ``(N, *spatial)`` integer class ids; values outside ``[0, num_classes)`` (``-1``, an ignore
            label) belong to no class.
        num_classes: ``K``, background included.
        region: optional ``(N, *spatial)`` bool; voxels outside it belong to no class.
    Returns:
        ``(N, K, *spatial)`` bool.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    classes = torch.arange(num_classes, device=labels.device).view((1, -1) + (1,) * (labels.dim() - 1))
    masks = labels.long().unsqueeze(1) == classes
    if region is not None:
        if region.shape != labels.shape:
            raise ValueError(f"region {tuple(region.shape)} must have the shape of labels {tuple(labels.shape)}")
        masks = masks & region.bool().unsqueeze(1)
    return masks


def adaptive_intervals(counts: Tensor, density: float, ndim: int) -> Tensor:
    """Grid spacing ``max(floor(counts ** (1/ndim) / density), 1)`` per region, 0 where ``counts == 0``.

    Args:
        counts: integer tensor of region sizes (any shape), e.g. ``(N, K)``.
        density: ``s > 0``, the number of grid points per axis of a cube-shaped region.
        ndim: number of spatial dimensions ``d``.
    Returns:
        long tensor shaped like ``counts``.
    """
    if not density > 0:
        raise ValueError(f"density must be > 0, got {density}")
    area = counts.to(torch.float64)
    s = float(density)
    m = torch.floor(area.pow(1.0 / ndim) / s)
    # exact floor: the largest m with (m s)^d <= A; the float estimate is off by at most one
    m = torch.where((m * s).pow(ndim) > area, m - 1, m)
    m = torch.where(((m + 1) * s).pow(ndim) <= area, m + 1, m)
    interval = m.clamp_min(1).long()
    return torch.where(counts > 0, interval, torch.zeros_like(interval))


def _axis_projections(masks: Tensor) -> List[Tensor]:
    """Per spatial axis, whether any voxel of the region lies in each slice: ``(N, K, L_axis)`` bool."""
    ndim = masks.dim() - 2
    projections = []
    for axis in range(ndim):
        other = tuple(2 + i for i in range(ndim) if i != axis)
        projections.append(masks.any(dim=other) if other else masks)
    return projections


def _uniform(shape: Tuple[int, ...], device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """Uniform ``[0, 1)`` noise; drawn on the generator's device (so a seed means the same draw), then moved."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


# ----------------------------------------------------------------------------------------------------------------
# grid prompts
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GridPrompts:
    """Grid point prompts for a batch of images.

    Attributes:
        points: ``(N, P, d)`` float32 voxel coordinates in tensor axis order; padding rows are 0.
        labels: ``(N, P)`` long class id of each point (background 0 included), ``-1`` for padding. Points
            are ordered by class, then in raster order (the fallback point takes its class's place).
        intervals: ``(N, K)`` long grid spacing used per sample and class, 0 for an absent class.
        fallback: ``(N, K)`` bool, the class got the single random voxel because its grid missed it.
    """

    points: Tensor
    labels: Tensor
    intervals: Tensor
    fallback: Tensor

    def num_points(self) -> Tensor:
        """``(N,)`` long number of real (non-padding) points per sample."""
        return (self.labels >= 0).sum(1)


def _grid_masks(masks: Tensor, intervals: Tensor) -> Tensor:
    """Region voxels on the (box-anchored, widened when thin) grid of each class: ``(N, K, *spatial)`` bool."""
    spatial = masks.shape[2:]
    ndim = len(spatial)
    present = intervals > 0
    step = intervals.clamp_min(1)
    grid = None
    for axis, projection in enumerate(_axis_projections(masks)):
        length = spatial[axis]
        index = torch.arange(length, device=masks.device)
        lo = torch.where(projection, index, length).amin(-1)
        hi = torch.where(projection, index, -1).amax(-1)
        thin = present & (hi - lo + 1 < 2 * intervals)
        lo = torch.where(thin, (lo - intervals).clamp_min(0), lo)
        hi = torch.where(thin, (hi + intervals).clamp_max(length - 1), hi)
        offset = index.view(1, 1, -1) - lo.unsqueeze(-1)
        on = (offset >= 0) & (index.view(1, 1, -1) <= hi.unsqueeze(-1)) & (offset % step.unsqueeze(-1) == 0)
        on = on & present.unsqueeze(-1)
        shape = list(on.shape[:2]) + [1] * ndim
        shape[2 + axis] = length
        on = on.view(shape)
        grid = on if grid is None else grid & on
    return grid & masks


def _random_voxel_rows(rows: Tensor, count: int, generator: Optional[torch.Generator]) -> Tensor:
    """Keep ``min(count, row size)`` voxels of each row, a uniformly random subset.

    Args:
        rows: ``(R, V)`` bool, the candidate voxels of each row.
    Returns:
        ``(R, V)`` bool subset of ``rows``.
    """
    noise = _uniform(tuple(rows.shape), rows.device, generator)
    score = torch.where(rows, noise, torch.full_like(noise, -1.0))
    values, index = score.topk(min(count, rows.shape[1]), dim=1)
    kept = torch.zeros_like(rows)
    kept.scatter_(1, index, values >= 0)
    return kept


def adaptive_grid_points(masks: Tensor, density: float, *, generator: Optional[torch.Generator] = None,
                         max_points_per_class: Optional[int] = None) -> GridPrompts:
    """CPAC-SAM's adaptive-interval grid points for every class region of every sample.

    Args:
        masks: ``(N, K, *spatial)`` bool sampling region of each class (2D or 3D spatial; class 0 is
            background and is treated like any class).
        density: ``s > 0``, grid points per axis (``interval = max(floor(A ** (1/d) / s), 1)``).
        generator: makes the fallback voxel and the capping subset deterministic.
        max_points_per_class: keep at most this many points per class (a uniformly random subset); ``None``
            keeps all.
    Returns:
        :class:`GridPrompts` with ``P`` = the largest number of points of any sample (at least 1).
    """
    if masks.dim() not in (4, 5):
        raise ValueError(f"masks must be (N, K, H, W) or (N, K, D, H, W), got {tuple(masks.shape)}")
    if max_points_per_class is not None and max_points_per_class < 1:
        raise ValueError(f"max_points_per_class must be >= 1 or None, got {max_points_per_class}")
    masks = masks.bool()
    n, k = masks.shape[:2]
    spatial = tuple(masks.shape[2:])
    ndim = len(spatial)
    device = masks.device

    flat_masks = masks.reshape(n, k, -1)
    area = flat_masks.sum(-1)
    intervals = adaptive_intervals(area, density, ndim)
    flat_grid = _grid_masks(masks, intervals).reshape(n, k, -1)

    fallback = (area > 0) & ~flat_grid.any(-1)
    if bool(fallback.any()):
        rows = fallback.nonzero(as_tuple=True)
        flat_grid[rows] = _random_voxel_rows(flat_masks[rows], 1, generator)
    if max_points_per_class is not None:
        over = flat_grid.sum(-1) > max_points_per_class
        if bool(over.any()):
            rows = over.nonzero(as_tuple=True)
            flat_grid[rows] = _random_voxel_rows(flat_grid[rows], max_points_per_class, generator)

    # pack: nonzero is ordered by sample, class, raster index
    sample, cls, voxel = flat_grid.nonzero(as_tuple=True)
    per_sample = torch.bincount(sample, minlength=n)
    width = max(int(per_sample.max()) if sample.numel() > 0 else 0, 1)
    start = torch.cumsum(per_sample, 0) - per_sample
    slot = torch.arange(sample.numel(), device=device) - start[sample]
    coords = torch.stack(torch.unravel_index(voxel, spatial), -1).float()
    points = torch.zeros((n, width, ndim), dtype=torch.float32, device=device)
    labels = torch.full((n, width), -1, dtype=torch.long, device=device)
    points[sample, slot] = coords
    labels[sample, slot] = cls
    return GridPrompts(points, labels, intervals, fallback)


def two_density_prompts(masks: Tensor, densities: Sequence[float] = (8.0, 16.0), **kw) -> List[GridPrompts]:
    """One :func:`adaptive_grid_points` prompt set per density (CPAC-SAM's coarse and fine prompt sets).

    ``kw`` is passed on (``generator``, ``max_points_per_class``); the sets are drawn in order of
    ``densities`` from the same generator.
    """
    return [adaptive_grid_points(masks, density, **kw) for density in densities]


# ----------------------------------------------------------------------------------------------------------------
# class prototypes
# ----------------------------------------------------------------------------------------------------------------
class ClassPrototypes(nn.Module):
    """EMA class prototypes of L2-normalised features, and nearest-prototype classification.

    Buffers (saved with ``state_dict``): ``prototypes (K, C)`` float32 (``(K, 0)`` until the first update
    fixes the feature dimension ``C``) and ``seen (K,)`` bool. The module keeps its buffers on its own device
    (move it with ``.to``); features on another device are handled.

    Args:
        num_classes: ``K``, background included.
        momentum: EMA weight of the old prototype, ``p = momentum p + (1 - momentum) p_batch``.
    """

    prototypes: Tensor
    seen: Tensor

    def __init__(self, num_classes: int, momentum: float = 0.9):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        self.register_buffer("prototypes", torch.zeros(self.num_classes, 0))
        self.register_buffer("seen", torch.zeros(self.num_classes, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the feature dimension is fixed by the saved state, whether or not this module has been updated yet
        saved = state_dict.get(prefix + "prototypes")
        if (saved is not None and saved.dim() == 2 and saved.shape[0] == self.num_classes
                and saved.shape != self.prototypes.shape):
            self.prototypes = torch.zeros(tuple(saved.shape), dtype=self.prototypes.dtype,
                                          device=self.prototypes.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def ready(self) -> bool:
        """Whether any class has a prototype."""
        return bool(self.seen.any())

    @property
    def feature_dim(self) -> int:
        """``C`` (0 before the first update)."""
        return int(self.prototypes.shape[1])

    @torch.no_grad()
    def update(self, features: Tensor, weights: Tensor, valid: Optional[Tensor] = None) -> None:
        """Fold a batch into the prototypes.

        Args:
            features: ``(N, C, *grid)`` features (detached, L2-normalised per voxel along ``C`` here).
            weights: ``(N, K, *grid)`` float class weight of each voxel (one-hot or class fractions).
            valid: optional ``(N, *grid)`` bool, voxels to use.
        """
        if features.dim() < 3 or weights.shape[0] != features.shape[0] or weights.shape[2:] != features.shape[2:]:
            raise ValueError(f"features (N, C, *grid) {tuple(features.shape)} and weights (N, K, *grid) "
                             f"{tuple(weights.shape)} must share N and the grid")
        if weights.shape[1] != self.num_classes:
            raise ValueError(f"weights have {weights.shape[1]} classes, expected {self.num_classes}")
        c = features.shape[1]
        if self.feature_dim != c:
            if self.ready:
                raise ValueError(f"features have {c} channels, prototypes {self.feature_dim}")
            self.prototypes = torch.zeros((self.num_classes, c), dtype=torch.float32, device=self.seen.device)
        f = F.normalize(features.detach().float().flatten(2), dim=1)
        w = weights.detach().float().flatten(2)
        if valid is not None:
            if valid.shape != weights.shape[:1] + weights.shape[2:]:
                raise ValueError(f"valid {tuple(valid.shape)} must be (N, *grid) like the weights")
            w = w * valid.bool().flatten(1).unsqueeze(1).float()
        total = w.sum((0, 2))
        sums = torch.einsum("ncv,nkv->kc", f, w)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # DDP: every rank folds in the global batch, so the prototypes stay identical across ranks (and a
            # checkpoint written by rank 0 resumes every rank to the same state)
            dist.all_reduce(sums)
            dist.all_reduce(total)
        batch = sums / total.clamp_min(1e-12).unsqueeze(1)
        total, batch = total.to(self.seen.device), batch.to(self.prototypes.device)
        present = total > 0
        blended = self.momentum * self.prototypes + (1.0 - self.momentum) * batch
        updated = torch.where(self.seen.unsqueeze(1), blended, batch)
        self.prototypes.copy_(torch.where(present.unsqueeze(1), updated, self.prototypes))
        self.seen |= present

    @torch.no_grad()
    def nearest_class(self, features: Tensor) -> Tensor:
        """Class of the most cosine-similar prototype per voxel; never a class without a prototype.

        Args:
            features: ``(N, C, *grid)``.
        Returns:
            ``(N, *grid)`` long, all ``-1`` while no class has been seen.
        """
        out_shape = features.shape[:1] + features.shape[2:]
        if not self.ready:
            return torch.full(out_shape, -1, dtype=torch.long, device=features.device)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"features have {features.shape[1]} channels, prototypes {self.feature_dim}")
        f = F.normalize(features.detach().float().flatten(2), dim=1)
        p = F.normalize(self.prototypes.to(f.device), dim=1)
        similarity = torch.einsum("kc,ncv->nkv", p, f)
        unseen = ~self.seen.to(f.device)
        similarity = similarity.masked_fill(unseen.view(1, -1, 1), float("-inf"))
        return similarity.argmax(1).view(out_shape)


def reliable_region(prototype_class: Tensor, predicted_class: Tensor, region: Optional[Tensor] = None) -> Tensor:
    """Voxels where the nearest-prototype class agrees with the predicted class.

    Args:
        prototype_class: ``(N, *spatial)`` long (``-1`` = no prototype, never agrees).
        predicted_class: ``(N, *spatial)`` long.
        region: optional ``(N, *spatial)`` bool to intersect with.
    Returns:
        ``(N, *spatial)`` bool.
    """
    if prototype_class.shape != predicted_class.shape:
        raise ValueError(f"prototype_class {tuple(prototype_class.shape)} and predicted_class "
                         f"{tuple(predicted_class.shape)} must have the same shape")
    agree = (prototype_class == predicted_class) & (prototype_class >= 0)
    if region is not None:
        agree = agree & region.bool()
    return agree


def prompts_from_prediction(predicted_class: Tensor, num_classes: int, prototype_class: Optional[Tensor] = None,
                            region: Optional[Tensor] = None, densities: Sequence[float] = (8.0, 16.0),
                            generator: Optional[torch.Generator] = None,
                            max_points_per_class: Optional[int] = None) -> List[GridPrompts]:
    """CPAC-SAM's prompt sets from a prediction: grids over each predicted class, restricted to the voxels
    where the prototypes agree with the prediction (when ``prototype_class`` is given) and to ``region``.

    Args:
        predicted_class: ``(N, *spatial)`` long argmax of the segmentation model.
        num_classes: ``K``, background included.
        prototype_class: optional ``(N, *spatial)`` long, :meth:`ClassPrototypes.nearest_class` on the same grid.
        region: optional ``(N, *spatial)`` bool where prompts may go.
    Returns:
        one :class:`GridPrompts` per density.
    """
    allowed = region
    if prototype_class is not None:
        allowed = reliable_region(prototype_class, predicted_class, region)
    masks = class_masks(predicted_class, num_classes, allowed)
    return two_density_prompts(masks, densities, generator=generator, max_points_per_class=max_points_per_class)
