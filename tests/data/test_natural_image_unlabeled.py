"""Natural-image 2D datasets (nnU-Net's RGB PNG convention, as its road-segmentation example): one
``<case>_0000.png`` holds the three channels declared as R, G, B in dataset.json, read by ``NaturalImage2DIO``.
The unlabeled preprocessing takes such cases as nnU-Net takes them in ``imagesTr``; the 2D SAM backends get
the three channels as RGB by default; the stock CLI plans, trains nnUNetTrainerMeanTeacher and predicts."""
import os
import re

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json
from PIL import Image

from nnunetv2_samssl.data.unlabeled_preprocessing import (UnlabeledDataError, collect_unlabeled_cases, image_problem,
                                                          main, preprocess_unlabeled, unlabeled_preprocessed_folder)
from cli_helpers import cli_env as _env, run_cli as _run
from conftest import OtherDatasetEnv, build_session_dataset, private_copy, set_network_widths

RGB_ID = 976
RGB_NAME = "Dataset976_RGBTiny"
SIZE = 64


class RgbEnv(OtherDatasetEnv):
    dataset_name = RGB_NAME

    @classmethod
    def at(cls, root: str) -> "RgbEnv":
        return cls(root, os.path.join(root, "raw"), os.path.join(root, "preprocessed"), os.path.join(root, "results"))


def _photo(rng: np.random.Generator):
    """A 64 x 64 RGB picture (uint8) with a red disc (label 1) and a blue square (label 2) on a noisy grey ground."""
    image = rng.normal(110, 12, size=(SIZE, SIZE, 3))
    label = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx, r = rng.integers(14, 50), rng.integers(14, 50), rng.integers(6, 11)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    y0, x0, s = rng.integers(2, 44), rng.integers(2, 44), rng.integers(8, 16)
    square = np.zeros_like(disc)
    square[y0:y0 + s, x0:x0 + s] = True
    image[disc] = (200, 40, 40) + rng.normal(0, 8, size=(int(disc.sum()), 3))
    image[square] = (40, 50, 210) + rng.normal(0, 8, size=(int(square.sum()), 3))
    label[disc], label[square] = 1, 2
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_rgb_dataset(raw: str, num_labeled: int = 8, num_unlabeled: int = 4, num_test: int = 2, seed: int = 0) -> str:
    """nnU-Net's RGB PNG layout: imagesTr/<case>_0000.png (H x W x 3), labelsTr/<case>.png, channel_names R, G, B;
    plus imagesUnlabeled/ and imagesTs/ in the same layout."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    folder = os.path.join(raw, RGB_NAME)
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for prefix, n, images, labels in (("tr", num_labeled, "imagesTr", "labelsTr"), ("u", num_unlabeled,
                                      "imagesUnlabeled", None), ("ts", num_test, "imagesTs", "labelsTs")):
        for i in range(n):
            image, label = _photo(rng)
            Image.fromarray(image, "RGB").save(os.path.join(folder, images, f"{prefix}{i:03d}_0000.png"))
            if labels is not None:
                Image.fromarray(label).save(os.path.join(folder, labels, f"{prefix}{i:03d}.png"))
    generate_dataset_json(folder, {0: "R", 1: "G", 2: "B"}, {"background": 0, "disc": 1, "square": 2}, num_labeled,
                          ".png", dataset_name=RGB_NAME)
    return folder


def _plan_and_preprocess(raw: str) -> None:
    write_rgb_dataset(raw)
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(os.path.join(raw, RGB_NAME), num_processes=1)
    extractor = DatasetFingerprintExtractor(RGB_ID, num_processes=1)
    extractor.num_foreground_voxels_for_intensitystats = 10 ** 5  # nnU-Net samples 10^8 values: seconds per case
    extractor.run()
    plan_experiments([RGB_ID])
    set_network_widths(os.path.join(os.environ["nnUNet_preprocessed"], RGB_NAME), 8, 64)  # fast CPU steps
    preprocess([RGB_ID], configurations=("2d",), num_processes=(1,), verbose=False)


@pytest.fixture(scope="module")
def rgb_dataset(tmp_path_factory) -> RgbEnv:
    """The RGB dataset planned and preprocessed (2d) with nnU-Net's API, in-process, once per module."""
    return build_session_dataset(tmp_path_factory, "nnunet_rgb", _plan_and_preprocess, RgbEnv)


@pytest.fixture
def rgb_env(rgb_dataset, tmp_path, monkeypatch) -> RgbEnv:
    return private_copy(rgb_dataset, tmp_path, monkeypatch, "nnunet_rgb")


def _unlabeled(env, name=""):
    return os.path.join(env.dataset_raw, "imagesUnlabeled", name)


