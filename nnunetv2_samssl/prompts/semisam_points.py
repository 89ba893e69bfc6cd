"""SemiSAM's uncertainty-aware point prompts, drawn from a segmentation model's own prediction.

Nothing in this module takes a label: the only inputs are predicted probabilities / masks and uncertainty
maps derived from them, so prompts for unlabeled images cannot leak ground truth.

Conventions: masks and maps are ``(N, *spatial)`` with one row per query (2D or 3D); coordinates are voxel
indices in tensor axis order (what ``torch.argwhere`` returns), returned as float ``(N, P, ndim)``; point
labels are ``1`` positive, ``0`` negative, ``-1`` padding (a point to ignore, coordinates 0).

Cost: every function is a handful of whole-batch tensor operations. Sampling ``P`` points is one ``topk`` over
the flattened voxels of each row (``O(N V)``); the negative band is a separable max-pool dilation
(``O(N V d r)`` for radius ``r``); the click depth map is ``max_depth`` separable 3-wide erosions
(``O(N V d max_depth)``). No scipy, no per-sample Python loop; everything runs on the tensors' device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from nnunetv2_samssl.prompts.uncertainty import predictive_entropy

Tensor = torch.Tensor

__all__ = ["PointPrompts", "SemiSAMPointSampler", "semisam_points", "next_click", "foreground_class_queries",
           "dilate", "erode", "erosion_depth"]

Radius = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# morphology on the GPU (max-pooling, no distance transforms)
# ----------------------------------------------------------------------------------------------------------------
def _max_pool(x: Tensor, kernel: Sequence[int]) -> Tensor:
    """Max-pool ``(N, 1, *spatial)`` with stride 1, 'same' size (implicit -inf padding)."""
    padding = [k // 2 for k in kernel]
    if x.dim() == 4:
        return F.max_pool2d(x, kernel, stride=1, padding=padding)
    return F.max_pool3d(x, kernel, stride=1, padding=padding)


def _radii(radius: Radius, ndim: int) -> Tuple[int, ...]:
    radii = (int(radius),) * ndim if isinstance(radius, (int, float)) else tuple(int(r) for r in radius)
    if len(radii) != ndim or any(r < 0 for r in radii):
        raise ValueError(f"radius must be a non-negative int or {ndim} of them, got {radius}")
    return radii


def dilate(mask: Tensor, radius: Radius) -> Tensor:
    """Binary dilation by a box of half-width ``radius`` (per axis), as separable max-pools.

    Args:
        mask: ``(N, *spatial)`` bool (2D or 3D).
        radius: voxels, an int or one per spatial axis (for anisotropic grids).
    Returns:
        ``(N, *spatial)`` bool.
    """
    ndim = mask.dim() - 1
    x = mask.unsqueeze(1).float()
    for axis, r in enumerate(_radii(radius, ndim)):
        if r == 0:
            continue
        kernel = [1] * ndim
        kernel[axis] = 2 * r + 1
        x = _max_pool(x, kernel)
    return x[:, 0] > 0.5


def erode(mask: Tensor) -> Tensor:
    """Binary erosion by the 3^d box; voxels beyond the border count as background (so objects touching
    the border erode from it too). ``(N, *spatial)`` bool -> same."""
    # separable: a voxel survives an axis when both neighbours along it are inside; logical ANDs of shifted views
    # (about 100x faster on CPU than max pooling the float complement, which the click loop repeats per click)
    out = mask.bool()
    for dim in range(1, mask.dim()):
        length = out.shape[dim]
        eroded = out.clone()
        if length > 1:
            eroded.narrow(dim, 1, length - 1).logical_and_(out.narrow(dim, 0, length - 1))
            eroded.narrow(dim, 0, length - 1).logical_and_(out.narrow(dim, 1, length - 1))
        eroded.narrow(dim, 0, 1).fill_(False)
        eroded.narrow(dim, length - 1, 1).fill_(False)
        out = eroded
    return out


def erosion_depth(mask: Tensor, max_depth: int = 8) -> Tensor:
    """How many successive erosions each voxel survives (1 on the boundary, up to ``max_depth``; 0 outside).

    A cheap stand-in for the distance transform used by click simulators: the deepest voxel of a region is
    (up to the box metric and the cap) the one farthest from its boundary. ``(N, *spatial)`` bool -> float32.
    """
    depth = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    current = mask
    for _ in range(max_depth):
        depth += current.float()
        current = erode(current)
        if not bool(current.any()):
            break
    return depth


# ----------------------------------------------------------------------------------------------------------------
# random draws
# ----------------------------------------------------------------------------------------------------------------
def _uniform(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Uniform ``[0, 1)`` noise shaped like ``like``; drawn on the generator's device, moved to ``like``'s."""
    if generator is None:
        return torch.rand(like.shape, device=like.device)
    return torch.rand(like.shape, generator=generator, device=generator.device).to(like.device)


