"""SFR-style stitching of 3D slices onto 2D canvases: layout, exact round trips, labels, masks, augmentation."""
import dataclasses
import math

import pytest
import torch

from nnunetv2_samssl.sam.stitching import (
    StitchLayout,
    plan_stitch,
    plan_stitch_volume,
    random_monotone_curves,
    slice_index_map,
    slice_shape_along,
    stitch_images,
    stitch_label_slices,
    stitch_labels,
    stitch_slices,
    unstitch,
    unstitch_slices,
    valid_mask,
)

IGNORE = 255
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def unique_volume(shape, dtype=torch.float32, device="cpu"):
    """Every voxel a different value, so any misplacement shows up."""
    return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape).to(dtype=dtype, device=device)


def reference_stitch(volume, layout, axis, fill=0.0):
    """Slow, obvious implementation straight from the layout's offsets."""
    B, C = volume.shape[:2]
    H, W = layout.canvas_size
    h, w = layout.slice_shape
    out = volume.new_full((B, layout.num_canvases, C, H, W), fill)
    for b in range(B):
        for k in range(layout.num_slices):
            c, r, q = layout.slice_position(k)
            out[b, c, :, r:r + h, q:q + w] = volume[b].select(1 + axis, k)
    return out.reshape(B * layout.num_canvases, C, H, W)


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------
def test_layout_matches_sfr_grid_and_never_drops_slices():
    lay = plan_stitch((64, 64), 70, 256)
    assert isinstance(lay, StitchLayout)
    assert lay.grid == (4, 4) and lay.tiles_per_canvas == 16 and lay.tile_size == (64, 64)
    assert lay.num_canvases == 5 and lay.num_empty_tiles == 5 * 16 - 70
    for k in range(70):  # SFR order: canvas k // T, tile (j // n, j % n)
        j = k % 16
        assert lay.slice_position(k) == (k // 16, (j // 4) * 64, (j % 4) * 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.num_canvases = 1


@pytest.mark.parametrize("slice_shape,canvas", [((20, 32), 256), ((80, 80), 256), ((7, 13), 64),
                                                ((33, 50), (100, 160)), ((64, 64), 64), ((1, 1), 5)])
def test_tiles_are_centred(slice_shape, canvas):
    lay = plan_stitch(slice_shape, 50, canvas)
    H, W = lay.canvas_size
    h, w = slice_shape
    rows, cols = lay.grid
    assert rows == H // h and cols == W // w
    assert lay.tile_size == (H // rows, W // cols)
    for before, after in zip(lay.pad_before, lay.pad_after):
        assert 0 <= after - before <= 1  # padding split around the slice, odd pixel after
    for extra, off, tiles, tile in zip((H, W), lay.grid_offset, lay.grid, lay.tile_size):
        left = extra - tiles * tile
        assert 0 <= left < tiles and off == left // 2
    # SFR example: 80x80 slices on 256 -> n = 3, tiles of 85, 2 px before and 3 after
    if slice_shape == (80, 80):
        assert lay.grid == (3, 3) and lay.tile_size == (85, 85) and lay.pad_before == (2, 2)
        assert lay.slice_position(4) == (0, 85 + 2, 85 + 2)
    # the padding around every slice inside its own tile is centred on the canvas too
    idx = slice_index_map(lay)
    k = 0
    rr, cc = torch.nonzero(idx[0] == k, as_tuple=True)
    assert rr.min() == lay.grid_offset[0] + lay.pad_before[0] and rr.max() == rr.min() + h - 1
    assert cc.min() == lay.grid_offset[1] + lay.pad_before[1] and cc.max() == cc.min() + w - 1


def test_slice_helpers():
    assert slice_shape_along((20, 32, 48), 0) == ((32, 48), 20)
    assert slice_shape_along((20, 32, 48), 1) == ((20, 48), 32)
    assert slice_shape_along((20, 32, 48), -1) == ((20, 32), 48)
    assert plan_stitch_volume((20, 32, 48), 1, 256) == plan_stitch((20, 48), 32, 256)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,canvas", [
    ((2, 1, 20, 32, 48), 256),   # along each axis below
    ((1, 2, 7, 13, 5), 64),      # odd sizes, 2 channels
    ((3, 1, 1, 30, 40), 64),     # one slice along axis 0
    ((1, 1, 3, 64, 64), 64),     # slices exactly the canvas size (along axis 0)
    ((2, 3, 9, 11, 17), (40, 56)),  # non-square canvas
])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_exact_and_matches_reference(shape, canvas, axis):
    spatial = shape[2:]
    H, W = (canvas, canvas) if isinstance(canvas, int) else canvas
    lay = plan_stitch_volume(spatial, axis, canvas)
    vol = unique_volume(shape)
    can = stitch_images(vol, lay, axis)
    assert can.shape == (shape[0] * lay.num_canvases, shape[1], H, W)
    assert torch.equal(can, reference_stitch(vol, lay, axis))
    assert torch.equal(unstitch(can, lay, axis), vol)
    # any channel count on the way back (e.g. K-class logits of the canvas prediction)
    logits = torch.randn(can.shape[0], 5, H, W)
    back = unstitch(logits, lay, axis)
    assert back.shape == (shape[0], 5, *spatial)
    m = valid_mask(lay, batch_size=shape[0])[:, None].expand_as(logits)
    assert torch.equal(stitch_images(back, lay, axis)[m], logits[m])


