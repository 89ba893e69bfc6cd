"""Patch <-> promptable-model space mapping: round trips, tiling, resize, slice-wise mode, geometry."""
import numpy as np
import pytest
import torch

from nnunetv2_samssl.sam.interface import InputSpace
from nnunetv2_samssl.sam.space import SamSpaceMapper, bounding_boxes, downsample_to_scales

KINDS = frozenset({"points", "masks"})
SPACE_3D_SMALL = InputSpace(ndim=3, size=(32, 32, 32), spacing_mm=(1.5, 1.5, 1.5), in_channels=1,
                            low_res_size=(8, 8, 8), prompt_kinds=KINDS)
SPACE_SAM_MED3D = InputSpace(ndim=3, size=(128, 128, 128), spacing_mm=(1.5, 1.5, 1.5), in_channels=1,
                             low_res_size=(32, 32, 32), prompt_kinds=KINDS)
SPACE_2D = InputSpace(ndim=2, size=(64, 64), spacing_mm=None, in_channels=3, low_res_size=(32, 32),
                      prompt_kinds=frozenset({"points", "boxes", "masks"}))


def ellipsoid(shape, centre, radii):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def dice(a, b):
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def round_trip(mapper, mask, roi=None, keep_empty=True):
    """mask (B, *patch) -> model space -> patch; returns (recovered bool (B, *patch), valid, model batch)."""
    images = mask.float().unsqueeze(1)
    batch = mapper.to_model(images, mask if roi is None else roi, keep_empty=keep_empty)
    values, valid = mapper.to_patch(batch.images[:, :1], batch)
    return values[:, 0] >= 0.5, valid[:, 0], batch


# ---------------------------------------------------------------------------------------------------- fixed spacing
def test_round_trip_anisotropic_patch_smaller_than_window():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (3.0, 0.8, 0.8))
    patch = (14, 44, 44)  # 28 x 23.5 x 23.5 model voxels: fits inside the 32^3 window
    mask = ellipsoid(patch, (7, 20, 23), (5, 14, 11)).unsqueeze(0)
    recovered, valid, batch = round_trip(mapper, mask)
    assert batch.num_queries == 1
    assert torch.allclose(batch.scale, torch.tensor([[0.5, 1.875, 1.875]]))
    assert batch.images.shape == (1, 1, 32, 32, 32)
    assert dice(recovered, mask) > 0.98
    assert bool(valid.all())  # the window holds the whole patch
    # the window is larger than the patch, so cells outside the patch carry the pad value (patch minimum = 0)
    inside = batch.inside_patch()
    assert 0 < int(inside.sum()) < inside.numel()
    assert float(batch.images[0, 0][~inside[0]].abs().max()) == 0.0


def test_pad_value_is_the_patch_minimum_per_sample_and_channel():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (3.0, 0.8, 0.8))
    images = torch.rand(2, 2, 10, 30, 30) + torch.tensor([[-3.0, 5.0], [-1.0, 2.0]]).view(2, 2, 1, 1, 1)
    batch = mapper.to_model(images)
    outside = ~batch.inside_patch()
    for q in range(2):
        for c in range(2):
            expected = images[q, c].min()
            assert torch.allclose(batch.images[q, c][outside[q]], expected.expand(int(outside[q].sum())))
    constant = SamSpaceMapper(SPACE_3D_SMALL, (3.0, 0.8, 0.8), pad_value=0.0).to_model(images)
    assert float(constant.images[0, 0][outside[0]].abs().max()) == 0.0


def test_round_trip_with_tiles_when_roi_exceeds_window():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (3.0, 0.8, 0.8), tile_overlap=0.25)
    patch = (30, 90, 80)  # object clipped to the patch: ~60 x 48 x 43 model voxels -> 3 x 2 x 2 tiles of 32^3
    mask = torch.stack([ellipsoid(patch, (15, 45, 40), (14, 60, 50)),
                        ellipsoid(patch, (10, 30, 30), (4, 12, 12))])  # second one fits one window
    recovered, valid, batch = round_trip(mapper, mask)
    per_sample = torch.bincount(batch.sample_index, minlength=2)
    assert int(per_sample[0]) == 3 * 2 * 2 and int(per_sample[1]) == 1
    assert dice(recovered[0], mask[0]) > 0.98 and dice(recovered[1], mask[1]) > 0.98
    assert bool(valid[0][mask[0]].all()) and bool(valid[1][mask[1]].all())
    # neighbouring tiles overlap by at least tile_overlap of the window
    tiles = batch.offset[batch.sample_index == 0]
    for axis in range(3):
        starts = torch.unique(tiles[:, axis])
        step = float((starts[1:] - starts[:-1]).max()) / float(batch.scale[0, axis])  # in model voxels
        assert step <= 32 * (1 - 0.25) + 1e-4


