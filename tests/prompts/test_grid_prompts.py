"""CPAC-SAM grid prompts: adaptive intervals, thin-structure widening, fallback, packing, prototypes."""
import itertools

import pytest
import torch

from nnunetv2_samssl.prompts.grid_prompts import (ClassPrototypes, GridPrompts, adaptive_grid_points,
                                                  adaptive_intervals, class_masks, prompts_from_prediction,
                                                  reliable_region, two_density_prompts)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def box_labels(shape, boxes):
    """Label map of `shape` (no batch dim): background 0, then each (class, lo, hi) box painted in order."""
    labels = torch.zeros(shape, dtype=torch.long)
    for cls, lo, hi in boxes:
        labels[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = cls
    return labels


def real_points(prompts, n):
    """(points (M, d) long, labels (M,)) of sample n without padding."""
    keep = prompts.labels[n] >= 0
    return prompts.points[n][keep].long(), prompts.labels[n][keep]


def value_at(tensor, coords):
    return tensor[tuple(coords.unbind(-1))]


def random_label_batch(shape, num_classes, seed):
    """A few painted boxes per sample (so every class region is blocky and varied)."""
    g = gen(seed)
    batch = []
    for _ in range(shape[0]):
        boxes = []
        for cls in range(1, num_classes):
            lo = [int(torch.randint(0, s - 2, (1,), generator=g)) for s in shape[1:]]
            hi = [min(a + int(torch.randint(1, s // 2, (1,), generator=g)), s - 1) for a, s in zip(lo, shape[1:])]
            boxes.append((cls, lo, hi))
        batch.append(box_labels(shape[1:], boxes))
    return torch.stack(batch)


# ------------------------------------------------------------------------------------------ naive loop reference
def int_root(a, d):
    r = int(round(a ** (1.0 / d)))
    while r ** d > a:
        r -= 1
    while (r + 1) ** d <= a:
        r += 1
    return r


def reference_grid(mask, density):
    """Set of grid voxels of one region (integer density), spelled out with Python loops."""
    coords = mask.nonzero().tolist()
    if not coords:
        return set(), 0
    d = mask.dim()
    interval = max(int_root(len(coords), d) // density, 1)
    axes = []
    for axis in range(d):
        lo = min(c[axis] for c in coords)
        hi = max(c[axis] for c in coords)
        if hi - lo + 1 < 2 * interval:
            lo, hi = max(lo - interval, 0), min(hi + interval, mask.shape[axis] - 1)
        axes.append(range(lo, hi + 1, interval))
    members = {tuple(c) for c in coords}
    return {v for v in itertools.product(*axes) if v in members}, interval


# ---------------------------------------------------------------------------------------------------- basics
def test_class_masks_ignore_and_region():
    labels = torch.tensor([[[0, 1, 2], [-1, 255, 1]]])
    masks = class_masks(labels, 3)
    assert masks.shape == (1, 3, 2, 3) and masks.dtype == torch.bool
    assert masks.sum().item() == 4  # -1 and 255 belong to no class
    assert masks[0, 1].nonzero().tolist() == [[0, 1], [1, 2]]
    region = torch.tensor([[[True, True, False], [True, True, True]]])
    assert class_masks(labels, 3, region)[0, 2].sum().item() == 0


def test_interval_rule_is_exact_at_powers():
    counts = torch.tensor([0, 1, 1023, 1024, 4095, 4096])
    assert adaptive_intervals(counts, 8, 2).tolist() == [0, 1, 3, 4, 7, 8]
    assert adaptive_intervals(counts, 16, 2).tolist() == [0, 1, 1, 2, 3, 4]
    assert adaptive_intervals(counts, 8, 3).tolist() == [0, 1, 1, 1, 1, 2]  # cbrt(4096) = 16, not 15.999
    big = torch.tensor([64 ** 3, 64 ** 3 - 1, 1000 ** 3, 1000 ** 3 - 1])
    assert adaptive_intervals(big, 8, 3).tolist() == [8, 7, 125, 124]
    assert adaptive_intervals(torch.tensor([100]), 2.5, 2).tolist() == [4]  # non-integer density
    with pytest.raises(ValueError):
        adaptive_intervals(counts, 0, 2)


def test_2d_square_exact_grid_and_background():
    labels = box_labels((48, 48), [(1, (4, 8), (35, 39))]).unsqueeze(0)  # a 32 x 32 square
    prompts = adaptive_grid_points(class_masks(labels, 2), 8)
    assert isinstance(prompts, GridPrompts)
    # square: sqrt(1024) / 8 = 4; background: floor(sqrt(48^2 - 1024) / 8) = floor(4.47) = 4
    assert prompts.intervals.tolist() == [[4, 4]]
    assert prompts.fallback.tolist() == [[False, False]]
    coords, cls = real_points(prompts, 0)
    square = coords[cls == 1].tolist()
    assert square == [[r, c] for r in range(4, 36, 4) for c in range(8, 40, 4)]  # 8 x 8, anchored at the box
    # background grid: 12 x 12 over the whole image minus the 8 x 8 that fall inside the square
    assert (cls == 0).sum().item() == 144 - 64
    assert cls.tolist() == sorted(cls.tolist())  # class order, raster order inside a class
    assert prompts.num_points().tolist() == [144]
    assert prompts.points.dtype == torch.float32 and prompts.labels.dtype == torch.long

    fine = adaptive_grid_points(class_masks(labels, 2), 16)
    assert fine.intervals[0, 1].item() == 2
    coords, cls = real_points(fine, 0)
    assert (cls == 1).sum().item() == 256


def test_3d_cube_interval_and_grid():
    labels = box_labels((20, 20, 20), [(1, (2, 3, 4), (17, 18, 19))]).unsqueeze(0)  # a 16^3 cube
    masks = class_masks(labels, 2)[:, 1:]  # foreground only
    prompts = adaptive_grid_points(masks, 8)
    assert prompts.intervals.tolist() == [[2]]  # cbrt(4096) / 8 = 2
    coords, cls = real_points(prompts, 0)
    assert coords.tolist() == [[z, y, x] for z in range(2, 18, 2) for y in range(3, 19, 2) for x in range(4, 20, 2)]
    assert (cls == 0).all()  # the only class of these masks
    assert adaptive_grid_points(masks, 16).num_points().tolist() == [4096]  # interval 1: every voxel


@pytest.mark.parametrize("shape", [(3, 40, 36), (2, 14, 18, 16)])
def test_points_inside_their_class_and_background_prompted(shape):
    labels = random_label_batch(shape, 4, seed=1)
    for density in (8, 16):
        prompts = adaptive_grid_points(class_masks(labels, 4), density)
        for n in range(shape[0]):
            coords, cls = real_points(prompts, n)
            assert torch.equal(value_at(labels[n], coords), cls)
            assert (cls == 0).any()
            present = [int(c) for c in labels[n].unique()]
            assert sorted(set(cls.tolist())) == present


# ------------------------------------------------------------------------------------- thin structures, fallback
def test_thin_line_box_is_widened():
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, :, 10] = True  # 32 voxels: interval floor(sqrt(32) / 2) = 2, but the line is 1 voxel wide
    prompts = adaptive_grid_points(mask, 2)
    assert prompts.intervals.tolist() == [[2]] and not prompts.fallback.any()
    coords, _ = real_points(prompts, 0)
    assert coords.tolist() == [[r, 10] for r in range(0, 32, 2)]  # box widened to columns 8..12

    line3d = torch.zeros(1, 1, 32, 12, 12, dtype=torch.bool)
    line3d[0, 0, :27, 5, 7] = True  # cbrt(27) / 1 = 3; y/x boxes widened to 2..8 and 4..10 (grid hits 5 and 7)
    prompts = adaptive_grid_points(line3d, 1)
    assert prompts.intervals.tolist() == [[3]]
    coords, _ = real_points(prompts, 0)
    assert coords.tolist() == [[z, 5, 7] for z in range(0, 27, 3)]


def test_line_at_border_gets_fallback():
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, :, 1] = True  # widened box clipped to columns 0..3: grid columns 0, 2 miss the line
    prompts = adaptive_grid_points(mask, 2, generator=gen(3))
    assert prompts.fallback.tolist() == [[True]]
    coords, cls = real_points(prompts, 0)
    assert coords.shape == (1, 2) and coords[0, 1].item() == 1 and cls.tolist() == [0]


def test_fallback_single_random_voxel_deterministic():
    voxels = [(0, 1), (1, 0), (5, 6), (6, 5)]  # A = 4, density 1: interval 2, grid (even, even) misses all four
    mask = torch.zeros(2, 2, 10, 10, dtype=torch.bool)
    for r, c in voxels:
        mask[:, 1, r, c] = True
    mask[1, 0, 2:6, 2:6] = True  # sample 1 also has a class the grid hits: interval 4, box widened to 0..9
    prompts = adaptive_grid_points(mask, 1, generator=gen(7))
    assert prompts.intervals.tolist() == [[0, 2], [4, 2]]
    assert prompts.fallback.tolist() == [[False, True], [False, True]]
    assert prompts.num_points().tolist() == [1, 2]
    assert prompts.points[1, 0].tolist() == [4.0, 4.0]  # the widened grid (0, 4, 8)^2 hits (4, 4) only
    for n in range(2):
        coords, cls = real_points(prompts, n)
        assert tuple(coords[cls == 1][0].tolist()) in voxels and (cls == 1).sum().item() == 1
    again = adaptive_grid_points(mask, 1, generator=gen(7))
    assert torch.equal(prompts.points, again.points) and torch.equal(prompts.labels, again.labels)
    drawn = {tuple(adaptive_grid_points(mask[:1], 1, generator=gen(s)).points[0, 0].long().tolist())
             for s in range(40)}
    assert drawn == set(voxels)  # uniform over the region: all four voxels come up


def test_empty_masks_give_one_padding_column():
    prompts = adaptive_grid_points(torch.zeros(2, 3, 5, 6, dtype=torch.bool), 8)
    assert prompts.points.shape == (2, 1, 2) and (prompts.labels == -1).all() and (prompts.points == 0).all()
    assert prompts.intervals.tolist() == [[0, 0, 0]] * 2 and not prompts.fallback.any()
    assert prompts.num_points().tolist() == [0, 0]


# ----------------------------------------------------------------------------------- densities, batching, cap
def test_two_densities_differ():
    labels = random_label_batch((2, 64, 64), 3, seed=2)
    coarse, fine = two_density_prompts(class_masks(labels, 3))
    assert (fine.intervals <= coarse.intervals).all()
    assert (fine.num_points() > coarse.num_points()).all()
    explicit = adaptive_grid_points(class_masks(labels, 3), 8.0)
    assert torch.equal(explicit.points, coarse.points) and torch.equal(explicit.labels, coarse.labels)


@pytest.mark.parametrize("shape", [(4, 33, 29), (3, 13, 17, 15)])
def test_batch_matches_per_sample_and_loop_reference(shape):
    labels = random_label_batch(shape, 4, seed=5)
    labels[1][labels[1] == 2] = 0  # an absent class
    labels[-1] = -1  # an empty sample: an all-padding row
    masks = class_masks(labels, 4)
    batch = adaptive_grid_points(masks, 8)
    assert not batch.fallback.any()
    assert batch.num_points()[-1].item() == 0 and (batch.intervals[-1] == 0).all()
    assert batch.intervals[1, 2].item() == 0
    assert batch.points.shape[1] == int(batch.num_points().max())
    for n in range(shape[0]):
        single = adaptive_grid_points(masks[n:n + 1], 8)
        count = int(single.num_points()[0])
        assert torch.equal(batch.points[n, :count], single.points[0, :count])
        assert torch.equal(batch.labels[n, :count], single.labels[0, :count])
        assert (batch.labels[n, count:] == -1).all() and (batch.points[n, count:] == 0).all()
        assert torch.equal(batch.intervals[n], single.intervals[0])
        coords, cls = real_points(batch, n)
        for k in range(4):
            expected, interval = reference_grid(masks[n, k], 8)
            assert {tuple(c) for c in coords[cls == k].tolist()} == expected
            assert batch.intervals[n, k].item() == interval


def test_max_points_per_class_caps_counts():
    labels = box_labels((40, 40), [(1, (0, 0), (31, 31)), (2, (34, 34), (35, 35))]).unsqueeze(0).repeat(2, 1, 1)
    masks = class_masks(labels, 3)
    full = adaptive_grid_points(masks, 8)
    capped = adaptive_grid_points(masks, 8, generator=gen(1), max_points_per_class=10)
    full_counts = torch.stack([(full.labels == k).sum(1) for k in range(3)], 1)
    counts = torch.stack([(capped.labels == k).sum(1) for k in range(3)], 1)
    # background: interval floor(sqrt(572) / 8) = 2, 20^2 grid minus 16^2 in class 1 and 1 in class 2
    assert full_counts[0].tolist() == [143, 64, 4]  # the 2x2 class 2 (interval 1) is under the cap
    assert counts.tolist() == [[10, 10, 4]] * 2
    for n in range(2):
        kept = {tuple(c) for c in real_points(capped, n)[0].tolist()}
        assert kept <= {tuple(c) for c in real_points(full, n)[0].tolist()}
    assert not torch.equal(capped.points[0], capped.points[1])  # independent random subsets
    again = adaptive_grid_points(masks, 8, generator=gen(1), max_points_per_class=10)
    assert torch.equal(capped.points, again.points)
    with pytest.raises(ValueError):
        adaptive_grid_points(masks, 8, max_points_per_class=0)


# ----------------------------------------------------------------------------------------------- prototypes
def axis_features(labels, channels, noise=0.1, seed=0):
    """Features of class k point along axis k (plus noise and a random positive scale)."""
    g = gen(seed)
    onehot = torch.nn.functional.one_hot(labels, channels).movedim(-1, 1).float()
    scale = 0.5 + torch.rand(labels.shape, generator=g).unsqueeze(1)
    return onehot * scale + noise * torch.randn(onehot.shape, generator=g)


def test_prototypes_recover_classes():
    labels = torch.randint(0, 3, (2, 6, 7, 5), generator=gen(0))
    features = axis_features(labels, 4)
    protos = ClassPrototypes(3)
    assert not protos.ready and (protos.nearest_class(features) == -1).all()
    weights = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
    protos.update(features.requires_grad_(), weights)
    assert protos.ready and protos.prototypes.shape == (3, 4) and not protos.prototypes.requires_grad
    assert torch.equal(protos.nearest_class(axis_features(labels, 4, seed=1)), labels)


def test_prototype_weighted_mean_and_ema_arithmetic():
    protos = ClassPrototypes(3, momentum=0.75)
    features = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, 5.0]]).T.reshape(1, 2, 3, 1)  # unit: (.6,.8) (1,0) (0,1)
    weights = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).reshape(1, 3, 3, 1)
    protos.update(features, weights)
    assert torch.allclose(protos.prototypes, torch.tensor([[0.9, 0.2], [0.0, 1.0], [0.0, 0.0]]))
    assert protos.seen.tolist() == [True, True, False]
    # second batch: class 0 sees (0, 1) only (voxel 0 is invalid), class 1 absent, class 2 new
    weights2 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).reshape(1, 3, 3, 1)
    valid = torch.tensor([False, True, True]).reshape(1, 3, 1)
    protos.update(features, weights2, valid)
    expected = torch.tensor([[0.75 * 0.9, 0.75 * 0.2 + 0.25], [0.0, 1.0], [1.0, 0.0]])
    assert torch.allclose(protos.prototypes, expected, atol=1e-6)
    assert protos.seen.tolist() == [True, True, True]


