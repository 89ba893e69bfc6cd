"""The Dice helpers against independent references: hand-counted tiny maps (unknown / ignored voxels),
nnU-Net's own ``compute_metrics`` on the same maps written to files, and per-case Dice of folders."""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_samssl.evaluation import metrics
from nnunetv2_samssl.evaluation.metrics import dice_per_class, dice_per_class_on_folders, mean_foreground_dice

NAN = float("nan")


def _write(array: np.ndarray, path) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8)), str(path))
    return str(path)


def _nnunet_dice(prediction: np.ndarray, reference: np.ndarray, num_classes: int, tmp_path,
                 ignore_label=None) -> np.ndarray:
    """nnU-Net's ``compute_metrics`` (file based) on the batch, its samples stacked along the first axis so
    that the counts are pooled over the batch as ``dice_per_class`` pools them."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref = _write(np.concatenate(list(reference), 0), tmp_path / "ref.nii.gz")
    pred = _write(np.concatenate(list(prediction), 0), tmp_path / "pred.nii.gz")
    result = compute_metrics(ref, pred, SimpleITKIO(), list(range(1, num_classes)), ignore_label)
    return np.array([result["metrics"][c]["Dice"] for c in range(1, num_classes)], dtype=float)


# ----------------------------------------------------------------------------------------------------
# hand-counted: unknown (-1) and ignored voxels are not counted
# ----------------------------------------------------------------------------------------------------
def check_unknown_voxel_masking(dice_fn, mean_fn):
    # voxel:        0  1   2  3  4   5          counted: 0, 1, 3, 4 (2 and 5 unknown)
    pred = torch.tensor([[0, 1, 1, 2, 2, 0]])
    ref = torch.tensor([[0, 1, -1, 2, 1, -1]])
    # class 1: tp = voxel 1, fn = voxel 4 (voxel 2 is unknown) -> 2/3; class 2: tp = 3, fp = 4 -> 2/3
    assert dice_fn(pred, ref, 3).tolist() == pytest.approx([2 / 3, 2 / 3])
    # a class predicted only on unknown voxels is absent over the counted voxels: NaN, not 0
    d = dice_fn(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, -1]]), 3)
    assert d[0] == pytest.approx(1.0) and math.isnan(d[1])
    assert mean_fn(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, -1]]), 3) == pytest.approx(1.0)
    # the cases of the trainer's former multiclass_dice test
    assert mean_fn(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, -1, 2]]), 3) == pytest.approx(1.0)
    assert math.isnan(mean_fn(torch.tensor([[0, 0, 2]]), torch.tensor([[0, 0, -1]]), 3))
    # counts are pooled over the batch: class 1 has tp 1 (sample 0), fn 1 (sample 1); voxel (1, 2) unknown
    pred = torch.tensor([[1, 0, 2], [0, 0, 1]])
    ref = torch.tensor([[1, 0, 2], [1, 0, -1]])
    assert dice_fn(pred, ref, 3).tolist() == pytest.approx([2 / 3, 1.0])


def test_unknown_voxels_are_not_counted():
    check_unknown_voxel_masking(dice_per_class, mean_foreground_dice)


def test_broken_unknown_voxel_masking_is_caught(monkeypatch):
    """If the mask did not reach nnU-Net's counting, the hand-counted checks above would fail."""
    original = metrics.get_tp_fp_fn_tn

    def without_mask(net_output, gt, axes=None, mask=None, square=False):
        return original(net_output, gt, axes=axes, mask=None, square=square)

    monkeypatch.setattr(metrics, "get_tp_fp_fn_tn", without_mask)
    with pytest.raises(AssertionError):
        check_unknown_voxel_masking(dice_per_class, mean_foreground_dice)


