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