def test_exact_canvas_size_slices_one_per_canvas():
    lay = plan_stitch((64, 64), 3, 64)
    assert lay.grid == (1, 1) and lay.num_canvases == 3 and lay.fill_fraction == 1.0
    vol = unique_volume((1, 1, 3, 64, 64))
    can = stitch_images(vol, lay, 0)
    assert torch.equal(can[:, 0], vol[0, 0])
    assert bool(valid_mask(lay).all())


def test_more_slices_than_one_canvas_every_slice_once():
    B, S, h = 2, 70, 64
    lay = plan_stitch((h, h), S, 256)
    assert lay.num_canvases == 5
    vol = unique_volume((B, 1, S, h, h))
    can = stitch_images(vol, lay, 0, fill_value=-1.0)
    assert can.shape == (B * 5, 1, 256, 256)
    m = valid_mask(lay, batch_size=B)
    vals = can[:, 0][m]
    assert torch.equal(vals.sort().values, vol.flatten())  # each voxel exactly once, nothing dropped
    assert bool((can[:, 0][~m] == -1).all())
    idx = slice_index_map(lay)
    counts = torch.bincount(idx[idx >= 0], minlength=S)
    assert torch.equal(counts, torch.full((S,), h * h))
    assert int((idx == -1).sum()) == 5 * 16 * h * h - S * h * h  # 10 empty tiles
    assert torch.equal(unstitch(can, lay, 0), vol)


def test_axes_give_the_right_slices():
    vol = unique_volume((1, 1, 6, 7, 8))
    for axis in range(3):
        lay = plan_stitch_volume(vol.shape[2:], axis, 32)
        can = stitch_images(vol, lay, axis)
        h, w = lay.slice_shape
        for k in range(lay.num_slices):
            c, r, q = lay.slice_position(k)
            assert torch.equal(can[c, 0, r:r + h, q:q + w], vol[0, 0].select(axis, k))
        # slice k of axis a holds exactly the voxels with coordinate k along a
        coord = torch.arange(vol.shape[2 + axis]).view([-1 if i == axis else 1 for i in range(3)])
        coord = coord.expand(vol.shape[2:]).reshape(1, 1, *vol.shape[2:]).float()
        lab_map = stitch_images(coord, lay, axis, fill_value=-1)[:, 0]
        assert torch.equal(lab_map.long(), slice_index_map(lay))