def test_unseen_classes_never_chosen():
    protos = ClassPrototypes(3)
    labels = torch.tensor([[[0, 1], [1, 0]]])
    protos.update(axis_features(labels, 3), torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float())
    assert protos.seen.tolist() == [True, True, False]
    toward_two = torch.zeros(1, 3, 4, 4)
    toward_two[:, 2] = 1.0
    toward_two[:, 0, 0, 0] = 0.01  # a nudge: the nearest seen class is 0 there
    nearest = protos.nearest_class(toward_two)
    assert (nearest != 2).all() and (nearest >= 0).all() and nearest[0, 0, 0].item() == 0


def test_prototype_state_dict_round_trip():
    fresh = ClassPrototypes(3)
    ClassPrototypes(3).load_state_dict(fresh.state_dict())  # never updated -> never updated
    protos = ClassPrototypes(3, momentum=0.5)
    labels = torch.randint(0, 3, (2, 5, 5), generator=gen(2))
    features = axis_features(labels, 8)
    protos.update(features, torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float())
    restored = ClassPrototypes(3)
    restored.load_state_dict(protos.state_dict())
    assert torch.equal(restored.prototypes, protos.prototypes) and torch.equal(restored.seen, protos.seen)
    assert torch.equal(restored.nearest_class(features), protos.nearest_class(features))
    with pytest.raises(RuntimeError):
        ClassPrototypes(4).load_state_dict(protos.state_dict())
    with pytest.raises(ValueError):
        protos.update(features[:, :4], torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float())


