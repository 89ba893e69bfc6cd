"""Stitching the slices of a 3D patch into 2D canvases for a 2D promptable model, and back.

SFR (Stitching, Fine-tuning, Re-training) adapts a 2D SAM to 3D volumes by laying the slices of a 3D crop
side by side on the 2D model's input canvas (256 x 256 for LiteMedSAM, 1024 x 1024 for SAM ViT), so that
the model sees many slices of one case at once, at their native resolution. This module provides that
layout with an exact inverse, so that a prediction made on the canvases (logits, probabilities, labels)
can be carried back onto the 3D grid voxel for voxel.

Layout
------
All slices of a stack have the same size ``h x w`` and the canvas is ``H x W`` (:func:`plan_stitch`):

* the canvas is cut into a grid of ``rows = H // h`` by ``cols = W // w`` tiles of
  ``tile = (H // rows, W // cols)`` pixels; the few pixels that the integer tile size leaves over
  (``H - rows * tile_h`` < ``rows``) are split around the grid (``grid_offset``);
* each slice sits centred in its tile: ``pad_before = ((tile_h - h) // 2, (tile_w - w) // 2)``, the odd
  pixel, if any, going after the slice (bottom / right), as in the public SFR code, which pads every tile
  by about ``(canvas / n - h) / 2`` on both sides;
* slice ``k`` goes to canvas ``k // T`` (``T = rows * cols`` tiles per canvas), at tile position
  ``j = k % T``, i.e. grid row ``j // cols`` and grid column ``j % cols`` (row-major, as SFR's
  ``(k // n, k % n)``);
* padding and tiles that receive no slice (the tail of the last canvas) hold ``fill_value`` (0) in
  images and ``ignore_label`` in labels; :func:`valid_mask` marks exactly the pixels that carry a voxel,
  so losses and metrics can skip the rest.

Difference from the public SFR code: there, the ``S`` slices of a crop go on *one* canvas with an
``n x n`` grid, so when ``n * n < S`` the slices beyond the grid are silently dropped (they are neither
seen by the model nor supervised). Here no slice is ever dropped: when a canvas is full the next slice
starts a new one, and ``num_canvases = ceil(S / T)``. For a batch of ``B`` stacks the canvases are
ordered sample-major: canvas ``c`` of sample ``b`` is row ``b * num_canvases + c``.

Slices larger than the canvas along either side are refused with a :class:`ValueError`: the layout never
resamples, so that stitching stays an exact, lossless permutation of voxels. Resample or crop the patch
first (the error message gives the factor needed), e.g. with ``torch.nn.functional.interpolate``.

3D volumes ``(B, C, X0, X1, X2)`` are cut along one spatial ``axis`` (0, 1 or 2, counted among the spatial
axes only); a slice keeps the two other spatial axes in their order, e.g. ``axis=1`` gives ``X0 x X2``
slices. A batch of 2D patches ``(N, C, h, w)`` (nnU-Net's ``2d`` configuration) is stitched with
:func:`stitch_slices`, which treats consecutive groups of ``layout.num_slices`` patches as the slices of
one stack (plan with ``num_slices = N`` to put the whole batch on shared canvases); the 3D functions are
the same operation after moving the slice axis in front of the slice plane.

Implementation and complexity
-----------------------------
Every slice voxel has one destination on the canvases: ``canvas * H * W + (row0 + i) * W + (col0 + j)``.
That flat index (``S * h * w`` int64 values, built once per layout and device and cached) drives a single
``index_copy_`` to stitch and a single ``index_select`` to un-stitch, for all samples and channels at once;
the data path has no Python loop over samples, slices, tiles or voxels (only :func:`plan_stitch` walks the
``S`` slices once to record their offsets). Time and memory are
``O(B * C * (S * h * w + num_canvases * H * W))``, i.e. linear in the data moved, plus the cached index
(the 16 most recent layout / device pairs are kept). Both directions are differentiable (autograd passes
gradients back through the gather / scatter).

:func:`random_monotone_curves` is SFR's fine-tuning intensity augmentation: each slice is, with
probability ``p``, mapped through its own random monotone cubic Bezier curve applied within the slice's
own min-max range (vectorised over slices: one lookup table per slice, O(1) per voxel).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

__all__ = [
    "StitchLayout",
    "plan_stitch",
    "plan_stitch_volume",
    "slice_shape_along",
    "stitch_images",
    "stitch_labels",
    "unstitch",
    "stitch_slices",
    "stitch_label_slices",
    "unstitch_slices",
    "valid_mask",
    "slice_index_map",
    "random_monotone_curves",
]


# ----------------------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StitchLayout:
    """Where every slice of a stack lies on the canvases (build it with :func:`plan_stitch`).

    All sizes are ``(rows, cols)`` pairs in pixels; ``slice_row[k]`` / ``slice_col[k]`` are the canvas
    coordinates of the top-left pixel of slice ``k`` on canvas ``slice_canvas[k]``.
    """

    slice_shape: Tuple[int, int]
    num_slices: int
    canvas_size: Tuple[int, int]
    grid: Tuple[int, int]
    tile_size: Tuple[int, int]
    pad_before: Tuple[int, int]
    grid_offset: Tuple[int, int]
    num_canvases: int
    slice_canvas: Tuple[int, ...]
    slice_row: Tuple[int, ...]
    slice_col: Tuple[int, ...]

    @property
    def tiles_per_canvas(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pad_after(self) -> Tuple[int, int]:
        """Padding after the slice inside its tile (bottom, right)."""
        return (self.tile_size[0] - self.slice_shape[0] - self.pad_before[0],
                self.tile_size[1] - self.slice_shape[1] - self.pad_before[1])

    @property
    def num_empty_tiles(self) -> int:
        return self.num_canvases * self.tiles_per_canvas - self.num_slices

    @property
    def fill_fraction(self) -> float:
        """Fraction of canvas pixels that carry a voxel."""
        h, w = self.slice_shape
        H, W = self.canvas_size
        return self.num_slices * h * w / float(self.num_canvases * H * W)

    def slice_position(self, k: int) -> Tuple[int, int, int]:
        """``(canvas, row, col)`` of the top-left pixel of slice ``k``."""
        return self.slice_canvas[k], self.slice_row[k], self.slice_col[k]


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(value, Sequence) or (isinstance(value, Tensor) and value.dim() == 1):
        items = tuple(value)
        if len(items) != 2:
            raise ValueError(f"{name} must have 2 entries (rows, cols), got {value!r}")
    else:
        items = (value, value)
    pair = tuple(_as_int(v, name) for v in items)
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair[0], pair[1]


def plan_stitch(slice_shape: Tuple[int, int], num_slices: int,
                canvas_size: Union[int, Tuple[int, int]]) -> StitchLayout:
    """Plan the canvases for ``num_slices`` slices of ``slice_shape`` on canvases of ``canvas_size``.

    Raises :class:`ValueError` when a slice does not fit on the canvas (resample or crop first).
    """
    h, w = _pair(slice_shape, "slice_shape")
    H, W = _pair(canvas_size, "canvas_size")
    num_slices = _as_int(num_slices, "num_slices")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if h > H or w > W:
        factor = max(h / H, w / W)
        raise ValueError(
            f"slices of {h}x{w} do not fit on a {H}x{W} canvas; stitching never resamples. Downscale or "
            f"resample the patch first (by a factor >= {factor:.4g} in the slice plane) or crop it to at most "
            f"{H}x{W} per slice")
    rows, cols = H // h, W // w
    tile_h, tile_w = H // rows, W // cols
    pad = ((tile_h - h) // 2, (tile_w - w) // 2)
    off = ((H - rows * tile_h) // 2, (W - cols * tile_w) // 2)
    per_canvas = rows * cols
    num_canvases = -(-num_slices // per_canvas)
    canv, rr, cc = [], [], []
    for k in range(num_slices):  # metadata only: O(S) integers
        j = k % per_canvas
        canv.append(k // per_canvas)
        rr.append(off[0] + (j // cols) * tile_h + pad[0])
        cc.append(off[1] + (j % cols) * tile_w + pad[1])
    return StitchLayout(slice_shape=(h, w), num_slices=num_slices, canvas_size=(H, W), grid=(rows, cols),
                        tile_size=(tile_h, tile_w), pad_before=pad, grid_offset=off,
                        num_canvases=num_canvases, slice_canvas=tuple(canv), slice_row=tuple(rr),
                        slice_col=tuple(cc))


def _norm_axis(axis: int) -> int:
    axis = _as_int(axis, "axis")
    if not -3 <= axis <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of the 3D volume), got {axis}")
    return axis % 3


def slice_shape_along(spatial_shape: Sequence[int], axis: int) -> Tuple[Tuple[int, int], int]:
    """``((h, w), num_slices)`` of a 3D ``spatial_shape`` cut along spatial ``axis``."""
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3:
        raise ValueError(f"spatial_shape must have 3 entries, got {spatial_shape!r}")
    a = _norm_axis(axis)
    rest = tuple(s for i, s in enumerate(shape) if i != a)
    return (rest[0], rest[1]), shape[a]


def plan_stitch_volume(spatial_shape: Sequence[int], axis: int,
                       canvas_size: Union[int, Tuple[int, int]]) -> StitchLayout:
    """:func:`plan_stitch` for a 3D patch of ``spatial_shape`` sliced along spatial ``axis``."""
    plane, n = slice_shape_along(spatial_shape, axis)
    return plan_stitch(plane, n, canvas_size)


# ----------------------------------------------------------------------------------------------------------------
# index maps
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _dest_index(layout: StitchLayout, device: torch.device) -> Tensor:
    """Flat destination (over ``num_canvases * H * W``) of every slice voxel, shape ``(S * h * w,)``."""
    h, w = layout.slice_shape
    W = layout.canvas_size[1]
    HW = layout.canvas_size[0] * W
    base = (torch.tensor(layout.slice_canvas, dtype=torch.int64) * HW
            + torch.tensor(layout.slice_row, dtype=torch.int64) * W
            + torch.tensor(layout.slice_col, dtype=torch.int64))
    inner = (torch.arange(h, dtype=torch.int64)[:, None] * W + torch.arange(w, dtype=torch.int64)[None, :])
    return (base[:, None] + inner.reshape(1, -1)).reshape(-1).to(device)


def _check_layout(layout) -> None:
    if not isinstance(layout, StitchLayout):
        raise TypeError(f"layout must be a StitchLayout (see plan_stitch), got {type(layout).__name__}")


def slice_index_map(layout: StitchLayout, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """``(num_canvases, H, W)`` int64: the index of the slice each canvas pixel shows, -1 on padding."""
    _check_layout(layout)
    H, W = layout.canvas_size
    h, w = layout.slice_shape
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.full((layout.num_canvases * H * W,), -1, dtype=torch.int64, device=dev)
    src = torch.arange(layout.num_slices, dtype=torch.int64, device=dev).repeat_interleave(h * w)
    out.index_copy_(0, _dest_index(layout, dev), src)
    return out.view(layout.num_canvases, H, W)


def valid_mask(layout: StitchLayout, device: Optional[Union[str, torch.device]] = None,
               batch_size: Optional[int] = None) -> Tensor:
    """Bool mask of the canvas pixels that carry a voxel: ``(num_canvases, H, W)``.

    With ``batch_size`` the mask is repeated for that many stacks: ``(batch_size * num_canvases, H, W)``,
    matching the rows of :func:`stitch_images` / :func:`stitch_labels`.
    """
    _check_layout(layout)
    H, W = layout.canvas_size
    dev = torch.device(device) if device is not None else torch.device("cpu")
    m = torch.zeros(layout.num_canvases * H * W, dtype=torch.bool, device=dev)
    m[_dest_index(layout, dev)] = True
    m = m.view(layout.num_canvases, H, W)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        m = m.repeat(batch_size, 1, 1)
    return m


# ----------------------------------------------------------------------------------------------------------------
# core: stacks (B, C, S, h, w) <-> canvases (B * num_canvases, C, H, W)
# ----------------------------------------------------------------------------------------------------------------
def _stitch_stack(stack: Tensor, layout: StitchLayout, fill_value) -> Tensor:
    B, C, S, h, w = stack.shape
    H, W = layout.canvas_size
    nc = layout.num_canvases
    out = stack.new_full((B * C, nc * H * W), fill_value)
    out.index_copy_(1, _dest_index(layout, stack.device), stack.reshape(B * C, S * h * w))
    return out.view(B, C, nc, H, W).transpose(1, 2).reshape(B * nc, C, H, W)


def _unstitch_stack(canvases: Tensor, layout: StitchLayout) -> Tensor:
    N, K, H, W = canvases.shape
    nc = layout.num_canvases
    B = N // nc
    h, w = layout.slice_shape
    flat = canvases.reshape(B, nc, K, H * W).transpose(1, 2).reshape(B * K, nc * H * W)
    vals = flat.index_select(1, _dest_index(layout, canvases.device))
    return vals.view(B, K, layout.num_slices, h, w)


def _check_canvases(canvases: Tensor, layout: StitchLayout, what: str) -> Tuple[Tensor, bool]:
    """Accept ``(B * nc, K, H, W)`` or ``(B * nc, H, W)``; return a 4D view and whether a channel was added."""
    _check_layout(layout)
    if not isinstance(canvases, Tensor):
        raise TypeError(f"{what}: canvases must be a torch.Tensor, got {type(canvases).__name__}")
    squeeze = canvases.dim() == 3
    if squeeze:
        canvases = canvases.unsqueeze(1)
    if canvases.dim() != 4:
        raise ValueError(f"{what}: canvases must be (B * num_canvases, K, H, W) or (B * num_canvases, H, W), "
                         f"got shape {tuple(canvases.shape)}")
    H, W = layout.canvas_size
    if tuple(canvases.shape[-2:]) != (H, W):
        raise ValueError(f"{what}: canvases are {tuple(canvases.shape[-2:])}, the layout's canvas is {(H, W)}")
    if canvases.shape[0] % layout.num_canvases != 0:
        raise ValueError(f"{what}: {canvases.shape[0]} canvases is not a multiple of the layout's "
                         f"{layout.num_canvases} canvases per stack")
    return canvases, squeeze


def _check_labels_fill(labels: Tensor, ignore_label) -> None:
    if labels.dtype == torch.bool:
        raise TypeError("labels must be an integer (or float) tensor, not bool: a bool tensor cannot hold "
                        "ignore_label")
    if labels.is_complex():
        raise TypeError(f"labels must be an integer or float tensor, got {labels.dtype}")
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, (int, float)):
        raise TypeError(f"ignore_label must be a number, got {ignore_label!r}")
    if not labels.is_floating_point():
        if float(ignore_label) != int(ignore_label):
            raise ValueError(f"ignore_label {ignore_label!r} is not an integer but labels are {labels.dtype}")
        info = torch.iinfo(labels.dtype)
        if not info.min <= int(ignore_label) <= info.max:
            raise ValueError(f"ignore_label {ignore_label} does not fit labels of dtype {labels.dtype} "
                             f"([{info.min}, {info.max}])")


# ----------------------------------------------------------------------------------------------------------------
# 2D stacks: (N, C, h, w) with N = B * num_slices
# ----------------------------------------------------------------------------------------------------------------
def _slices_as_stack(slices: Tensor, layout: StitchLayout, what: str) -> Tensor:
    _check_layout(layout)
    if not isinstance(slices, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(slices).__name__}")
    if slices.dim() != 4:
        raise ValueError(f"{what}: slices must be (N, C, h, w), got shape {tuple(slices.shape)}")
    N, C, h, w = slices.shape
    if (h, w) != layout.slice_shape:
        raise ValueError(f"{what}: slices are {h}x{w}, the layout was planned for "
                         f"{layout.slice_shape[0]}x{layout.slice_shape[1]}")
    S = layout.num_slices
    if N % S != 0:
        raise ValueError(f"{what}: {N} slices is not a multiple of the layout's {S} slices per stack")
    return slices.reshape(N // S, S, C, h, w).transpose(1, 2)


def stitch_slices(slices: Tensor, layout: StitchLayout, fill_value: float = 0.0) -> Tensor:
    """Stitch 2D slices ``(N, C, h, w)`` onto canvases ``(N // S * num_canvases, C, H, W)``.

    ``N`` must be a multiple of ``S = layout.num_slices``; each consecutive group of ``S`` slices is one
    stack with its own canvases. For nnU-Net's 2d configuration plan with ``num_slices = batch size``.
    """
    return _stitch_stack(_slices_as_stack(slices, layout, "stitch_slices"), layout, fill_value)


def stitch_label_slices(labels: Tensor, layout: StitchLayout, ignore_label: int) -> Tensor:
    """Stitch 2D label slices ``(N, h, w)`` onto ``(N // S * num_canvases, H, W)``, ``ignore_label`` elsewhere."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"stitch_label_slices: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 3:
        raise ValueError(f"stitch_label_slices: labels must be (N, h, w), got shape {tuple(labels.shape)}")
    _check_labels_fill(labels, ignore_label)
    stack = _slices_as_stack(labels.unsqueeze(1), layout, "stitch_label_slices")
    return _stitch_stack(stack, layout, ignore_label)[:, 0]


def unstitch_slices(canvases: Tensor, layout: StitchLayout) -> Tensor:
    """Inverse of :func:`stitch_slices`: ``(B * num_canvases, K, H, W)`` -> ``(B * S, K, h, w)``.

    3D input ``(B * num_canvases, H, W)`` (e.g. stitched labels) gives ``(B * S, h, w)``.
    """
    canvases, squeeze = _check_canvases(canvases, layout, "unstitch_slices")
    stack = _unstitch_stack(canvases, layout)  # (B, K, S, h, w)
    B, K, S, h, w = stack.shape
    out = stack.transpose(1, 2).reshape(B * S, K, h, w)
    return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------------------------
# 3D volumes: (B, C, X0, X1, X2) sliced along a spatial axis
# ----------------------------------------------------------------------------------------------------------------
def _volume_as_stack(volume: Tensor, layout: StitchLayout, axis: int, what: str) -> Tensor:
    _check_layout(layout)
    if not isinstance(volume, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(volume).__name__}")
    if volume.dim() != 5:
        raise ValueError(f"{what}: expected a (B, C, X0, X1, X2) volume, got shape {tuple(volume.shape)}")
    a = _norm_axis(axis)
    plane, n = slice_shape_along(volume.shape[2:], a)
    if plane != layout.slice_shape or n != layout.num_slices:
        raise ValueError(f"{what}: along axis {a} the volume {tuple(volume.shape[2:])} has {n} slices of "
                         f"{plane[0]}x{plane[1]}, the layout was planned for {layout.num_slices} slices of "
                         f"{layout.slice_shape[0]}x{layout.slice_shape[1]}")
    return volume.movedim(2 + a, 2)


def stitch_images(volume: Tensor, layout: StitchLayout, axis: int, fill_value: float = 0.0) -> Tensor:
    """Stitch ``(B, C, X0, X1, X2)`` sliced along spatial ``axis`` into ``(B * num_canvases, C, H, W)``.

    Padding and empty tiles hold ``fill_value``; dtype and device are kept.
    """
    return _stitch_stack(_volume_as_stack(volume, layout, axis, "stitch_images"), layout, fill_value)


def stitch_labels(labels: Tensor, layout: StitchLayout, axis: int, ignore_label: int) -> Tensor:
    """Stitch a label volume ``(B, X0, X1, X2)`` into ``(B * num_canvases, H, W)``.

    Padding and empty tiles hold ``ignore_label``, which must fit the labels' dtype. nnU-Net's
    ``(B, 1, X0, X1, X2)`` targets are passed as ``target[:, 0]``.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"stitch_labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 4:
        raise ValueError(f"stitch_labels: labels must be (B, X0, X1, X2) (pass nnU-Net targets as target[:, 0]), "
                         f"got shape {tuple(labels.shape)}")
    _check_labels_fill(labels, ignore_label)
    stack = _volume_as_stack(labels.unsqueeze(1), layout, axis, "stitch_labels")
    return _stitch_stack(stack, layout, ignore_label)[:, 0]


def unstitch(canvases: Tensor, layout: StitchLayout, axis: int) -> Tensor:
    """Inverse of :func:`stitch_images`: ``(B * num_canvases, K, H, W)`` -> ``(B, K, X0, X1, X2)``.

    Works for any channel count ``K`` (logits, probabilities); 3D input ``(B * num_canvases, H, W)``
    (e.g. stitched labels or an argmax) gives ``(B, X0, X1, X2)``. Padding is discarded.
    """
    a = _norm_axis(axis)
    canvases, squeeze = _check_canvases(canvases, layout, "unstitch")
    out = _unstitch_stack(canvases, layout).movedim(2, 2 + a)
    return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------------------
def _monotone_interp(xq: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Row-wise piecewise-linear interpolation of the non-decreasing polylines ``(xs, ys)`` at ``xq``.

    ``xs`` / ``ys``: ``(R, M)`` non-decreasing, from 0 to 1; ``xq``: ``(R, Q)`` in ``[0, 1]``. Each result is
    clamped into its segment's ``[y0, y1]``, so the output is non-decreasing in ``xq`` despite rounding.
    """
    m = xs.shape[1]
    j = torch.searchsorted(xs, xq.contiguous()).clamp(1, m - 1)
    x0, x1 = xs.gather(1, j - 1), xs.gather(1, j)
    y0, y1 = ys.gather(1, j - 1), ys.gather(1, j)
    dx = x1 - x0
    wgt = torch.where(dx > 0, (xq - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.ones_like(xq))
    y = y0 + wgt.clamp(0.0, 1.0) * (y1 - y0)
    return torch.minimum(torch.maximum(y, y0), y1)


def random_monotone_curves(slices: Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None,
                           num_points: int = 257) -> Tensor:
    """Map each slice, with probability ``p``, through its own random monotone cubic Bezier curve.

    ``slices`` is ``(N, C, h, w)`` float. For a chosen slice, every channel is normalised by its own min-max
    range to ``[0, 1]``, mapped through the curve ``B(t) = (1-t)^3 P0 + 3(1-t)^2 t P1 + 3(1-t) t^2 P2 + t^3 P3``
    with ``P0 = (0, 0)``, ``P3 = (1, 1)`` and random ``P1, P2`` whose x and y coordinates are each sorted
    (so both coordinates are non-decreasing in ``t`` and the curve is a non-decreasing function of x), and
    mapped back to the same range. The order of intensities within a slice is kept (non-strictly), the
    minimum and maximum are kept exactly, and constant channels are unchanged. One curve per slice, shared
    by its channels; the decision to apply it is also per slice.

    The curve is tabulated at ``num_points`` equally spaced intensities (per slice, from the Bezier polyline
    through a batched ``searchsorted``); each voxel then reads its value by linear interpolation in its
    slice's table, O(1) per voxel. Returns a new tensor; ``p = 0`` returns an unchanged copy. Draws its random
    numbers from ``generator`` (on the generator's device) when given.
    """
    if not isinstance(slices, Tensor):
        raise TypeError(f"random_monotone_curves: expected a torch.Tensor, got {type(slices).__name__}")
    if slices.dim() != 4:
        raise ValueError(f"random_monotone_curves: slices must be (N, C, h, w), got shape {tuple(slices.shape)}")
    if not slices.is_floating_point():
        raise TypeError(f"random_monotone_curves: slices must be floating point, got {slices.dtype}")
    p = float(p)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"random_monotone_curves: p must be in [0, 1], got {p}")
    g = _as_int(num_points, "num_points")
    if g < 2:
        raise ValueError(f"random_monotone_curves: num_points must be >= 2, got {num_points}")
    N, C, h, w = slices.shape
    out = slices.clone()
    if p == 0.0 or out.numel() == 0:
        return out
    dev = slices.device
    gdev = generator.device if generator is not None else dev
    chosen = torch.rand(N, generator=generator, device=gdev) < p
    ctrl = torch.rand(N, 4, generator=generator, device=gdev)
    chosen = chosen.to(dev)
    idx = chosen.nonzero().squeeze(1)
    n = idx.numel()
    if n == 0:
        return out
    work = torch.float64 if slices.dtype == torch.float64 else torch.float32

    # per-slice curves: Bezier polyline over t, then a table over equally spaced intensities
    ctrl = ctrl.to(device=dev, dtype=work)[chosen]
    px = ctrl[:, :2].sort(dim=1).values
    py = ctrl[:, 2:].sort(dim=1).values
    t = torch.linspace(0.0, 1.0, 2 * g, device=dev, dtype=work)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    xs = px[:, :1] * b1 + px[:, 1:] * b2 + b3  # (n, 2g)
    ys = py[:, :1] * b1 + py[:, 1:] * b2 + b3
    for seq in (xs, ys):  # pin the end points, remove rounding wiggles
        seq[:, 0] = 0.0
        seq[:, -1] = 1.0
    xs, ys = torch.cummax(xs, dim=1).values, torch.cummax(ys, dim=1).values
    grid = torch.linspace(0.0, 1.0, g, device=dev, dtype=work).expand(n, g)
    table = _monotone_interp(grid, xs, ys)
    table[:, 0] = 0.0
    table[:, -1] = 1.0
    table = torch.cummax(table, dim=1).values.repeat_interleave(C, dim=0)  # (n * C, g)

    # per voxel: normalise, look up, map back
    v = slices.index_select(0, idx).to(work).reshape(n * C, h * w)
    lo = v.amin(dim=1, keepdim=True)
    hi = v.amax(dim=1, keepdim=True)
    span = hi - lo
    pos = ((v - lo) / torch.where(span > 0, span, torch.ones_like(span))).clamp_(0.0, 1.0).mul_(g - 1)
    i = pos.floor().long().clamp_(0, g - 2)
    y0, y1 = table.gather(1, i), table.gather(1, i + 1)
    y = torch.minimum(torch.maximum(y0 + (pos - i).clamp_(0.0, 1.0) * (y1 - y0), y0), y1)
    res = torch.where(y >= 1, hi.expand_as(y), lo + y * span)
    res = torch.minimum(torch.maximum(res, lo), hi)
    out.index_copy_(0, idx, res.reshape(n, C, h, w).to(slices.dtype))
    return out