# ------------------------------------------------------------------------------------------------
# labels and masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32])
def test_labels_ignore_on_padding_and_valid_mask(dtype):
    B, shape = 3, (9, 20, 24)
    axis = 1
    lay = plan_stitch_volume(shape, axis, 64)
    labels = torch.randint(0, 4, (B, *shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    can = stitch_labels(labels, lay, axis, IGNORE)
    assert can.dtype == dtype and can.shape == (B * lay.num_canvases, 64, 64)
    m = valid_mask(lay, batch_size=B)
    assert m.dtype == torch.bool and m.shape == can.shape
    assert int(m.sum()) == B * math.prod(shape)
    assert torch.equal(can != IGNORE, m)
    assert lay.num_empty_tiles > 0
    assert torch.equal(unstitch(can, lay, axis), labels)
    assert valid_mask(lay).shape == (lay.num_canvases, 64, 64)


def test_label_fill_must_fit_dtype():
    lay = plan_stitch((4, 4), 2, 8)
    with pytest.raises(ValueError, match="does not fit"):
        stitch_labels(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), lay, 0, -1)
    with pytest.raises(TypeError, match="bool"):
        stitch_labels(torch.zeros(1, 2, 4, 4, dtype=torch.bool), lay, 0, 1)
    with pytest.raises(ValueError, match="target\\[:, 0\\]"):
        stitch_labels(torch.zeros(1, 1, 2, 4, 4, dtype=torch.long), lay, 0, IGNORE)


# ------------------------------------------------------------------------------------------------
# 2D batches as a stack
# ------------------------------------------------------------------------------------------------
def test_2d_batch_as_slice_stack():
    N, C, h, w = 12, 2, 30, 20
    lay = plan_stitch((h, w), N, 64)  # whole batch on shared canvases
    assert lay.grid == (2, 3) and lay.num_canvases == 2
    x = unique_volume((N, C, h, w))
    can = stitch_slices(x, lay)
    assert can.shape == (2, C, 64, 64)
    assert torch.equal(unstitch_slices(can, lay), x)
    # consecutive groups of num_slices are separate stacks
    lay4 = plan_stitch((h, w), 4, 64)
    can4 = stitch_slices(x, lay4)
    assert can4.shape == (3 * lay4.num_canvases, C, 64, 64)
    assert torch.equal(unstitch_slices(can4, lay4), x)
    # same as the 3D path with the batch as slice axis
    assert torch.equal(can, stitch_images(x.transpose(0, 1).unsqueeze(0), lay, 0))
    lab = torch.randint(0, 3, (N, h, w))
    lc = stitch_label_slices(lab, lay, IGNORE)
    assert torch.equal(lc != IGNORE, valid_mask(lay))
    assert torch.equal(unstitch_slices(lc, lay), lab)
    with pytest.raises(ValueError, match="multiple"):
        stitch_slices(x[:5], lay4)


# ------------------------------------------------------------------------------------------------
# dtype / device / autograd
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32])
def test_dtype_and_device_preserved(device, dtype):
    lay = plan_stitch_volume((5, 6, 7), 2, 16)
    vol = unique_volume((2, 1, 5, 6, 7), dtype=torch.float64, device=device).remainder(1000).to(dtype)
    can = stitch_images(vol, lay, 2)
    assert can.dtype == dtype and can.device.type == device
    back = unstitch(can, lay, 2)
    assert back.dtype == dtype and back.device.type == device and torch.equal(back, vol)
    assert valid_mask(lay, device=device).device.type == device
    assert slice_index_map(lay, device=device).device.type == device


