"""The demo's evaluation of held-out predictions (nnU-Net's compute_metrics_on_folder) and its printed table."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_samssl.demo import run_demo
from nnunetv2_samssl.demo.synthetic import make_demo_dataset


def _predictions(raw: Path, folder: Path, change=None) -> str:
    """``labelsTs`` copied as predictions (``change(case, array) -> array`` edits a case), plus a side file as
    ``nnUNetv2_predict`` writes."""
    folder.mkdir(parents=True)
    for f in sorted((raw / "labelsTs").glob("*.nii.gz")):
        if change is None:
            shutil.copy(f, folder / f.name)
            continue
        image = sitk.ReadImage(str(f))
        edited = sitk.GetImageFromArray(change(f.name, sitk.GetArrayFromImage(image)))
        edited.CopyInformation(image)
        sitk.WriteImage(edited, str(folder / f.name))
    (folder / "plans.json").write_text("{}")
    return str(folder)


def test_demo_evaluation_and_table(tmp_path):
    raw = Path(make_demo_dataset(str(tmp_path / "raw"), dataset_id=955, num_labeled=1, num_unlabeled=0, num_test=2,
                                 shape=(16, 20, 20), seed=4))
    cases = sorted(f.name for f in (raw / "labelsTs").glob("*.nii.gz"))
    perfect = _predictions(raw, tmp_path / "perfect")
    empty = _predictions(raw, tmp_path / "empty", lambda case, a: np.zeros_like(a))
    # the first case's reference loses its lesion and so does its prediction: no lesion Dice for that case
    reference = tmp_path / "raw_no_lesion"
    shutil.copytree(raw, reference)
    first = reference / "labelsTs" / cases[0]
    image = sitk.ReadImage(str(first))
    no_lesion = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(image) == 2, 0, sitk.GetArrayFromImage(image))
                                       .astype(np.uint8))
    no_lesion.CopyInformation(image)
    sitk.WriteImage(no_lesion, str(first))
    half = _predictions(reference, tmp_path / "half",
                        lambda case, a: a if case == cases[0] else np.where(a == 2, 0, a))

    results = {"perfect": run_demo.evaluate_predictions(perfect, str(raw), 1),
               "empty": run_demo.evaluate_predictions(empty, str(raw), 1),
               "no_lesion": run_demo.evaluate_predictions(half, str(reference), 1)}
    assert results["perfect"].per_class == {"organ": 1.0, "lesion": 1.0} and results["perfect"].mean == 1.0
    assert results["empty"].per_class == {"organ": 0.0, "lesion": 0.0}
    nl = results["no_lesion"]
    # case 0: lesion absent from both -> NaN, left out (the former demo counted it as 1.0); case 1: lesion missed
    assert math.isnan(nl.per_case[cases[0][:-7]]["lesion"]) and nl.per_case[cases[1][:-7]]["lesion"] == 0.0
    assert nl.per_class["lesion"] == 0.0 and nl.per_class["organ"] == 1.0 and nl.mean == pytest.approx(0.5)
    summary = json.loads((Path(perfect) / "summary.json").read_text())  # nnU-Net's summary, next to the predictions
    assert [Path(c["reference_file"]).name for c in summary["metric_per_case"]] == cases

    table = run_demo.results_table(results, "Held-out Dice:").splitlines()
    assert table[0] == "Held-out Dice:"
    assert table[1].split() == ["trainer", "organ", "lesion", "mean"]
    assert table[2].split() == ["perfect", "1.000", "1.000", "1.000"]
    assert table[3].split() == ["empty", "0.000", "0.000", "0.000"]
    assert table[4].split() == ["no_lesion", "1.000", "0.000", "0.500"]
    assert "absent from both" in "\n".join(table[5:])
