"""Mapping nnU-Net training patches into a promptable model's input space and back.

A promptable model declares the image it expects through :class:`~nnunetv2_samssl.sam.interface.InputSpace`.
:class:`SamSpaceMapper` turns a batch of nnU-Net patches ``(B, C, *patch)`` into a batch of model inputs
``(Q, C, *input_space.size)`` (one row per *query*) and maps model outputs back onto the patch grid.

Geometry
--------
Every query is an axis-aligned window on the patch grid: along each model axis ``a`` the centre of model
voxel ``m`` lies at patch coordinate ``offset[a] + scale[a] * m`` (patch voxel indices, voxel centres at
integers, tensor axis order). ``scale`` is the number of patch voxels per model voxel. Nothing else is
needed to go in either direction, so images, dense maps, points and boxes all share the same geometry.

Three ways to build the windows, chosen by the input space and the patch dimensionality:

* **fixed spacing** (``input_space.spacing_mm`` set, e.g. SAM-Med3D at 1.5 mm, 128^3): the patch is
  resampled to the target spacing; one window of ``size`` voxels is placed on the region of interest (ROI).
  When the ROI (plus ``roi_margin``) is larger than the window along an axis, the ROI is covered by several
  overlapping tiles, each a separate query carrying its sample index.
* **resize** (``spacing_mm`` is ``None``, 2D SAMs at 256^2 or 1024^2): the ROI plus a margin is cropped and
  resized so that its longest physical side fills the window, keeping the physical aspect ratio (model
  pixels are square in mm); the rest of the window shows the surrounding patch or padding, like SAM's
  longest-side resize followed by padding.
* **slice-wise** (a 2D model on 3D patches): every slice along ``slice_axis`` whose ROI is non-empty becomes
  a 2D query; each slice is then handled as above with its own 2D ROI.

In the first two modes the window is shifted, when ``fit_to_patch`` is on, so that it shows as much of the
patch as possible while still containing the ROI (centred on the ROI when the patch allows it).

Resampling is separable linear interpolation written as one small interpolation matrix per query and axis
(a triangle filter whose support widens when the target grid is coarser, i.e. anti-aliased trilinear /
bilinear). The matrices are applied with batched matmuls: no ``grid_sample`` grids, no per-sample loops.
Model voxels whose centre falls outside the patch receive the pad value: the per-sample, per-channel
minimum of the patch (``pad_value="min"``, the default; after nnU-Net's z-scoring this is the darkest
intensity of the patch, which looks like "outside the body" for CT and MR) or a constant.

Going back, a model output of any spatial size covering the window (the full ``size`` or the decoder's
``low_res_size``) is interpolated onto the patch voxels the window covers; overlapping queries of the same
sample and channel are averaged, and voxels that no query covers are reported as invalid.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from nnunetv2_samssl.sam.interface import InputSpace

Tensor = torch.Tensor

__all__ = ["ModelBatch", "SamSpaceMapper", "bounding_boxes", "downsample_to_scales"]


# ----------------------------------------------------------------------------------------------------------------
# small tensor helpers
# ----------------------------------------------------------------------------------------------------------------
def bounding_boxes(mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Tight bounding boxes of a batch of masks.

    Args:
        mask: ``(N, *spatial)`` bool.
    Returns:
        ``lo (N, d)`` and ``hi (N, d)`` long, inclusive voxel indices in tensor axis order, and
        ``nonempty (N,)`` bool. Empty rows get the whole extent (``lo = 0``, ``hi = size - 1``).
    """
    spatial = mask.shape[1:]
    nonempty = mask.flatten(1).any(1)
    lows, highs = [], []
    for axis, length in enumerate(spatial):
        other = tuple(1 + i for i in range(len(spatial)) if i != axis)
        projection = mask.any(dim=other) if other else mask
        index = torch.arange(length, device=mask.device)
        lows.append(torch.where(projection, index, length).amin(1))
        highs.append(torch.where(projection, index, -1).amax(1))
    lo = torch.stack(lows, 1)
    hi = torch.stack(highs, 1)
    full = torch.tensor(spatial, device=mask.device) - 1
    lo = torch.where(nonempty[:, None], lo, torch.zeros_like(lo))
    hi = torch.where(nonempty[:, None], hi, full.expand_as(hi))
    return lo, hi, nonempty


