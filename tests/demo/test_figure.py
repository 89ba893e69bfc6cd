"""The demo's picture: slice choice, per-slice Dice, the PNG."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_samssl.demo.figure import pick_slice, read_label_names, save_segmentation_figure, slice_dice
from nnunetv2_samssl.demo.run_demo import demo_figure


def _reference():
    ref = np.zeros((6, 20, 24), np.uint8)
    ref[1, 2:6, 2:6] = 1                       # one class, 16 voxels
    ref[3, 2:12, 2:12] = 1                     # one class, 100 voxels
    ref[4, 2:5, 2:5], ref[4, 10:13, 10:13] = 1, 2  # two classes, 18 voxels: the most classes wins
    return ref


def test_pick_slice_prefers_more_classes_then_more_foreground():
    ref = _reference()
    assert pick_slice(ref) == 4
    ref[4] = 0
    assert pick_slice(ref) == 3
    assert pick_slice(np.moveaxis(_reference(), 0, 2), axis=2) == 4
    with pytest.raises(ValueError, match="3D"):
        pick_slice(ref[0])


def test_slice_dice():
    ref = np.zeros((4, 4), int)
    ref[:2] = 1
    pred = np.zeros((4, 4), int)
    pred[:1] = 1
    pred[3, 3] = 2  # a class only predicted scores 0
    assert slice_dice(pred, ref, [1, 2]) == pytest.approx((2 * 4 / (4 + 8) + 0.0) / 2)
    assert np.isnan(slice_dice(np.zeros((4, 4)), np.zeros((4, 4)), [1, 2]))


def test_figure_is_written_and_checks_shapes(tmp_path):
    ref = _reference()[4]
    image = np.random.default_rng(0).normal(size=ref.shape)
    path = save_segmentation_figure(str(tmp_path / "f.png"), image, ref, {"a": ref, "b": np.zeros_like(ref)},
                                    {1: "organ", 2: "lesion"}, title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="shape"):
        save_segmentation_figure(str(tmp_path / "g.png"), image, ref, {"a": ref[:5]}, {1: "organ"})
    assert read_label_names({"labels": {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}}) == \
        {1: "organ", 2: "lesion"}


def test_demo_figure_reads_the_first_held_out_case(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for sub in ("imagesTs", "labelsTs", "pred_a"):
        (raw / sub).mkdir(parents=True)
    ref = _reference()
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(raw / "labelsTs" / "c1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(ref.astype(np.float32)), str(raw / "imagesTs" / "c1_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(raw / "pred_a" / "c1.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    seen = {}
    import nnunetv2_samssl.demo.figure as figure
    real = figure.save_segmentation_figure
    monkeypatch.setattr(figure, "save_segmentation_figure",
                        lambda path, image, reference, panels, names, title: (seen.update(panels=panels, ref=reference),
                                                                              real(path, image, reference, panels,
                                                                                   names, title))[1])
    path = demo_figure(str(raw), {"a": str(raw / "pred_a")}, str(tmp_path / "demo.png"))
    assert os.path.isfile(path)
    np.testing.assert_array_equal(seen["ref"], ref[4])  # the slice showing both classes
    np.testing.assert_array_equal(seen["panels"]["a"], ref[4])
