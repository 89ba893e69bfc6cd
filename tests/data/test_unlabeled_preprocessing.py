import os
import shutil

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIG, DATASET_ID
from nnunetv2_samssl.data.unlabeled_dataset import UnlabeledDataset, UnlabeledSource
from nnunetv2_samssl.data.unlabeled_preprocessing import (UnlabeledDataError, main, preprocess_unlabeled,
                                                          unlabeled_preprocessed_folder)


def out_folder(env):
    return unlabeled_preprocessed_folder(env.dataset_pp, "nnUNetPlans_3d_fullres")


def test_matches_nnunet_inference_preprocessing(nnunet_env):
    """Each unlabeled case equals what nnU-Net's own preprocessor makes of the image at inference."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(os.path.join(nnunet_env.dataset_pp, "nnUNetPlans.json"))
    cm = plans.get_configuration(CONFIG)
    dataset_json = load_json(os.path.join(nnunet_env.dataset_pp, "dataset.json"))
    image = os.path.join(nnunet_env.dataset_raw, "imagesUnlabeled", "unl_001_0000.nii.gz")
    expected, _, props = cm.preprocessor_class(verbose=False).run_case([image], None, plans, cm, dataset_json)
    data, seg, _, properties = UnlabeledDataset([UnlabeledSource(out_folder(nnunet_env), ("unl_001",))]) \
        .load_case("unl_001")
    np.testing.assert_array_equal(np.asarray(data[:]), expected.astype(np.float32))
    assert not np.any(seg) and properties["class_locations"] == {}
    assert properties["shape_after_cropping_and_before_resampling"] == props["shape_after_cropping_and_before_resampling"]


def test_idempotent_skips_finished_cases_and_redoes_interrupted(nnunet_env, capsys):
    folder = out_folder(nnunet_env)
    mtimes = {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".b2nd")}
    os.remove(os.path.join(folder, "unl_002.pkl"))  # as if killed before finishing that case
    open(os.path.join(folder, ".tmp_unl_002.b2nd"), "wb").close()
    preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1)
    assert "3 unlabeled case(s), 2 already done, 1 to preprocess" in capsys.readouterr().out
    for f, t in mtimes.items():
        changed = os.path.getmtime(os.path.join(folder, f)) != t
        assert changed == f.startswith("unl_002"), f
    assert not any(f.startswith(".tmp_") for f in os.listdir(folder))


def test_other_plans_are_redone(nnunet_env, capsys):
    manifest = os.path.join(out_folder(nnunet_env), "unlabeled_manifest.json")
    text = open(manifest).read().replace('"fingerprint": "', '"fingerprint": "x')
    open(manifest, "w").write(text)
    preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1)
    assert "another configuration" in capsys.readouterr().out


def test_plans_sharing_the_data_identifier_share_the_folder(nnunet_env, capsys):
    """nnU-Net reuses preprocessed data across plans files with one data_identifier (another network, patch or
    batch size): so does the unlabeled folder. What shapes the data (spacing, normalisation, the plans' intensity
    statistics) still makes it stale. Manifests of the earlier fingerprint (the whole configuration) are kept."""
    import json
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2_samssl.data.unlabeled_preprocessing import (_legacy_fingerprint, check_unlabeled_folder,
                                                              configuration_fingerprint)
    folder = out_folder(nnunet_env)
    plans = load_json(os.path.join(nnunet_env.dataset_pp, "nnUNetPlans.json"))
    dataset_json = load_json(os.path.join(nnunet_env.dataset_pp, "dataset.json"))
    name = os.path.basename(nnunet_env.dataset_pp)

    def check(p):
        return check_unlabeled_folder(folder, p, dataset_json, name, CONFIG, p["plans_name"])

    cases = check(plans)
    other = json.loads(json.dumps(plans))
    other["plans_name"] = "nnUNetPlansWide"
    cfg = other["configurations"][CONFIG]
    cfg["batch_size"] += 1
    cfg["patch_size"] = [s // 2 * 2 for s in cfg["patch_size"]]
    arch = cfg["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [2 * f for f in arch["features_per_stage"]]
    assert check(other) == cases
    save_json(other, os.path.join(nnunet_env.dataset_pp, "nnUNetPlansWide.json"))
    mtimes = {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".b2nd")}
    preprocess_unlabeled(DATASET_ID, CONFIG, plans_identifier="nnUNetPlansWide", num_processes=1)
    assert f"{len(cases)} already done, 0 to preprocess" in capsys.readouterr().out
    assert all(os.path.getmtime(os.path.join(folder, f)) == t for f, t in mtimes.items())

    for change in ("spacing", "normalization", "intensities"):
        stale = json.loads(json.dumps(plans))
        if change == "spacing":
            stale["configurations"][CONFIG]["spacing"][0] *= 2
        elif change == "normalization":
            stale["configurations"][CONFIG]["normalization_schemes"] = ["CTNormalization"]
        else:
            stale["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0
        with pytest.raises(UnlabeledDataError, match="preprocessed with other plans than the current ones"):
            check(stale)

    manifest_file = os.path.join(folder, "unlabeled_manifest.json")
    manifest = load_json(manifest_file)
    manifest["fingerprint"] = _legacy_fingerprint(plans["configurations"][CONFIG], dataset_json)
    save_json(manifest, manifest_file)
    assert check(plans) == cases
    preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1)
    assert f"{len(cases)} already done, 0 to preprocess" in capsys.readouterr().out
    assert load_json(manifest_file)["fingerprint"] == configuration_fingerprint(plans, CONFIG, dataset_json)


def _raw(env, *parts):
    return os.path.join(env.dataset_raw, *parts)


def test_missing_folder(nnunet_env):
    shutil.rmtree(_raw(nnunet_env, "imagesUnlabeled"))
    with pytest.raises(UnlabeledDataError, match="imagesUnlabeled does not exist.*num_labeled"):
        preprocess_unlabeled(DATASET_ID, CONFIG)


def test_empty_folder(nnunet_env):
    shutil.rmtree(_raw(nnunet_env, "imagesUnlabeled"))
    os.makedirs(_raw(nnunet_env, "imagesUnlabeled"))
    with pytest.raises(UnlabeledDataError, match="contains no images"):
        preprocess_unlabeled(DATASET_ID, CONFIG)


def test_wrong_number_of_channels(nnunet_env):
    src = _raw(nnunet_env, "imagesUnlabeled", "unl_000_0000.nii.gz")
    shutil.copy(src, _raw(nnunet_env, "imagesUnlabeled", "unl_000_0001.nii.gz"))
    with pytest.raises(UnlabeledDataError, match="declares 1 channel.*'unl_000' has \\[0, 1\\]"):
        preprocess_unlabeled(DATASET_ID, CONFIG)


def test_badly_named_file(nnunet_env):
    open(_raw(nnunet_env, "imagesUnlabeled", "scan.nii.gz"), "wb").close()
    with pytest.raises(UnlabeledDataError, match="must be named <case>_XXXX.nii.gz.*scan.nii.gz"):
        preprocess_unlabeled(DATASET_ID, CONFIG)


def test_case_id_equal_to_labeled_one(nnunet_env):
    shutil.copy(_raw(nnunet_env, "imagesTr", "tr_000_0000.nii.gz"), _raw(nnunet_env, "imagesUnlabeled"))
    with pytest.raises(UnlabeledDataError, match="equal labeled ones: \\['tr_000'\\]"):
        preprocess_unlabeled(DATASET_ID, CONFIG)


def test_plans_missing_and_configuration_not_preprocessed(nnunet_env):
    with pytest.raises(UnlabeledDataError, match="Plans file .*OtherPlans.json not found"):
        preprocess_unlabeled(DATASET_ID, CONFIG, plans_identifier="OtherPlans")
    with pytest.raises(UnlabeledDataError, match="Configuration '3d_lowres' is not in"):
        preprocess_unlabeled(DATASET_ID, "3d_lowres")
    with pytest.raises(UnlabeledDataError, match="'2d' is not preprocessed yet.*nnUNetv2_preprocess"):
        preprocess_unlabeled(DATASET_ID, "2d")


def test_command_line_reports_errors_without_traceback(nnunet_env, capsys):
    shutil.rmtree(_raw(nnunet_env, "imagesUnlabeled"))
    with pytest.raises(SystemExit) as e:
        main(["-d", str(DATASET_ID), "-c", CONFIG])
    assert e.value.code == 2
    assert "ERROR: No unlabeled images" in capsys.readouterr().err


def test_a_renamed_copy_of_a_test_or_training_image_is_refused(nnunet_env, capsys):
    """The transductive guard: an unlabeled image that is a byte copy of an imagesTs / imagesTr image is an error
    naming both files (nothing is written); --allow_duplicates keeps it with a warning."""
    unlabeled = os.path.join(nnunet_env.dataset_raw, "imagesUnlabeled")
    shutil.copy(os.path.join(nnunet_env.dataset_raw, "imagesTs", "ts_001_0000.nii.gz"),
                os.path.join(unlabeled, "unl_new_0000.nii.gz"))
    shutil.copy(os.path.join(nnunet_env.dataset_raw, "imagesTr", "tr_002_0000.nii.gz"),
                os.path.join(unlabeled, "unl_other_0000.nii.gz"))
    with pytest.raises(UnlabeledDataError) as error:
        preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1)
    message = str(error.value)
    assert "unl_new_0000.nii.gz = imagesTs/ts_001_0000.nii.gz" in message
    assert "unl_other_0000.nii.gz = imagesTr/tr_002_0000.nii.gz" in message and "--allow_duplicates" in message
    assert not os.path.exists(os.path.join(out_folder(nnunet_env), "unl_new.pkl"))
    # the command line prints that one line, no traceback
    with pytest.raises(SystemExit):
        main(["-d", str(DATASET_ID), "-c", CONFIG, "-np", "1"])
    assert "copies of training or test images" in capsys.readouterr().err
    main(["-d", str(DATASET_ID), "-c", CONFIG, "-np", "1", "--allow_duplicates"])
    assert "WARNING" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out_folder(nnunet_env), "unl_new.pkl"))


def _write_image(path, array, spacing=(1.0, 1.0, 2.0)):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[:array.ndim])
    sitk.WriteImage(image, path)


@pytest.mark.parametrize("kind, problem", [
    ("truncated", "unl_bad_0000.nii.gz is truncated or corrupt"),
    ("2d", "it is 2D (shape (1, 32, 32)) but the dataset's images are 3D"),
])
def test_unusable_unlabeled_images_stop_the_command_before_anything_is_written(nnunet_env, capsys, kind, problem):
    """The integrity check (nnU-Net's --verify_dataset_integrity for unlabeled images): one line naming the case
    and what is wrong; nothing is written; --skip_bad_cases leaves the case out with a warning, and training
    accepts the folder without it."""
    from nnunetv2_samssl.data.unlabeled_preprocessing import check_unlabeled_folder
    unlabeled = os.path.join(nnunet_env.dataset_raw, "imagesUnlabeled")
    bad = os.path.join(unlabeled, "unl_bad_0000.nii.gz")
    good = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)
    if kind == "truncated":  # an interrupted copy: the reader itself would return a partial volume
        _write_image(bad, good)
        data = open(bad, "rb").read()
        with open(bad, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        _write_image(bad, good[0][None])
    folder = out_folder(nnunet_env)
    manifest_before = open(os.path.join(folder, "unlabeled_manifest.json")).read() \
        if os.path.isfile(os.path.join(folder, "unlabeled_manifest.json")) else None
    with pytest.raises(UnlabeledDataError) as error:
        preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1)
    assert f"unl_bad: {problem}" in str(error.value) and "--skip_bad_cases" in str(error.value)
    assert not os.path.exists(os.path.join(folder, "unl_bad.pkl"))
    if manifest_before is not None:
        assert open(os.path.join(folder, "unlabeled_manifest.json")).read() == manifest_before

    main(["-d", str(DATASET_ID), "-c", CONFIG, "-np", "1", "--skip_bad_cases"])
    assert f"unl_bad: {problem}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(folder, "unl_bad.pkl"))
    plans = load_json(os.path.join(nnunet_env.dataset_pp, "nnUNetPlans.json"))
    cases = check_unlabeled_folder(folder, plans,
                                   load_json(os.path.join(nnunet_env.dataset_pp, "dataset.json")),
                                   "Dataset977_SamsslTiny", CONFIG, "nnUNetPlans", raw_dataset_folder=nnunet_env.dataset_raw)
    assert "unl_bad" not in cases and len(cases) == 3


def test_non_finite_values_and_channel_geometry_are_checked(tmp_path):
    """(SimpleITK's NIfTI IO turns NaN into 0, so this uses NRRD, which keeps it.)"""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2_samssl.data.unlabeled_preprocessing import image_problem
    good = np.zeros((8, 16, 16), np.float32)
    with_nan = good.copy()
    with_nan[1, 2, 3] = np.nan
    paths = {}
    for name, array, spacing in (("a", good, (1.0, 1.0, 2.0)), ("nan", with_nan, (1.0, 1.0, 2.0)),
                                 ("other_spacing", good, (1.0, 1.0, 3.0)), ("other_shape", good[:4], (1.0, 1.0, 2.0))):
        paths[name] = str(tmp_path / f"{name}.nrrd")
        _write_image(paths[name], array, spacing)
    reader = SimpleITKIO()
    assert image_problem([paths["a"]], reader, dataset_is_3d=True) is None
    assert "nan.nrrd has 1 non-finite value(s)" in image_problem([paths["nan"]], reader, True)
    assert "channels differ in geometry" in image_problem([paths["a"], paths["other_spacing"]], reader, True)
    assert "channels differ in geometry" in image_problem([paths["a"], paths["other_shape"]], reader, True)
    assert "but the dataset's images are 2D" in image_problem([paths["a"]], reader, dataset_is_3d=False)