def _interpolation_weights(centres: Tensor, source_length: int, width: Tensor,
                           antialias: bool) -> Tuple[Tensor, Tensor]:
    """Linear-interpolation matrices along one axis, one per query.

    Args:
        centres: ``(Q, n)`` positions of the destination samples in source voxel units (source voxel
            centres at ``0 .. source_length - 1``).
        source_length: number of source voxels along the axis.
        width: ``(Q,)`` size of one destination cell in source voxel units; with ``antialias`` the triangle
            filter widens to this support when it exceeds one voxel (downsampling).
    Returns:
        ``weights (Q, n, source_length)`` (rows sum to 1, or 0 outside) and ``inside (Q, n)`` bool, true where
        the destination centre lies within the source extent ``[-0.5, source_length - 0.5]``.
    """
    source = torch.arange(source_length, device=centres.device, dtype=centres.dtype)
    support = width.clamp_min(1.0) if antialias else torch.ones_like(width)
    distance = (source.view(1, 1, -1) - centres.unsqueeze(-1)).abs() / support.view(-1, 1, 1)
    weights = (1.0 - distance).clamp_min(0.0)
    inside = (centres >= -0.5) & (centres <= source_length - 0.5)
    norm = weights.sum(-1, keepdim=True)
    weights = torch.where(inside.unsqueeze(-1) & (norm > 0), weights / norm.clamp_min(1e-12),
                          torch.zeros_like(weights))
    return weights, inside