def test_smooth_image_is_reproduced_where_tiles_overlap():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (2.0, 1.0, 1.0))
    patch = (32, 80, 80)
    grids = torch.meshgrid(*[torch.linspace(0, 1, s) for s in patch], indexing="ij")
    image = (grids[0] + 2 * grids[1] - grids[2]).unsqueeze(0).unsqueeze(0)
    batch = mapper.to_model(image)  # whole patch as ROI: 43 x 53 x 53 model voxels -> tiles
    assert batch.num_queries > 1
    values, valid = mapper.to_patch(batch.images, batch)
    assert bool(valid.all())
    # linear interpolation of a linear ramp is exact up to the border clamp
    interior = (slice(2, -2),) * 3
    assert float((values[0, 0][interior] - image[0, 0][interior]).abs().max()) < 0.02


def test_real_sam_med3d_window_single_crop():
    mapper = SamSpaceMapper(SPACE_SAM_MED3D, (3.0, 0.8, 0.8))
    patch = (40, 160, 128)  # 80 x 85 x 68 mm-derived model voxels at 1.5 mm: one 128^3 crop
    mask = ellipsoid(patch, (22, 70, 60), (12, 50, 40)).unsqueeze(0)
    recovered, valid, batch = round_trip(mapper, mask)
    assert batch.images.shape == (1, 1, 128, 128, 128)
    assert dice(recovered, mask) > 0.98
    assert bool(valid.all())
    # the decoder's 32^3 low-res grid maps back too (coarser, so a looser bound)
    low_res = torch.nn.functional.interpolate(batch.images[:, :1], size=(32, 32, 32), mode="area")
    values, low_valid = mapper.to_patch(low_res, batch)
    assert dice(values[0, 0] >= 0.5, mask[0]) > 0.9


def test_real_sam_med3d_window_tiles_large_roi():
    mapper = SamSpaceMapper(SPACE_SAM_MED3D, (1.5, 1.5, 1.5), roi_margin=0.0)
    patch = (96, 176, 112)  # already at 1.5 mm: the object spans 160 voxels along axis 1 -> 2 tiles there
    mask = ellipsoid(patch, (48, 88, 56), (40, 80, 50)).unsqueeze(0)
    recovered, valid, batch = round_trip(mapper, mask)
    assert batch.num_queries == 2
    assert torch.allclose(batch.scale, torch.ones_like(batch.scale))
    assert dice(recovered, mask) > 0.99
    assert bool(valid[0][mask[0]].all())


# ---------------------------------------------------------------------------------------------------- resize mode
def test_resize_mode_round_trip_and_square_pixels():
    mapper = SamSpaceMapper(SPACE_2D, (0.7, 0.9), roi_margin=0.1)
    patch = (120, 100)
    mask = torch.stack([ellipsoid(patch, (40, 50), (25, 12)), ellipsoid(patch, (90, 30), (8, 20))])
    recovered, valid, batch = round_trip(mapper, mask)
    assert batch.num_queries == 2 and batch.images.shape == (2, 1, 64, 64)
    for b in range(2):
        assert dice(recovered[b], mask[b]) > 0.98
        assert bool(valid[b][mask[b]].all())
    # model pixels are square in mm and the ROI's longest side fills (1 - 2 * margin) of the window
    pixel_mm = batch.scale * torch.tensor([0.7, 0.9])
    assert torch.allclose(pixel_mm[:, 0], pixel_mm[:, 1])
    lo, hi, _ = bounding_boxes(mask)
    longest_mm = ((hi - lo + 1) * torch.tensor([0.7, 0.9])).amax(1)
    assert torch.allclose(longest_mm / pixel_mm[:, 0], torch.full((2,), 64 * 0.8), atol=1e-3)


def test_resize_mode_whole_patch_pads_after_the_patch():
    mapper = SamSpaceMapper(SPACE_2D, (1.0, 1.0), roi_margin=0.0)
    image = torch.rand(1, 1, 32, 64) + 1.0
    batch = mapper.to_model(image)  # whole patch: 64 wide -> 1 px per model px, 32 rows then padding
    assert torch.allclose(batch.scale, torch.ones(1, 2))
    assert torch.allclose(batch.images[0, 0, :32], image[0, 0], atol=1e-6)
    assert torch.allclose(batch.images[0, 0, 32:], image.min().expand(32, 64))