# ---------------------------------------------------------------------------------------- reliable prompting
def test_reliable_region_excludes_disagreement():
    predicted = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    prototype = torch.tensor([[[0, 1, 2], [2, -1, 1]]])
    assert reliable_region(prototype, predicted).tolist() == [[[True, True, False], [True, False, False]]]
    region = torch.tensor([[[False, True, True], [True, True, True]]])
    assert reliable_region(prototype, predicted, region).tolist() == [[[False, True, False], [True, False, False]]]
    assert not reliable_region(torch.full_like(predicted, -1), torch.full_like(predicted, -1)).any()


def test_prompts_from_prediction_only_where_reliable():
    predicted = box_labels((32, 32), [(1, (4, 4), (19, 19)), (2, (22, 22), (29, 29))]).unsqueeze(0)
    prototype = predicted.clone()
    prototype[0, 4:12, 4:20] = 2  # the top half of class 1 disagrees
    coarse, fine = prompts_from_prediction(predicted, 3, prototype, densities=(4, 8), generator=gen(0))
    reliable = reliable_region(prototype, predicted)
    for prompts in (coarse, fine):
        coords, cls = real_points(prompts, 0)
        assert value_at(reliable[0], coords).all() and torch.equal(value_at(predicted[0], coords), cls)
        assert sorted(set(cls.tolist())) == [0, 1, 2]
    assert fine.num_points()[0] > coarse.num_points()[0]
    plain = prompts_from_prediction(predicted, 3, densities=(4,))[0]
    assert ((real_points(plain, 0)[0][:, 0] < 12) & (real_points(plain, 0)[1] == 1)).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    labels = random_label_batch((3, 12, 20, 18), 4, seed=9)
    masks = class_masks(labels, 4)
    cpu = adaptive_grid_points(masks, 8)
    gpu = adaptive_grid_points(masks.cuda(), 8, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(gpu.points.cpu(), cpu.points) and torch.equal(gpu.labels.cpu(), cpu.labels)
    protos = ClassPrototypes(4).cuda()
    features = axis_features(labels, 5)
    protos.update(features.cuda(), masks.float().cuda())
    assert torch.equal(protos.nearest_class(features.cuda()).cpu(), labels)