def _apply_separable(values: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """Apply one interpolation matrix per spatial axis.

    Args:
        values: ``(Q, C, *source)``.
        weights: per spatial axis, ``(Q, n_a, source_a)``.
    Returns:
        ``(Q, C, *n)``.
    """
    out = values
    q = values.shape[0]
    if q == 0:
        return values.new_zeros((0, values.shape[1], *[w.shape[1] for w in weights]))
    for axis, w in enumerate(weights):
        dim = 2 + axis
        moved = out.movedim(dim, -1)  # (Q, C, ..., source_a)
        rest = moved.shape[1:-1]
        # one (rest x source) @ (source x n) GEMM per query; broadcasting matmul would run tiny GEMMs instead
        flat = torch.bmm(moved.reshape(q, -1, moved.shape[-1]), w.transpose(1, 2))
        out = flat.view(q, *rest, w.shape[1]).movedim(-1, dim)
    return out


def _outer_and(masks: Sequence[Tensor]) -> Tensor:
    """Per-axis boolean vectors ``(Q, n_a)`` -> their outer product ``(Q, *n)``."""
    out = masks[0]
    for m in masks[1:]:
        out = out.unsqueeze(-1) & m.view(m.shape[0], *([1] * (out.dim() - 1)), m.shape[1])
    return out


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------------------------------------------
# the batch of queries
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ModelBatch:
    """A batch of queries in a promptable model's input space and the geometry to go back.

    Attributes:
        images: ``(Q, C, *size)`` float32 images in model space (nnU-Net-normalised intensities, padded with
            the pad value outside the patch), or ``None`` for a geometry-only batch (see :meth:`select`).
        sample_index: ``(Q,)`` long, the patch (batch row) each query comes from.
        channel_index: ``(Q,)`` long, the ROI channel (e.g. class) of the query; :meth:`SamSpaceMapper.to_patch`
            writes the query's output into this channel.
        slice_index: ``(Q,)`` long slice position along ``slice_axis`` in slice-wise mode, else ``None``.
        scale: ``(Q, d)`` float32, patch voxels per model voxel along each model axis.
        offset: ``(Q, d)`` float32, patch coordinate of the centre of model voxel 0 along each model axis.
        model_axes: the patch axes (spatial, tensor order) the ``d`` model axes run along.
        slice_axis: the patch axis sliced in slice-wise mode, else ``None``.
        patch_shape: spatial shape of the patch.
        size: spatial size of the model input (``input_space.size``).
        batch_size: number of patches ``B``.
        num_channels: number of output channels ``K`` of :meth:`SamSpaceMapper.to_patch`.
        antialias: whether resampling to a coarser grid uses a widened triangle filter.
    """

    images: Optional[Tensor]
    sample_index: Tensor
    channel_index: Tensor
    slice_index: Optional[Tensor]
    scale: Tensor
    offset: Tensor
    model_axes: Tuple[int, ...]
    slice_axis: Optional[int]
    patch_shape: Tuple[int, ...]
    size: Tuple[int, ...]
    batch_size: int
    num_channels: int
    antialias: bool = True

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_queries(self) -> int:
        return int(self.sample_index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.sample_index.device

    @property
    def inplane_shape(self) -> Tuple[int, ...]:
        """Spatial shape of the patch along the model axes."""
        return tuple(self.patch_shape[a] for a in self.model_axes)

    def select(self, index: Tensor, channel_index: Optional[Tensor] = None, num_channels: Optional[int] = None,
               with_images: bool = True) -> "ModelBatch":
        """Queries ``index`` (a long index, repeats allowed, or a bool mask) as a new batch.

        ``channel_index`` (one per selected query) re-targets the output channels, e.g. to decode one crop once
        per class; ``with_images=False`` drops the images (geometry only).
        """
        if index.dtype == torch.bool:
            index = index.nonzero(as_tuple=True)[0]
        new_channels = self.channel_index[index] if channel_index is None else channel_index.to(self.device).long()
        if new_channels.shape != index.shape:
            raise ValueError(f"channel_index must have one entry per selected query ({index.shape[0]}), "
                             f"got shape {tuple(new_channels.shape)}")
        return replace(
            self,
            images=self.images[index] if (with_images and self.images is not None) else None,
            sample_index=self.sample_index[index],
            channel_index=new_channels,
            slice_index=None if self.slice_index is None else self.slice_index[index],
            scale=self.scale[index],
            offset=self.offset[index],
            num_channels=self.num_channels if num_channels is None else int(num_channels),
        )

    # ------------------------------------------------------------------ geometry of a grid spanning the window
    def _grid_centres(self, axis: int, length: int) -> Tuple[Tensor, Tensor]:
        """Patch coordinates ``(Q, length)`` of the cell centres of a ``length``-cell grid spanning the window
        along model axis ``axis``, and the cell width ``(Q,)`` in patch voxels."""
        full = self.size[axis]
        cells = torch.arange(length, device=self.device, dtype=torch.float32)
        model_coord = (cells + 0.5) * (full / length) - 0.5
        centres = self.offset[:, axis:axis + 1] + self.scale[:, axis:axis + 1] * model_coord.view(1, -1)
        return centres, self.scale[:, axis] * (full / length)

    def inside_patch(self, size: Optional[Sequence[int]] = None) -> Tensor:
        """``(Q, *size)`` bool: model cells (of a grid of ``size`` cells spanning the window, default the model
        input size) whose centre lies inside the patch."""
        size = tuple(self.size if size is None else size)
        masks = []
        for axis, length in enumerate(size):
            centres, _ = self._grid_centres(axis, length)
            extent = self.inplane_shape[axis]
            masks.append((centres >= -0.5) & (centres <= extent - 0.5))
        return _outer_and(masks)

    # ------------------------------------------------------------------ dense maps, patch -> model
    def _gather(self, maps: Tensor, select_channel: bool) -> Tensor:
        """``(B, C, *patch)`` -> ``(Q, C', *inplane)`` rows for each query (``C' = 1`` with ``select_channel``)."""
        if maps.shape[0] != self.batch_size or tuple(maps.shape[2:]) != tuple(self.patch_shape):
            raise ValueError(f"expected a map of shape (B={self.batch_size}, C, *{tuple(self.patch_shape)}), "
                             f"got {tuple(maps.shape)}")
        if self.slice_axis is not None:
            maps = maps.movedim(2 + self.slice_axis, 2)  # (B, C, Z, *inplane)
            if select_channel:
                return maps[self.sample_index, self.channel_index, self.slice_index].unsqueeze(1)
            return maps[self.sample_index, :, self.slice_index]
        if select_channel:
            return maps[self.sample_index, self.channel_index].unsqueeze(1)
        return maps[self.sample_index]

    def patch_to_model(self, maps: Tensor, size: Optional[Sequence[int]] = None,
                       pad_value: Union[float, Tensor] = 0.0, select_channel: bool = False) -> Tensor:
        """Resample a dense patch map into every query's window.

        Args:
            maps: ``(B, C, *patch)`` (images, probabilities, uncertainty, ...).
            size: grid of the output spanning the window, default the model input size; a coarser grid
                (e.g. ``low_res_size``) is sampled with an anti-aliasing (area-like) filter.
            pad_value: value of cells outside the patch: a float or a ``(B, C)`` tensor (per sample and channel).
            select_channel: take, for query ``q``, only channel ``channel_index[q]`` of ``maps``
                (then ``C`` may differ from 1 and the output has one channel).
        Returns:
            ``(Q, C, *size)`` float32 (``C = 1`` with ``select_channel``).
        """
        size = tuple(self.size if size is None else size)
        with _no_autocast(maps.device):
            rows = self._gather(maps.float(), select_channel)
            weights, inside = [], []
            for axis, length in enumerate(size):
                centres, width = self._grid_centres(axis, length)
                w, i = _interpolation_weights(centres, self.inplane_shape[axis], width, self.antialias)
                weights.append(w)
                inside.append(i)
            out = _apply_separable(rows, weights)
            outside = (~_outer_and(inside)).unsqueeze(1).float()  # (Q, 1, *size)
            if torch.is_tensor(pad_value) and pad_value.dim() > 0:
                pad = pad_value.float().to(out.device)
                pad = pad[self.sample_index]
                if select_channel:
                    pad = pad.gather(1, self.channel_index.view(-1, 1))
                pad = pad.view(*pad.shape, *([1] * len(size)))
            else:
                pad = float(pad_value)
            return out + outside * pad

    # ------------------------------------------------------------------ dense maps, model -> patch (per query)
    def model_to_patch(self, values: Tensor) -> Tuple[Tensor, Tensor]:
        """Interpolate model-space values onto the patch voxels each window covers.

        Args:
            values: ``(Q, C, *grid)``; ``grid`` is any grid spanning the window (``size`` or ``low_res_size``).
        Returns:
            ``values (Q, C, *inplane)`` float32 (0 where not covered) and ``covered (Q, *inplane)`` bool.
        """
        if values.shape[0] != self.num_queries or values.dim() != 2 + len(self.size):
            raise ValueError(f"expected model values of shape (Q={self.num_queries}, C, *grid) with "
                             f"{len(self.size)} spatial dims, got {tuple(values.shape)}")
        grid = values.shape[2:]
        with _no_autocast(values.device):
            weights, covered = [], []
            for axis, length in enumerate(grid):
                full = self.size[axis]
                patch = torch.arange(self.inplane_shape[axis], device=self.device, dtype=torch.float32)
                model_coord = (patch.view(1, -1) - self.offset[:, axis:axis + 1]) / self.scale[:, axis:axis + 1]
                grid_coord = (model_coord + 0.5) * (length / full) - 0.5
                width = (1.0 / self.scale[:, axis]) * (length / full)
                w, c = _interpolation_weights(grid_coord, length, width, self.antialias)
                weights.append(w)
                covered.append(c)
            return _apply_separable(values.float(), weights), _outer_and(covered)

    # ------------------------------------------------------------------ points and boxes
    def points_to_model(self, points: Tensor) -> Tensor:
        """Patch coordinates ``(Q, N, patch_ndim)`` (tensor axis order, one row per query) -> model-input
        coordinates ``(Q, N, d)``. In slice-wise mode the slice coordinate is dropped. To use per-sample
        points ``(B, N, patch_ndim)`` index them first: ``points[model_batch.sample_index]``."""
        points = points.float()
        if points.shape[-1] != len(self.patch_shape):
            raise ValueError(f"points must have {len(self.patch_shape)} coordinates, got {points.shape[-1]}")
        inplane = points[..., list(self.model_axes)]
        return (inplane - self.offset.unsqueeze(1)) / self.scale.unsqueeze(1)

    def points_to_patch(self, points: Tensor) -> Tensor:
        """Model-input coordinates ``(Q, N, d)`` -> patch coordinates ``(Q, N, patch_ndim)`` (the slice
        coordinate is the query's slice in slice-wise mode)."""
        inplane = self.offset.unsqueeze(1) + self.scale.unsqueeze(1) * points.float()
        if self.slice_axis is None:
            return inplane
        slice_coord = self.slice_index.float().view(-1, 1, 1).expand(*inplane.shape[:2], 1)
        parts = list(inplane.unbind(-1))
        parts.insert(self.slice_axis, slice_coord[..., 0])
        return torch.stack(parts, -1)

    def boxes_to_model(self, boxes: Tensor) -> Tensor:
        """Patch boxes ``(Q, 2 * patch_ndim)`` ``(min corner..., max corner...)`` -> model boxes ``(Q, 2 * d)``."""
        n = len(self.patch_shape)
        corners = torch.stack([boxes[:, :n], boxes[:, n:]], 1)  # (Q, 2, n)
        mapped = self.points_to_model(corners)
        return torch.cat([mapped.amin(1), mapped.amax(1)], 1)

    def contains(self, model_points: Tensor) -> Tensor:
        """``(Q, N)`` bool: model-input coordinates ``(Q, N, d)`` that lie within the window."""
        upper = torch.tensor(self.size, device=model_points.device, dtype=torch.float32) - 0.5
        return ((model_points >= -0.5) & (model_points <= upper)).all(-1)


# ----------------------------------------------------------------------------------------------------------------
# the mapper
# ----------------------------------------------------------------------------------------------------------------
class SamSpaceMapper:
    """Maps nnU-Net patches to a promptable model's input space and model outputs back (see module docstring).

    Args:
        input_space: what the model expects.
        patch_spacing: voxel spacing of the patch in mm, one value per spatial axis in tensor order (the nnU-Net
            configuration's ``spacing``).
        roi_threshold: a soft ROI mask counts as foreground where ``>= roi_threshold``.
        roi_margin: context kept around the ROI, as a fraction of the model window per side: with fixed spacing
            the ROI is tiled once it exceeds ``(1 - 2 * roi_margin) * size``; in resize mode the ROI's longest
            side fills ``(1 - 2 * roi_margin)`` of the window. In ``[0, 0.5)``.
        tile_overlap: minimum overlap of neighbouring tiles, a fraction of the window, in ``[0, 1)``.
        slice_axis: patch axis (spatial, tensor order) sliced when a 2D model sees 3D patches; default the first.
        fit_to_patch: shift windows to show as much of the patch as possible while still containing the ROI.
        resize_align: in resize mode, where the patch sits along an axis on which the window is larger than the
            whole patch: ``"start"`` (padding after it, like SAM's pad-bottom-right) or ``"center"``.
        pad_value: ``"min"`` (per-sample, per-channel minimum of the patch) or a float for model voxels outside
            the patch.
        antialias: widen the interpolation filter when resampling to a coarser grid.
        max_zoom: resize mode only: at most this many model pixels per (finest) patch voxel, so that a tiny ROI
            is not blown up to the full window; ``None`` for no limit.
    """

    def __init__(self, input_space: InputSpace, patch_spacing: Sequence[float], *, roi_threshold: float = 0.5,
                 roi_margin: float = 0.05, tile_overlap: float = 0.25, slice_axis: int = 0,
                 fit_to_patch: bool = True, resize_align: str = "start", pad_value: Union[str, float] = "min",
                 antialias: bool = True, max_zoom: Optional[float] = None):
        if input_space.ndim not in (2, 3) or len(input_space.size) != input_space.ndim:
            raise ValueError(f"input_space.size {input_space.size} must have input_space.ndim={input_space.ndim} "
                             "entries (2 or 3)")
        if input_space.spacing_mm is not None and len(input_space.spacing_mm) != input_space.ndim:
            raise ValueError(f"input_space.spacing_mm {input_space.spacing_mm} must have {input_space.ndim} entries")
        if not 0.0 <= roi_margin < 0.5:
            raise ValueError(f"roi_margin must be in [0, 0.5), got {roi_margin}")
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        if resize_align not in ("start", "center"):
            raise ValueError(f"resize_align must be 'start' or 'center', got {resize_align!r}")
        if isinstance(pad_value, str) and pad_value != "min":
            raise ValueError(f"pad_value must be 'min' or a number, got {pad_value!r}")
        if max_zoom is not None and max_zoom <= 0:
            raise ValueError(f"max_zoom must be positive or None, got {max_zoom}")
        self.input_space = input_space
        self.patch_spacing = tuple(float(s) for s in patch_spacing)
        if any(s <= 0 for s in self.patch_spacing):
            raise ValueError(f"patch_spacing must be positive, got {self.patch_spacing}")
        self.roi_threshold = roi_threshold
        self.roi_margin = roi_margin
        self.tile_overlap = tile_overlap
        self.slice_axis = slice_axis
        self.fit_to_patch = fit_to_patch
        self.resize_align = resize_align
        self.pad_value = pad_value
        self.antialias = antialias
        self.max_zoom = max_zoom

    # ------------------------------------------------------------------ layout
    def _layout(self, patch_ndim: int) -> Tuple[Tuple[int, ...], Optional[int]]:
        if len(self.patch_spacing) != patch_ndim:
            raise ValueError(f"patch_spacing {self.patch_spacing} has {len(self.patch_spacing)} entries but the "
                             f"patch has {patch_ndim} spatial dims; pass the nnU-Net configuration's spacing")
        d = self.input_space.ndim
        if patch_ndim == d:
            return tuple(range(d)), None
        if patch_ndim == d + 1:
            if not 0 <= self.slice_axis < patch_ndim:
                raise ValueError(f"slice_axis={self.slice_axis} is not a spatial axis of a {patch_ndim}D patch")
            return tuple(a for a in range(patch_ndim) if a != self.slice_axis), self.slice_axis
        raise ValueError(f"a {d}D promptable model cannot take {patch_ndim}D patches (only {d}D, or {d + 1}D "
                         "slice-wise)")

    # ------------------------------------------------------------------ patch -> model
    def to_model(self, images: Tensor, roi_mask: Optional[Tensor] = None, keep_empty: bool = True) -> ModelBatch:
        """Build the queries for a batch of patches.

        Args:
            images: ``(B, C, *patch)`` nnU-Net-normalised images (2D or 3D patches).
            roi_mask: the region of interest from the *predicted* foreground, soft or hard: ``(B, *patch)``
                (one ROI per sample) or ``(B, R, *patch)`` (one ROI per sample and channel, e.g. per class);
                ``None`` for the whole patch. The ROI is the bounding box of ``roi_mask >= roi_threshold``.
            keep_empty: an empty ROI becomes the whole patch (in slice-wise mode: every slice of that
                sample and channel); with ``False`` it produces no query.
        Returns:
            a :class:`ModelBatch` with ``images (Q, C, *input_space.size)``; queries are ordered by sample, then
            channel, then slice, then tile.
        """
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (B, C, *patch) with a 2D or 3D patch, got {tuple(images.shape)}")
        batch, patch_shape = images.shape[0], tuple(images.shape[2:])
        model_axes, slice_axis = self._layout(len(patch_shape))
        device = images.device
        if roi_mask is None:
            roi = torch.ones((batch, 1, *patch_shape), dtype=torch.bool, device=device)
        else:
            roi = roi_mask if roi_mask.dtype == torch.bool else roi_mask >= self.roi_threshold
            if roi.dim() == images.dim() - 1:
                roi = roi.unsqueeze(1)
            if roi.shape[0] != batch or tuple(roi.shape[2:]) != patch_shape:
                raise ValueError(f"roi_mask must be (B, *patch) or (B, R, *patch) matching images "
                                 f"{tuple(images.shape)}, got {tuple(roi_mask.shape)}")
        num_channels = roi.shape[1]

        with _no_autocast(device):
            if slice_axis is None:
                rows_mask = roi.flatten(0, 1)  # (B * R, *patch)
                lo, hi, nonempty = bounding_boxes(rows_mask)
                keep = torch.ones_like(nonempty) if keep_empty else nonempty
                rows = keep.nonzero(as_tuple=True)[0]
                sample, channel, slices = rows // num_channels, rows % num_channels, None
            else:
                moved = roi.movedim(2 + slice_axis, 2)  # (B, R, Z, *inplane)
                depth = moved.shape[2]
                rows_mask = moved.flatten(0, 2)
                lo, hi, nonempty = bounding_boxes(rows_mask)
                keep = nonempty
                if keep_empty:
                    whole_empty = ~nonempty.view(-1, depth).any(1, keepdim=True)
                    keep = keep | whole_empty.expand(-1, depth).reshape(-1)
                rows = keep.nonzero(as_tuple=True)[0]
                sample = rows // (num_channels * depth)
                channel = (rows // depth) % num_channels
                slices = rows % depth
            lo, hi = lo[rows].float(), hi[rows].float()
            inplane = tuple(patch_shape[a] for a in model_axes)
            spacing = torch.tensor([self.patch_spacing[a] for a in model_axes], device=device)
            if self.input_space.spacing_mm is not None:
                tile_of, scale, offset = self._fixed_spacing_windows(lo, hi, spacing, inplane)
            else:
                tile_of = torch.arange(rows.shape[0], device=device)
                scale, offset = self._resize_windows(lo, hi, spacing, inplane)

            model_batch = ModelBatch(
                images=None,
                sample_index=sample[tile_of],
                channel_index=channel[tile_of],
                slice_index=None if slices is None else slices[tile_of],
                scale=scale,
                offset=offset,
                model_axes=model_axes,
                slice_axis=slice_axis,
                patch_shape=patch_shape,
                size=tuple(self.input_space.size),
                batch_size=batch,
                num_channels=num_channels,
                antialias=self.antialias,
            )
            if self.pad_value == "min":
                pad = images.float().flatten(2).amin(2)  # (B, C)
            else:
                pad = float(self.pad_value)
            model_batch.images = model_batch.patch_to_model(images, pad_value=pad)
        return model_batch

    def _fit(self, offset: Tensor, scale: Tensor, inplane: Sequence[int], align_start: bool) -> Tensor:
        """Shift windows (``offset``/``scale`` ``(N, d)``) to show as much of the patch as possible."""
        size = torch.tensor(self.input_space.size, device=offset.device, dtype=torch.float32)
        extent = torch.tensor(inplane, device=offset.device, dtype=torch.float32)
        at_start = -0.5 + 0.5 * scale  # window starts where the patch starts
        at_end = extent - 0.5 - (size - 0.5) * scale  # window ends where the patch ends
        fitted = torch.minimum(torch.maximum(offset, torch.minimum(at_start, at_end)),
                               torch.maximum(at_start, at_end))
        if align_start:
            fitted = torch.where(at_start >= at_end, at_start, fitted)
        return fitted

    def _fixed_spacing_windows(self, lo: Tensor, hi: Tensor, spacing: Tensor,
                               inplane: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
        """Windows at the model's spacing; ROIs larger than a window are tiled.

        Returns ``tile_of (T,)`` (the ROI row of each tile), ``scale (T, d)`` and ``offset (T, d)``."""
        device = lo.device
        size = torch.tensor(self.input_space.size, device=device, dtype=torch.float32)
        target = torch.tensor(self.input_space.spacing_mm, device=device, dtype=torch.float32)
        extent = torch.tensor(inplane, device=device, dtype=torch.float32)
        scale = (target / spacing).expand_as(lo).contiguous()  # patch voxels per model voxel
        margin = self.roi_margin * size * scale
        box_lo = torch.maximum(lo - 0.5 - margin, torch.full_like(lo, -0.5))
        box_hi = torch.minimum(hi + 0.5 + margin, extent - 0.5)
        length = box_hi - box_lo
        window = size * scale
        step = window * (1.0 - self.tile_overlap)
        tiles = torch.where(length > window * (1 + 1e-6), torch.ceil((length - window) / step - 1e-6) + 1,
                            torch.ones_like(length)).long()  # (N, d)

        counts = tiles.prod(1)
        total = int(counts.sum().item())
        tile_of = torch.repeat_interleave(torch.arange(lo.shape[0], device=device), counts, output_size=total)
        local = torch.arange(total, device=device) - (torch.cumsum(counts, 0) - counts)[tile_of]
        position = torch.empty((total, lo.shape[1]), dtype=torch.long, device=device)
        stride = torch.ones_like(counts)
        for axis in reversed(range(lo.shape[1])):  # C-order enumeration of the tile grid
            position[:, axis] = (local // stride[tile_of]) % tiles[tile_of, axis]
            stride = stride * tiles[:, axis]

        centred = self._fit((lo + hi) / 2 - scale * (size - 1) / 2, scale, inplane, align_start=False) \
            if self.fit_to_patch else (lo + hi) / 2 - scale * (size - 1) / 2
        n = tiles[tile_of].float()
        spread = (length - window)[tile_of] / (n - 1).clamp_min(1)
        tiled = box_lo[tile_of] + position.float() * spread + 0.5 * scale[tile_of]
        offset = torch.where(n > 1, tiled, centred[tile_of])
        return tile_of, scale[tile_of], offset

    def _resize_windows(self, lo: Tensor, hi: Tensor, spacing: Tensor,
                        inplane: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """Square-in-mm windows whose longest side holds the ROI plus margin. Returns ``scale``, ``offset``."""
        size = torch.tensor(self.input_space.size, device=lo.device, dtype=torch.float32)
        extent_mm = (hi - lo + 1) * spacing
        voxel_mm = (extent_mm / (size * (1 - 2 * self.roi_margin))).amax(1, keepdim=True)  # model voxel size
        if self.max_zoom is not None:
            voxel_mm = voxel_mm.clamp_min(float(spacing.min()) / self.max_zoom)
        scale = voxel_mm / spacing
        offset = (lo + hi) / 2 - scale * (size - 1) / 2
        if self.fit_to_patch:
            offset = self._fit(offset, scale, inplane, align_start=self.resize_align == "start")
        return scale, offset

    # ------------------------------------------------------------------ model -> patch
    def to_patch(self, model_values: Tensor, model_batch: ModelBatch, patch_shape: Optional[Sequence[int]] = None,
                 activation: Optional[str] = None) -> Tuple[Tensor, Tensor]:
        """Put per-query model outputs back onto the patch grid.

        Args:
            model_values: ``(Q, 1, *grid)`` logits or probabilities on any grid spanning the window (the model
                input ``size`` or the decoder's ``low_res_size``).
            model_batch: the queries (their geometry, sample and channel indices).
            patch_shape: optional check of the patch's spatial shape.
            activation: ``None`` or ``"sigmoid"``; applied after interpolation onto the patch grid and before
                overlapping queries are averaged (so logits are interpolated, probabilities averaged).
        Returns:
            ``values (B, K, *patch)`` float32, the mean over the queries covering each voxel (0 where none does),
            and ``valid (B, K, *patch)`` bool, true where at least one query of that sample and channel covers
            the voxel. ``K = model_batch.num_channels``.
        """
        if patch_shape is not None and tuple(patch_shape) != tuple(model_batch.patch_shape):
            raise ValueError(f"patch_shape {tuple(patch_shape)} differs from the batch's {model_batch.patch_shape}")
        if model_values.shape[1] != 1:
            raise ValueError(f"model_values must have one channel per query, got {tuple(model_values.shape)}")
        if activation not in (None, "sigmoid"):
            raise ValueError(f"activation must be None or 'sigmoid', got {activation!r}")
        b, k, mb = model_batch.batch_size, model_batch.num_channels, model_batch
        device = model_values.device
        with _no_autocast(device):
            values, covered = mb.model_to_patch(model_values)
            values = values[:, 0]
            if activation == "sigmoid":
                values = torch.sigmoid(values)
            weight = covered.float()
            values = values * weight
            if mb.slice_axis is None:
                flat_index = mb.sample_index * k + mb.channel_index
                shape = (b * k, *mb.patch_shape)
                total = values.new_zeros(shape).index_add(0, flat_index, values)
                count = values.new_zeros(shape).index_add(0, flat_index, weight)
                total, count = total.view(b, k, *mb.patch_shape), count.view(b, k, *mb.patch_shape)
            else:
                depth = mb.patch_shape[mb.slice_axis]
                shape = (b, k, depth, *mb.inplane_shape)
                index = (mb.sample_index, mb.channel_index, mb.slice_index)
                total = values.new_zeros(shape).index_put(index, values, accumulate=True)
                count = values.new_zeros(shape).index_put(index, weight, accumulate=True)
                total = total.movedim(2, 2 + mb.slice_axis)
                count = count.movedim(2, 2 + mb.slice_axis)
            valid = count > 0
            return total / count.clamp_min(1e-12), valid


# ----------------------------------------------------------------------------------------------------------------
# deep supervision
# ----------------------------------------------------------------------------------------------------------------
def downsample_to_scales(values: Tensor, valid: Tensor, scales: Sequence[Union[float, Sequence[float]]],
                         min_valid_fraction: float = 0.5) -> List[Tuple[Tensor, Tensor]]:
    """Pseudo-labels and validity at nnU-Net's deep-supervision resolutions.

    Args:
        values: ``(B, K, *patch)`` probabilities (or any soft map).
        valid: ``(B, *patch)`` or ``(B, K, *patch)`` bool.
        scales: nnU-Net's ``deep_supervision_scales``, e.g. ``[[1, 1, 1], [0.5, 0.5, 0.5], ...]`` (a scalar per
            level is allowed); the level shape is ``round(patch * scale)``, as nnU-Net downsamples its targets.
        min_valid_fraction: a coarse voxel is valid when at least this fraction of the fine voxels it pools is.
    Returns:
        one ``(values, valid)`` pair per scale; values are averages over the valid fine voxels only
        (area pooling), so invalid voxels never leak into a valid coarse voxel.
    """
    spatial = tuple(values.shape[2:])
    ndim = len(spatial)
    pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(ndim)
    if pool is None:
        raise ValueError(f"values must be (B, K, *patch) with a 2D or 3D patch, got {tuple(values.shape)}")
    per_channel = valid.dim() == values.dim()
    weight = (valid if per_channel else valid.unsqueeze(1)).float()
    out = []
    for s in scales:
        factors = [float(f) for f in s] if hasattr(s, "__len__") else [float(s)] * ndim
        if len(factors) != ndim:
            raise ValueError(f"deep-supervision scale {s} does not have {ndim} entries")
        shape = tuple(int(round(n * f)) for n, f in zip(spatial, factors))
        if shape == spatial:
            out.append((values, valid))
            continue
        pooled_weight = pool(weight, shape)
        pooled = pool(values.float() * weight, shape) / pooled_weight.clamp_min(1e-12)
        level_valid = pooled_weight >= min_valid_fraction - 1e-6
        pooled = pooled * level_valid
        out.append((pooled, level_valid if per_channel else level_valid[:, 0]))
    return out