def test_max_zoom_limits_magnification():
    mapper = SamSpaceMapper(SPACE_2D, (1.0, 1.0), max_zoom=2.0)
    mask = ellipsoid((80, 80), (40, 40), (2, 2)).unsqueeze(0)
    batch = mapper.to_model(mask.float().unsqueeze(1), mask)
    assert torch.allclose(batch.scale, torch.full((1, 2), 0.5))


# ---------------------------------------------------------------------------------------------------- slice-wise
@pytest.mark.parametrize("slice_axis", [0, 2])
def test_slice_wise_mode_round_trip(slice_axis):
    mapper = SamSpaceMapper(SPACE_2D, (2.5, 0.8, 0.8), slice_axis=slice_axis)
    patch = (12, 48, 40)
    centre = (5.5, 24, 20)
    radii = (3.2, 16, 12) if slice_axis == 0 else (5, 16, 9)
    mask = ellipsoid(patch, centre, radii).unsqueeze(0)
    recovered, valid, batch = round_trip(mapper, mask)
    slices_with_object = mask[0].movedim(slice_axis, 0).flatten(1).any(1).nonzero()[:, 0]
    assert torch.equal(batch.slice_index, slices_with_object)
    assert batch.images.shape == (len(slices_with_object), 1, 64, 64)
    assert dice(recovered, mask) > 0.98
    covered_slices = valid[0].movedim(slice_axis, 0).flatten(1).any(1)
    assert torch.equal(covered_slices.nonzero()[:, 0], slices_with_object)
    # points round-trip through the query geometry and keep their slice
    pts = torch.tensor([[[5.0, 20.0, 18.0]]]).expand(batch.num_queries, 1, 3).clone()
    pts[:, 0, slice_axis] = batch.slice_index.float()
    back = batch.points_to_patch(batch.points_to_model(pts))
    assert torch.allclose(back, pts, atol=1e-4)


def test_slice_wise_requires_matching_dims():
    with pytest.raises(ValueError, match="slice-wise"):
        SamSpaceMapper(SPACE_3D_SMALL, (1.0, 1.0)).to_model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="patch_spacing"):
        SamSpaceMapper(SPACE_3D_SMALL, (1.0, 1.0)).to_model(torch.zeros(1, 1, 8, 16, 16))


# ---------------------------------------------------------------------------------------------------- geometry
def test_points_and_boxes_follow_the_image_geometry():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (3.0, 0.8, 0.8))
    patch = (16, 48, 48)
    target = torch.tensor([9.0, 31.0, 14.0])
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in patch], indexing="ij")
    spacing = torch.tensor([3.0, 0.8, 0.8])
    blob = torch.exp(-sum(((g - t) * s) ** 2 for g, t, s in zip(grids, target, spacing)) / (2 * 3.0 ** 2))
    batch = mapper.to_model(blob[None, None], blob[None] > 0.05)
    model_point = batch.points_to_model(target.view(1, 1, 3))[0, 0]
    peak = torch.stack(torch.unravel_index(batch.images[0, 0].argmax(), (32, 32, 32))).float()
    assert float((peak - model_point).abs().max()) <= 1.0
    assert bool(batch.contains(model_point.view(1, 1, 3)).all())
    assert torch.allclose(batch.points_to_patch(model_point.view(1, 1, 3))[0, 0], target, atol=1e-4)
    box = torch.cat([target - 2, target + 2]).view(1, 6)
    model_box = batch.boxes_to_model(box)[0]
    assert bool((model_box[:3] < model_point).all() and (model_box[3:] > model_point).all())
    assert torch.allclose((model_box[3:] - model_box[:3]) * batch.scale[0], torch.full((3,), 4.0), atol=1e-4)


def test_batched_queries_equal_separate_calls():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (2.0, 1.0, 1.0))
    patch = (20, 64, 48)
    images = torch.randn(2, 1, *patch)
    roi = torch.stack([ellipsoid(patch, (8, 20, 20), (5, 10, 8)), ellipsoid(patch, (12, 40, 30), (6, 20, 15))])
    together = mapper.to_model(images, roi)
    for b in range(2):
        alone = mapper.to_model(images[b:b + 1], roi[b:b + 1])
        rows = together.sample_index == b
        assert torch.allclose(together.images[rows], alone.images, atol=1e-5)
        assert torch.allclose(together.offset[rows], alone.offset)