def test_one_rgb_png_per_case_is_a_complete_case(rgb_env):
    """What nnU-Net itself does with imagesTr: the planner read the dataset with NaturalImage2DIO, three channels
    from one file; the unlabeled cases are grouped and counted the same way."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    plans = load_json(os.path.join(rgb_env.dataset_pp, "nnUNetPlans.json"))
    assert plans["image_reader_writer"] == "NaturalImage2DIO"
    dataset_json = load_json(os.path.join(rgb_env.dataset_pp, "dataset.json"))
    cases = collect_unlabeled_cases(rgb_env.dataset_raw, dataset_json)  # reader determined from dataset.json
    assert cases == {f"u{i:03d}": [_unlabeled(rgb_env, f"u{i:03d}_0000.png")] for i in range(4)}
    assert collect_unlabeled_cases(rgb_env.dataset_raw, dataset_json, NaturalImage2DIO()) == cases
    assert image_problem(cases["u000"], NaturalImage2DIO(), dataset_is_3d=False, num_channels=3) is None


def test_preprocessed_like_nnunet_inference(rgb_env, capsys):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_samssl.data.unlabeled_dataset import UnlabeledDataset, UnlabeledSource
    main(["-d", str(RGB_ID), "-c", "2d", "-np", "1"])
    assert "4 unlabeled case(s), 0 already done, 4 to preprocess" in capsys.readouterr().out
    plans = PlansManager(os.path.join(rgb_env.dataset_pp, "nnUNetPlans.json"))
    cm = plans.get_configuration("2d")
    dataset_json = load_json(os.path.join(rgb_env.dataset_pp, "dataset.json"))
    expected, _, _ = cm.preprocessor_class(verbose=False).run_case([_unlabeled(rgb_env, "u002_0000.png")], None,
                                                                   plans, cm, dataset_json)
    folder = unlabeled_preprocessed_folder(rgb_env.dataset_pp, cm.data_identifier)
    data, seg, _, _ = UnlabeledDataset([UnlabeledSource(folder, ("u002",))]).load_case("u002")
    assert data.shape == (3, 1, SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(data[:]), expected.astype(np.float32))
    assert not np.any(seg)


def _grey_png(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("kind, problem", [
    ("grey", "NaturalImage2DIO reads 1 channel(s) from its 1 file(s) but dataset.json declares 3"),
    ("truncated", "u_bad_0000.png cannot be read"),
    ("rgba", "NaturalImage2DIO reads 4 channel(s) from its 1 file(s) but dataset.json declares 3"),
])
def test_integrity_check_of_png_cases(rgb_env, capsys, kind, problem):
    """A grey or RGBA picture in an RGB dataset, or a truncated file: one line naming the case; nothing written;
    --skip_bad_cases leaves it out."""
    bad = _unlabeled(rgb_env, "u_bad_0000.png")
    if kind == "grey":
        _grey_png(bad)
    elif kind == "rgba":
        Image.fromarray(np.full((SIZE, SIZE, 4), 99, np.uint8), "RGBA").save(bad)
    else:
        data = open(_unlabeled(rgb_env, "u001_0000.png"), "rb").read()
        with open(bad, "wb") as f:
            f.write(data[: len(data) // 2])
    with pytest.raises(UnlabeledDataError) as error:
        preprocess_unlabeled(RGB_ID, "2d", num_processes=1)
    assert f"u_bad: {problem}" in str(error.value)
    folder = unlabeled_preprocessed_folder(rgb_env.dataset_pp, "nnUNetPlans_2d")
    assert not os.path.exists(folder)
    main(["-d", str(RGB_ID), "-c", "2d", "-np", "1", "--skip_bad_cases"])
    assert f"u_bad: {problem}" in capsys.readouterr().err
    assert sorted(f for f in os.listdir(folder) if f.endswith(".pkl")) == [f"u{i:03d}.pkl" for i in range(4)]


def test_wrong_channels_are_still_refused(rgb_env):
    """Cases from which the reader gets other channels than R, G, B are refused with the usual message, which
    names what the reader got and the RGB convention; a case with one grey file per channel (_0000 .. _0002,
    the standard layout) is accepted, as nnU-Net accepts it."""
    for i in range(4):
        os.remove(_unlabeled(rgb_env, f"u{i:03d}_0000.png"))
    _grey_png(_unlabeled(rgb_env, "u_grey_0000.png"))
    with pytest.raises(UnlabeledDataError) as error:
        preprocess_unlabeled(RGB_ID, "2d", num_processes=1)
    message = str(error.value)
    assert "dataset.json declares 3 channel(s) (_0000 .. _0002) but 1 unlabeled case(s) have other channels, " \
           "e.g. 'u_grey' has [0] (NaturalImage2DIO reads 1 channel(s) from them)" in message
    assert "one RGB <case>_0000.png for channels R, G, B" in message
    os.remove(_unlabeled(rgb_env, "u_grey_0000.png"))
    for c in range(3):
        _grey_png(_unlabeled(rgb_env, f"u_split_{c:04d}.png"))
    assert preprocess_unlabeled(RGB_ID, "2d", num_processes=1, verbose=False)
    _grey_png(_unlabeled(rgb_env, "u_gap_0000.png"))
    _grey_png(_unlabeled(rgb_env, "u_gap_0002.png"))
    with pytest.raises(UnlabeledDataError, match=r"e\.g\. 'u_gap' has \[0, 2\]\. Each case needs exactly one file"):
        preprocess_unlabeled(RGB_ID, "2d", num_processes=1)


def test_2d_sam_backends_see_rgb_by_default(rgb_env, monkeypatch):
    """The default sam_image_channel ('auto') feeds the channels R, G, B to a 2D backend as RGB; SAM-Med3D (one
    channel) and datasets without R, G, B channels get channel 0."""
    import torch

    import nnunetv2_samssl.sam.registry as registry
    from nnunetv2_samssl.pseudo_labels.sam_online import resolve_image_channel
    from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM
    from sam_fakes import SPACE_2D, FakeSam

    assert resolve_image_channel("auto", {"0": "B", "1": "G", "2": "R"}, backend_is_2d=True) == (2, 1, 0)
    assert resolve_image_channel("auto", {"0": "R", "1": "G", "2": "B"}, backend_is_2d=False) == 0
    assert resolve_image_channel("auto", {"0": "CT"}, backend_is_2d=True) == 0
    asked = []

    def build(backend, checkpoint, device, **kwargs):
        asked.append((backend, kwargs))
        return FakeSam(SPACE_2D)

    monkeypatch.setattr(registry, "build_promptable_model", build)
    monkeypatch.setenv("nnUNet_samssl_overrides", "sam_backend=sam2d_vit_b sam_random_init=true num_epochs=1")
    plans = load_json(os.path.join(rgb_env.dataset_pp, "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnUNetv2_train sets
    dataset_json = load_json(os.path.join(rgb_env.dataset_pp, "dataset.json"))
    trainer = nnUNetTrainerSemiSAM(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    assert trainer.settings.sam_model.sam_image_channel == "auto"  # the bundled default
    trainer.initialize()
    assert [(backend, kwargs["image_channel"]) for backend, kwargs in asked] == [("sam2d_vit_b", (0, 1, 2))]






@pytest.mark.slow
def test_stock_cli_plans_trains_mean_teacher_and_predicts_rgb_png(tmp_path):
    """Raw RGB PNGs -> nnUNetv2_plan_and_preprocess -c 2d -> nnUNetv2_samssl_preprocess_unlabeled ->
    nnUNetv2_train -tr nnUNetTrainerMeanTeacher -> nnUNetv2_predict: PNG segmentations of the test pictures."""
    e = RgbEnv.at(str(tmp_path))
    write_rgb_dataset(e.raw)
    os.makedirs(e.results)
    env = _env(e)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails on cli_env's 0
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(RGB_ID), "-c", "2d", "-np", "1", "-npfp", "1",
          "--verify_dataset_integrity"], dict(env, nnUNet_n_proc_DA="1"))
    set_network_widths(e.dataset_pp, 8, 64)  # a narrower U-Net than planned: fast CPU steps
    out = _run(["nnUNetv2_samssl_preprocess_unlabeled", "-d", str(RGB_ID), "-c", "2d", "-np", "1"], env)
    assert "4 unlabeled case(s), 0 already done, 4 to preprocess" in out
    settings = "num_epochs=1 num_iterations_per_epoch=3 num_val_iterations_per_epoch=1 unlabeled_batch_size=2"
    out = _run(["nnUNetv2_train", str(RGB_ID), "2d", "0", "-tr", "nnUNetTrainerMeanTeacher", "-device", "cpu"],
               _env(e, nnUNet_samssl_overrides=settings))
    assert re.search(r"consistency_loss [0-9.]+", out), out[-3000:]  # trained on the unlabeled RGB pictures
    fold = os.path.join(e.results, RGB_NAME, "nnUNetTrainerMeanTeacher__nnUNetPlans__2d", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    pred = str(tmp_path / "pred")
    _run(["nnUNetv2_predict", "-i", os.path.join(e.dataset_raw, "imagesTs"), "-o", pred, "-d", str(RGB_ID),
          "-c", "2d", "-tr", "nnUNetTrainerMeanTeacher", "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
          "--disable_tta"], env)
    assert sorted(f for f in os.listdir(pred) if f.endswith(".png")) == ["ts000.png", "ts001.png"]
    for case in ("ts000", "ts001"):
        p = np.asarray(Image.open(os.path.join(pred, case + ".png")))
        assert p.shape == (SIZE, SIZE) and set(np.unique(p)) <= {0, 1, 2}