def test_gradients_flow_both_ways():
    lay = plan_stitch_volume((4, 6, 6), 0, 16)
    vol = torch.randn(2, 1, 4, 6, 6, requires_grad=True)
    stitch_images(vol, lay, 0).sum().backward()
    assert torch.equal(vol.grad, torch.ones_like(vol))
    logits = torch.randn(2 * lay.num_canvases, 3, 16, 16, requires_grad=True)
    unstitch(logits, lay, 0).sum().backward()
    m = valid_mask(lay, batch_size=2)[:, None].expand_as(logits)
    assert torch.equal(logits.grad, m.float())


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="do not fit.*resample"):
        plan_stitch((300, 200), 4, 256)
    with pytest.raises(ValueError, match="do not fit"):
        plan_stitch((10, 40), 4, (64, 32))
    with pytest.raises(ValueError, match="num_slices"):
        plan_stitch((10, 10), 0, 64)
    with pytest.raises(ValueError, match="positive"):
        plan_stitch((0, 10), 3, 64)
    with pytest.raises(ValueError, match="2 entries"):
        plan_stitch((10, 10, 10), 3, 64)
    with pytest.raises(TypeError):
        plan_stitch((10, 10), 3, 64.0)
    lay = plan_stitch_volume((4, 6, 8), 0, 32)
    vol = torch.zeros(1, 1, 4, 6, 8)
    with pytest.raises(ValueError, match="axis"):
        stitch_images(vol, lay, 3)
    with pytest.raises(ValueError, match="planned for"):
        stitch_images(vol, lay, 1)
    with pytest.raises(ValueError, match="volume"):
        stitch_images(vol[0], lay, 0)
    with pytest.raises(TypeError, match="StitchLayout"):
        stitch_images(vol, (4, 4), 0)
    can = stitch_images(vol, lay, 0)
    with pytest.raises(ValueError, match="canvas"):
        unstitch(can[..., :16], lay, 0)
    lay5 = plan_stitch_volume((20, 8, 8), 0, 16)
    assert lay5.num_canvases == 5
    with pytest.raises(ValueError, match="multiple"):
        unstitch(torch.zeros(6, 1, 16, 16), lay5, 0)
    with pytest.raises(ValueError, match="canvases must be"):
        unstitch(torch.zeros(1, 32, 32)[None, None], lay, 0)


# ------------------------------------------------------------------------------------------------
# random monotone intensity curves
# ------------------------------------------------------------------------------------------------
def test_curves_p0_identity_and_p1_changes():
    x = torch.randn(8, 2, 16, 16)
    assert torch.equal(random_monotone_curves(x, p=0.0), x)
    y = random_monotone_curves(x, p=1.0, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_curves_monotone_and_range_kept(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 2, 12, 12, generator=g) * 50 + 20).to(dtype)
    x[3, 1] = 7.0  # a constant channel stays put
    x[4, 0, :6] = x[4, 0, 0, 0]  # ties stay ties
    y = random_monotone_curves(x, p=1.0, generator=g)
    flat_x, flat_y = x.reshape(16, 2, -1).double(), y.reshape(16, 2, -1).double()
    order = flat_x.argsort(dim=-1)
    ys = flat_y.gather(-1, order)
    assert bool((ys[..., 1:] >= ys[..., :-1]).all())  # order kept (non-strictly)
    assert torch.equal(flat_y.amin(-1), flat_x.amin(-1)) and torch.equal(flat_y.amax(-1), flat_x.amax(-1))
    assert torch.equal(y[3, 1], x[3, 1])
    xs = flat_x.gather(-1, order)
    tie = xs[..., 1:] == xs[..., :-1]
    assert bool((ys[..., 1:][tie] == ys[..., :-1][tie]).all())


def test_curves_per_slice_probability_and_reproducibility():
    x = torch.linspace(0, 1, 100).view(1, 1, 10, 10).repeat(400, 1, 1, 1)
    y1 = random_monotone_curves(x, p=0.5, generator=torch.Generator().manual_seed(5))
    y2 = random_monotone_curves(x, p=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2)
    changed = (y1 != x).flatten(1).any(1)
    assert 150 < int(changed.sum()) < 250  # about half the slices
    curves = y1[changed].flatten(1)
    assert torch.unique(curves, dim=0).shape[0] == curves.shape[0]  # each slice its own curve
    with pytest.raises(ValueError, match="p must"):
        random_monotone_curves(x, p=1.5)
    with pytest.raises(TypeError, match="floating"):
        random_monotone_curves(x.long(), p=0.5)
    with pytest.raises(ValueError, match="\\(N, C, h, w\\)"):
        random_monotone_curves(x[0], p=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_curves_cuda():
    x = torch.randn(6, 1, 32, 32, device="cuda")
    y = random_monotone_curves(x, p=1.0, generator=torch.Generator(device="cuda").manual_seed(0))
    assert y.device.type == "cuda"
    o = x.flatten(1).argsort(1)
    ys = y.flatten(1).gather(1, o)
    assert bool((ys[:, 1:] >= ys[:, :-1]).all())