def _top_coordinates(score: Tensor, count: int) -> Tuple[Tensor, Tensor]:
    """The ``count`` highest-scoring voxels of each row; scores ``< 0`` mean "not eligible".

    Args:
        score: ``(N, *spatial)`` float.
    Returns:
        ``coords (N, count, ndim)`` float (0 for padding) and ``ok (N, count)`` bool.
    """
    n, spatial = score.shape[0], score.shape[1:]
    if count == 0:
        return score.new_zeros((n, 0, len(spatial))), torch.zeros((n, 0), dtype=torch.bool, device=score.device)
    flat = score.reshape(n, -1)
    k = min(count, flat.shape[1])
    values, index = flat.topk(k, dim=1)
    ok = values >= 0
    coords = torch.stack(torch.unravel_index(index, tuple(spatial)), -1).float()
    coords = torch.where(ok.unsqueeze(-1), coords, torch.zeros_like(coords))
    if k < count:
        coords = torch.cat([coords, coords.new_zeros((n, count - k, len(spatial)))], 1)
        ok = torch.cat([ok, ok.new_zeros((n, count - k))], 1)
    return coords, ok


# ----------------------------------------------------------------------------------------------------------------
# SemiSAM's uncertainty-aware points
# ----------------------------------------------------------------------------------------------------------------
def semisam_points(foreground: Tensor, uncertainty: Tensor, *, num_positive: int = 1, num_negative: int = 0,
                   uncertainty_threshold: float = 0.5, band_radius: Radius = 5,
                   background: Optional[Tensor] = None, region: Optional[Tensor] = None, fallback: bool = True,
                   positive_selection: str = "random", max_depth: int = 8,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Positive and negative points from a predicted object, avoiding uncertain voxels.

    * Positive points: uniformly among voxels predicted as the object (``foreground``) whose uncertainty is
      below ``uncertainty_threshold`` (``positive_selection="interior"``: the deepest such voxels instead).
      With ``fallback``, a row with too few of them is filled with its least-uncertain foreground voxels.
    * Negative points: uniformly among confidently-background voxels (``background`` and uncertainty below the
      threshold) within ``band_radius`` voxels of the predicted object (a dilation band, so negatives sit
      near the object, where they inform the boundary).
    * Slots that cannot be filled are padding (label -1).

    Args:
        foreground: ``(N, *spatial)`` bool, the predicted object of each query.
        uncertainty: ``(N, *spatial)`` float in ``[0, 1]`` (e.g. normalised entropy).
        background: ``(N, *spatial)`` bool voxels allowed as negatives, default ``~foreground``.
        region: ``(N, *spatial)`` bool where points may be placed at all (e.g. inside the patch), default all.
        generator: makes the draw deterministic (noise is drawn on its device).
    Returns:
        ``points (N, num_positive + num_negative, ndim)`` float voxel coordinates, positives first, and
        ``labels (N, num_positive + num_negative)`` long (1 / 0 / -1).
    """
    if foreground.shape != uncertainty.shape:
        raise ValueError(f"foreground {tuple(foreground.shape)} and uncertainty {tuple(uncertainty.shape)} "
                         "must have the same shape (N, *spatial)")
    if positive_selection not in ("random", "interior"):
        raise ValueError(f"positive_selection must be 'random' or 'interior', got {positive_selection!r}")
    foreground = foreground.bool()
    allowed = torch.ones_like(foreground) if region is None else region.bool()
    background = ~foreground if background is None else background.bool()
    unc = uncertainty.float()
    confident = unc < uncertainty_threshold
    fg = foreground & allowed

    noise = _uniform(fg, generator)
    if positive_selection == "interior":
        depth = erosion_depth(fg & confident, max_depth)
        preference = (depth + 0.5 * noise) / (max_depth + 1.0)  # deeper first, random among equals, in [0, 1)
    else:
        preference = noise
    minus_one = torch.full_like(unc, -1.0)
    fallback_score = (1.0 - unc).clamp(0.0, 1.0) if fallback else minus_one
    positive_score = torch.where(fg & confident, 2.0 + preference, torch.where(fg, fallback_score, minus_one))
    pos_points, pos_ok = _top_coordinates(positive_score, num_positive)

    if num_negative > 0:
        band = dilate(foreground, band_radius) & ~foreground
        eligible = background & band & confident & allowed
        negative_score = torch.where(eligible, _uniform(fg, generator), minus_one)
        neg_points, neg_ok = _top_coordinates(negative_score, num_negative)
    else:
        neg_points, neg_ok = _top_coordinates(minus_one, 0)

    points = torch.cat([pos_points, neg_points], 1)
    labels = torch.cat([torch.where(pos_ok, 1, -1), torch.where(neg_ok, 0, -1)], 1).long()
    return points, labels


def foreground_class_queries(predicted_labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """One query per (sample, foreground class present in the prediction).

    Args:
        predicted_labels: ``(B, *spatial)`` long argmax of the prediction (0 = background).
        num_classes: ``K`` including background.
    Returns:
        ``sample_index (Q,)`` and ``class_index (Q,)`` (values ``1 .. K-1``), ordered by sample then class.
    """
    b = predicted_labels.shape[0]
    present = torch.zeros((b, num_classes), dtype=torch.bool, device=predicted_labels.device)
    present.scatter_(1, predicted_labels.reshape(b, -1).long(), True)
    sample_index, class_index = present[:, 1:].nonzero(as_tuple=True)
    return sample_index, class_index + 1


@dataclass
class PointPrompts:
    """Point prompts for a batch of queries.

    Attributes:
        points: ``(Q, N, ndim)`` float voxel coordinates (tensor axis order, grid of the maps they came from).
        labels: ``(Q, N)`` long, 1 positive / 0 negative / -1 padding.
        sample_index: ``(Q,)`` the sample of each query.
        class_index: ``(Q,)`` the foreground class of each query.
    """

    points: Tensor
    labels: Tensor
    sample_index: Tensor
    class_index: Tensor


class SemiSAMPointSampler:
    """SemiSAM's uncertainty-aware point selection for multi-class softmax predictions.

    One query per (sample, foreground class present in the argmax prediction); for class ``k`` the object is
    ``argmax == k`` and the background every other voxel (other classes included: for SAM they are "not k").

    Args:
        num_positive, num_negative: points per query.
        uncertainty_threshold: voxels with uncertainty ``>=`` this are never used (except by the fallback).
        band_radius: half-width in voxels (int or per axis) of the band around the object for negatives.
        fallback: fill missing positives with the least-uncertain foreground voxels.
        positive_selection: ``"random"`` (SemiSAM) or ``"interior"`` (deepest confident voxels first).
    """

    def __init__(self, num_positive: int = 1, num_negative: int = 0, uncertainty_threshold: float = 0.5,
                 band_radius: Radius = 5, fallback: bool = True, positive_selection: str = "random",
                 max_depth: int = 8):
        if num_positive < 0 or num_negative < 0 or num_positive + num_negative == 0:
            raise ValueError(f"need at least one point: num_positive={num_positive}, num_negative={num_negative}")
        self.num_positive = num_positive
        self.num_negative = num_negative
        self.uncertainty_threshold = uncertainty_threshold
        self.band_radius = band_radius
        self.fallback = fallback
        self.positive_selection = positive_selection
        self.max_depth = max_depth

    def __call__(self, probs: Tensor, uncertainty: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> PointPrompts:
        """Args:
            probs: ``(B, K, *spatial)`` softmax probabilities of the segmentation model (channel 0 background).
            uncertainty: ``(B, *spatial)`` in ``[0, 1]``; default the normalised entropy of ``probs``.
        Returns:
            :class:`PointPrompts` in the probabilities' voxel grid.
        """
        if probs.dim() not in (4, 5) or probs.shape[1] < 2:
            raise ValueError(f"probs must be (B, K>=2, *spatial) softmax probabilities with background in channel 0,"
                             f" got {tuple(probs.shape)}")
        if uncertainty is None:
            uncertainty = predictive_entropy(probs)
        predicted = probs.argmax(1)
        sample_index, class_index = foreground_class_queries(predicted, probs.shape[1])
        view = (-1,) + (1,) * (predicted.dim() - 1)
        foreground = predicted[sample_index] == class_index.view(view)
        points, labels = semisam_points(
            foreground, uncertainty[sample_index], num_positive=self.num_positive, num_negative=self.num_negative,
            uncertainty_threshold=self.uncertainty_threshold, band_radius=self.band_radius, fallback=self.fallback,
            positive_selection=self.positive_selection, max_depth=self.max_depth, generator=generator)
        return PointPrompts(points, labels, sample_index, class_index)


# ----------------------------------------------------------------------------------------------------------------
# the iterative click loop
# ----------------------------------------------------------------------------------------------------------------
def next_click(prompted: Tensor, reference: Tensor, *, uncertainty: Optional[Tensor] = None,
               uncertainty_threshold: float = 0.5, region: Optional[Tensor] = None, max_depth: int = 8,
               min_depth: int = 1, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """One new click per query where the promptable model disagrees with the segmentation model.

    The segmentation model's prediction plays the role that the ground truth plays in SAM-Med3D's click
    simulation: false negatives (``reference`` but not ``prompted``) call for a positive click, false positives
    for a negative one. Only voxels where the segmentation model is confident (uncertainty below the threshold)
    and inside ``region`` count as errors. The click goes into the error type with the larger volume, at its
    deepest voxel (most erosions survived, ties broken at random): the interior of the largest/thickest
    disagreement region, like the distance-transform maximum of the RITM-style simulator. Errors thinner than
    ``min_depth`` (depth counted in 3-wide erosions: thickness 1-2 voxels is depth 1, 3-4 is depth 2, ...) are
    ignored, so resampling jitter along a shared boundary does not produce clicks.

    Args:
        prompted: ``(N, *spatial)`` bool, the promptable model's current foreground.
        reference: ``(N, *spatial)`` bool, the segmentation model's predicted foreground for the same class.
        uncertainty: optional ``(N, *spatial)`` uncertainty of the segmentation model.
        region: optional ``(N, *spatial)`` bool where clicks may go (e.g. inside the patch).
    Returns:
        ``points (N, 1, ndim)`` float and ``labels (N, 1)`` long: 1 (false negative), 0 (false positive) or
        -1 (padding) when the two agree everywhere that counts.
    """
    if prompted.shape != reference.shape:
        raise ValueError(f"prompted {tuple(prompted.shape)} and reference {tuple(reference.shape)} must match")
    prompted, reference = prompted.bool(), reference.bool()
    allowed = torch.ones_like(reference) if region is None else region.bool()
    if uncertainty is not None:
        allowed = allowed & (uncertainty < uncertainty_threshold)
    false_negative = reference & ~prompted & allowed
    false_positive = prompted & ~reference & allowed
    positive = false_negative.flatten(1).sum(1) >= false_positive.flatten(1).sum(1)
    view = (-1,) + (1,) * (reference.dim() - 1)
    error = torch.where(positive.view(view), false_negative, false_positive)
    depth = erosion_depth(error, max(max_depth, min_depth))
    eligible = depth >= min_depth
    score = torch.where(eligible, depth + 0.5 * _uniform(error, generator), torch.full_like(depth, -1.0))
    points, ok = _top_coordinates(score, 1)
    labels = torch.where(ok, positive.long().unsqueeze(1), torch.full_like(ok, -1, dtype=torch.long))
    return points, labels