def test_ignore_label_and_ignore_mask():
    pred = torch.tensor([[1, 1, 2, 2, 0]])
    ref = torch.tensor([[1, 3, 2, -1, 3]])  # 3 = an nnU-Net ignore label
    # without ignore, label 3 is no class: the 1 predicted on it is a false positive
    assert dice_per_class(pred, ref, 3).tolist() == pytest.approx([2 / 3, 1.0])
    assert dice_per_class(pred, ref, 3, ignore=3).tolist() == pytest.approx([1.0, 1.0])
    mask = torch.tensor([[False, False, True, False, False]])  # excludes voxel 2: class 2 then absent
    d = dice_per_class(pred, ref, 3, ignore=mask)
    assert d[0] == pytest.approx(2 / 3) and math.isnan(d[1])
    assert mean_foreground_dice(pred, ref, 3, ignore=mask) == pytest.approx(2 / 3)


def test_empty_classes_are_nan_and_left_out_of_the_mean():
    zeros = torch.zeros(2, 3, 4, dtype=torch.long)
    assert torch.isnan(dice_per_class(zeros, zeros, 4)).all()
    assert math.isnan(mean_foreground_dice(zeros, zeros, 4))
    ref = zeros.clone()
    ref[0, 0, 0] = 2
    d = dice_per_class(zeros, ref, 4)  # class 2 missed: 0; classes 1 and 3 absent from both: NaN
    assert math.isnan(d[0]) and d[1] == 0.0 and math.isnan(d[2])
    assert mean_foreground_dice(zeros, ref, 4) == 0.0
    assert dice_per_class(zeros, zeros, 1).numel() == 0 and math.isnan(mean_foreground_dice(zeros, zeros, 1))


# ----------------------------------------------------------------------------------------------------
# against nnU-Net's compute_metrics
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_nnunet_compute_metrics(seed, tmp_path):
    rng = np.random.default_rng(seed)
    k = 5
    shape = (2, 6, 7, 8)
    reference = rng.integers(0, 4, shape)  # class 4 never in the reference ...
    prediction = rng.integers(0, 4, shape)
    prediction[0, 0, 0, :3] = 4  # ... and rare in the prediction (Dice 0)
    prediction[prediction == 3] = 2  # class 3 only in the reference (Dice 0)
    ours = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference), k).numpy()
    theirs = _nnunet_dice(prediction, reference, k, tmp_path)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert ours[2] == 0.0 and ours[3] == 0.0 and 0 < ours[0] < 1

    # unknown voxels (-1 here) are what nnU-Net's ignore label (written as k) excludes; an absent class is NaN
    unknown = rng.random(shape) < 0.3
    reference[unknown] = -1
    prediction[prediction == 4] = 0
    ours = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference), k).numpy()
    theirs = _nnunet_dice(prediction, np.where(unknown, k, reference), k, tmp_path, ignore_label=k)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, equal_nan=True)
    assert np.isnan(ours[3]) and np.isnan(theirs[3])
    assert mean_foreground_dice(prediction, reference, k) == pytest.approx(float(np.nanmean(theirs)), rel=1e-12)
    # numpy input, an int ignore label and an equivalent bool mask give the same numbers
    as_label = dice_per_class(prediction, np.where(unknown, k, reference), k, ignore=k).numpy()
    as_mask = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(np.where(unknown, 0, reference)), k,
                             ignore=torch.from_numpy(unknown)).numpy()
    np.testing.assert_allclose(as_label, theirs, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(as_mask, theirs, rtol=1e-12, equal_nan=True)


def test_chunked_counting_gives_the_same_counts(monkeypatch):
    g = torch.Generator().manual_seed(3)
    prediction = torch.randint(0, 4, (3, 5, 9, 11), generator=g)
    reference = torch.randint(-1, 4, (3, 5, 9, 11), generator=g)
    whole = dice_per_class(prediction, reference, 4)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7)  # 2 voxels per chunk, many chunks, a ragged last one
    torch.testing.assert_close(dice_per_class(prediction, reference, 4), whole, rtol=0, atol=0)