def test_empty_roi_whole_patch_or_no_query():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (1.5, 1.5, 1.5))
    images = torch.randn(2, 1, 16, 24, 24)
    roi = torch.zeros(2, 16, 24, 24)
    roi[1, 4:8, 4:8, 4:8] = 0.9
    whole = mapper.to_model(images, roi, keep_empty=True)
    assert whole.num_queries == 2 and bool(whole.inside_patch()[0].sum() == 16 * 24 * 24)
    skipped = mapper.to_model(images, roi, keep_empty=False)
    assert skipped.sample_index.tolist() == [1]
    values, valid = mapper.to_patch(skipped.images[:, :1], skipped)
    assert not bool(valid[0].any()) and bool(valid[1].all())
    nothing = mapper.to_model(images[:1], roi[:1], keep_empty=False)
    assert nothing.num_queries == 0
    values, valid = mapper.to_patch(torch.zeros(0, 1, 32, 32, 32), nothing)
    assert values.shape == (1, 1, 16, 24, 24) and not bool(valid.any())


def test_per_channel_rois_write_to_their_channel():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (1.5, 1.5, 1.5))
    patch = (24, 40, 40)
    a, b = ellipsoid(patch, (6, 10, 10), (4, 6, 6)), ellipsoid(patch, (16, 28, 28), (5, 8, 8))
    roi = torch.stack([a, b]).unsqueeze(0)  # (1, 2, *patch)
    batch = mapper.to_model(roi.float()[:, :1] + 2 * roi.float()[:, 1:], roi)
    assert batch.channel_index.tolist() == [0, 1]
    values, valid = mapper.to_patch(batch.images[:, :1], batch)
    assert values.shape == (1, 2, *patch)
    assert dice((values[0, 0] > 0.5) & (values[0, 0] < 1.5), a) > 0.95
    assert dice(values[0, 1] > 1.5, b) > 0.95


def test_deep_supervision_scales():
    values = torch.zeros(1, 2, 8, 8, 8)
    values[:, 1, :4] = 1.0
    values[:, 0] = 1 - values[:, 1]
    valid = torch.ones(1, 8, 8, 8, dtype=torch.bool)
    valid[:, :, :, :1] = False  # first column invalid
    levels = downsample_to_scales(values, valid, [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [1, 0.5, 0.5]])
    assert [tuple(v.shape[2:]) for v, _ in levels] == [(8, 8, 8), (4, 4, 4), (2, 2, 2), (8, 4, 4)]
    # nnU-Net's own scale list: numpy rows from 1 / cumprod(pool_op_kernel_sizes)
    nnunet_scales = list(list(i) for i in 1 / np.cumprod(np.vstack([[1, 1, 1], [2, 2, 2], [1, 2, 2]]), axis=0))
    assert [tuple(v.shape[2:]) for v, _ in downsample_to_scales(values, valid, nnunet_scales)] == \
        [(8, 8, 8), (4, 4, 4), (4, 2, 2)]
    assert levels[0][0] is values
    half_values, half_valid = levels[1]
    assert bool(half_valid.all())  # each 2^3 block has 4 of 8 fine voxels... (half the block) -> >= 0.5 valid
    assert torch.allclose(half_values[0, 1, :2], torch.ones(2, 4, 4)) and float(half_values[0, 1, 2:].max()) == 0.0
    valid[:, :, :, :2] = False
    quarter_valid = downsample_to_scales(values, valid, [[0.25, 0.25, 0.25]])[0][1]
    assert quarter_valid[0, :, :, 0].all() and quarter_valid[0, :, :, 1].all()
    stricter = downsample_to_scales(values, valid, [[0.5, 0.5, 0.5]], min_valid_fraction=1.0)[0][1]
    assert not bool(stricter[0, :, :, 0].any()) and bool(stricter[0, :, :, 1:].all())
    # invalid fine voxels never leak: poison them and compare
    poisoned = values.clone()
    poisoned[:, :, :, :, :2] = 7.0
    again = downsample_to_scales(poisoned, valid, [[0.5, 0.5, 0.5]], min_valid_fraction=0.25)[0]
    reference = downsample_to_scales(values, valid, [[0.5, 0.5, 0.5]], min_valid_fraction=0.25)[0]
    assert torch.allclose(again[0], reference[0])


def test_autocast_does_not_change_the_mapping():
    mapper = SamSpaceMapper(SPACE_3D_SMALL, (2.0, 1.0, 1.0))
    images = torch.randn(1, 1, 16, 40, 40)
    plain = mapper.to_model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = mapper.to_model(images)
    assert cast.images.dtype == torch.float32
    assert torch.allclose(plain.images, cast.images)