def test_bad_inputs_are_refused():
    labels = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_class(labels, torch.zeros(1, 5, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="integer labels"):
        dice_per_class(torch.zeros(1, 4), labels, 3)
    with pytest.raises(ValueError, match="bool"):
        dice_per_class(labels, labels, 3, ignore=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="ignore"):
        dice_per_class(labels, labels, 3, ignore=True)
    with pytest.raises(ValueError, match=r"\(B, \*spatial\)"):
        dice_per_class(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3)


# ----------------------------------------------------------------------------------------------------
# folders of files (nnU-Net's compute_metrics_on_folder)
# ----------------------------------------------------------------------------------------------------
def _dataset(tmp_path, labels, cases):
    """``cases``: identifier -> (prediction, reference) arrays; returns (pred folder, ref folder, dataset.json)."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for case, (p, r) in cases.items():
        _write(p, pred / f"{case}.nii.gz")
        _write(r, ref / f"{case}.nii.gz")
    (pred / "plans.json").write_text("{}")  # nnUNetv2_predict's side files are not cases
    meta = {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "MR"}, "numTraining": 0}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return str(pred), str(ref), str(tmp_path / "dataset.json")


def test_folder_dice_per_class_and_empty_classes(tmp_path):
    rng = np.random.default_rng(5)
    a_ref = rng.integers(0, 2, (4, 6, 6))  # case a: no lesion (2) in the reference ...
    a_pred = np.where(rng.random(a_ref.shape) < 0.2, 1 - a_ref, a_ref)  # ... nor in the prediction
    b_ref = rng.integers(0, 3, (4, 6, 6))
    b_pred = np.where(rng.random(b_ref.shape) < 0.3, rng.integers(0, 3, b_ref.shape), b_ref)
    b_ref[0, 0, :3] = 3  # nnU-Net's ignore label: not counted
    b_pred[0, 0, :3] = 1
    labels = {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
    pred, ref, dataset_json = _dataset(tmp_path, labels, {"a": (a_pred, a_ref), "b": (b_pred, b_ref)})

    out = dice_per_class_on_folders(pred, ref, dataset_json, output_file=str(tmp_path / "summary.json"),
                                    num_processes=1)
    assert list(out.per_case) == ["a", "b"] and list(out.per_class) == ["organ", "lesion"]
    # per case: the tensor helper on the same maps (ignore label 3)
    for case, (p, r) in {"a": (a_pred, a_ref), "b": (b_pred, b_ref)}.items():
        expected = dice_per_class(p[None], r[None], 3, ignore=3).tolist()
        np.testing.assert_allclose([out.per_case[case]["organ"], out.per_case[case]["lesion"]], expected,
                                   equal_nan=True)
    # empty/empty is NaN (nnU-Net's convention), left out of the class mean: not averaged in as a 1.0
    assert math.isnan(out.per_case["a"]["lesion"]) and 0 < out.per_case["b"]["lesion"] < 1
    assert out.per_class["lesion"] == pytest.approx(out.per_case["b"]["lesion"])
    assert out.per_class["organ"] == pytest.approx(np.mean([out.per_case[c]["organ"] for c in "ab"]))
    assert out.mean == pytest.approx((out.per_class["organ"] + out.per_class["lesion"]) / 2)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["mean"]["2"]["Dice"] == pytest.approx(out.per_class["lesion"]) and out.summary_file

    # a class absent from every case: NaN for it, and nnU-Net's foreground mean is NaN too
    (tmp_path / "only_a").mkdir()
    pred, ref, dataset_json = _dataset(tmp_path / "only_a", {"background": 0, "organ": 1, "lesion": 2},
                                       {"a": (a_pred, a_ref)})
    out = dice_per_class_on_folders(pred, ref, dataset_json, num_processes=1)
    assert math.isnan(out.per_class["lesion"]) and math.isnan(out.mean) and out.summary_file is None
    assert out.per_class["organ"] == pytest.approx(dice_per_class(a_pred[None], a_ref[None], 2).item())

    os.remove(os.path.join(pred, "a.nii.gz"))
    with pytest.raises(ValueError, match=r"missing \['a.nii.gz'\]"):
        dice_per_class_on_folders(pred, ref, dataset_json)
