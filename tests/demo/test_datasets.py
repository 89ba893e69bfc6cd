"""The demo and few-label dataset builders write valid, deterministic nnU-Net v2 raw datasets."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_samssl.demo import real_anatomy, synthetic
from nnunetv2_samssl.demo.real_anatomy import ANATOMY_CLASSES, MIN_CLASS_VOXELS, make_fewlabel_dataset
from nnunetv2_samssl.demo.synthetic import make_demo_dataset

SMALL_SHAPE = (20, 32, 32)
# synthesize_case(case_rng(0, "tr", i)) for i = 0, 1 (image then label bytes), as built before sites existed
EXPECTED_DEFAULT_DIGESTS = ["1555248463c6167b", "018546f8fbc16ae4"]


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _case_ids(folder: Path, with_channel: bool) -> set:
    suffix = "_0000.nii.gz" if with_channel else ".nii.gz"
    return {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")}


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_with_nnunet(folder: Path, capsys) -> None:
    """nnU-Net's own per-case checks (those of ``verify_dataset_integrity``, run in-process instead of in a
    spawned pool): case discovery from dataset.json, allowed label values, image/label shape, spacing,
    origin and direction agreement. Held-out ``imagesTs``/``labelsTs`` pairs get the same checks."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    meta = json.loads((folder / "dataset.json").read_text())
    dataset = get_filenames_of_train_images_and_targets(str(folder), meta)
    assert len(dataset) == meta["numTraining"]
    pairs = [(case["images"], case["label"]) for case in dataset.values()]
    pairs += [([str(p)], str(folder / "labelsTs" / p.name.replace("_0000", "")))
              for p in sorted((folder / "imagesTs").glob("*_0000.nii.gz"))]
    reader = determine_reader_writer_from_dataset_json(meta, pairs[0][0][0], verbose=False)
    expected_labels = sorted(meta["labels"].values())
    capsys.readouterr()
    for images, label in pairs:
        assert verify_labels(label, reader, expected_labels)
        assert check_cases(images, label, len(meta["channel_names"]), reader)
    printed = capsys.readouterr().out
    assert "Warning" not in printed and "Error" not in printed, printed


def _set_nnunet_paths(monkeypatch, raw: Path, root: Path) -> None:
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(root / "results"))
    (root / "preprocessed").mkdir(exist_ok=True)
    (root / "results").mkdir(exist_ok=True)


# ----------------------------------------------------------------------------------------------------
# synthetic demo dataset
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    return Path(make_demo_dataset(str(raw), dataset_id=951, num_labeled=5, num_unlabeled=3, num_test=2,
                                  shape=SMALL_SHAPE, seed=3))


def test_demo_layout_and_dataset_json(demo_folder):
    assert demo_folder.name == "Dataset951_SamsslDemo"
    meta = json.loads((demo_folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert meta["numTraining"] == 5 and meta["numUnlabeled"] == 3 and meta["numTest"] == 2
    assert meta["file_ending"] == ".nii.gz"

    train = _case_ids(demo_folder / "imagesTr", True)
    unlabeled = _case_ids(demo_folder / "imagesUnlabeled", True)
    test = _case_ids(demo_folder / "imagesTs", True)
    assert (len(train), len(unlabeled), len(test)) == (5, 3, 2)
    assert train == _case_ids(demo_folder / "labelsTr", False)
    assert test == _case_ids(demo_folder / "labelsTs", False)
    assert not (train & unlabeled) and not (train & test) and not (unlabeled & test)
    assert all(i.startswith("unl_") for i in unlabeled)


def test_demo_cases_contain_all_classes_and_geometry(demo_folder):
    for image_path in sorted((demo_folder / "imagesTr").glob("*.nii.gz")) + sorted(
            (demo_folder / "imagesTs").glob("*.nii.gz")):
        label_path = image_path.parent.parent / image_path.parent.name.replace("images", "labels") / \
            image_path.name.replace("_0000", "")
        image_itk, label_itk = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
        image, label = sitk.GetArrayFromImage(image_itk), sitk.GetArrayFromImage(label_itk)
        assert image.shape == label.shape == SMALL_SHAPE
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert label.dtype == np.uint8
        assert image_itk.GetSpacing() == label_itk.GetSpacing() == (1.0, 1.0, 2.0)  # ITK order (x, y, z)
        assert set(np.unique(label)) == {0, 1, 2}
        organ, lesion = (label == 1).sum(), (label == 2).sum()
        assert lesion < organ and 0.005 < (organ + lesion) / label.size < 0.25


def test_demo_is_not_solved_by_a_threshold(demo_folder):
    """Organ-bright vessels/blobs and lesion-dark cysts make every global threshold a poor segmenter."""
    best = []
    for image_path in sorted((demo_folder / "imagesTr").glob("*.nii.gz")):
        image = _read(image_path)
        label = _read(demo_folder / "labelsTr" / image_path.name.replace("_0000", ""))
        foreground = label == 1  # the organ parenchyma; a bright threshold should isolate it if it were trivial
        dices = []
        for threshold in np.percentile(image, np.linspace(50, 99.5, 60)):
            prediction = image > threshold
            dices.append(2 * (prediction & foreground).sum() / (prediction.sum() + foreground.sum()))
        best.append(max(dices))
    assert np.mean(best) < 0.8, best


def test_demo_is_deterministic_and_seed_dependent(tmp_path):
    kwargs = dict(num_labeled=2, num_unlabeled=1, num_test=1, shape=SMALL_SHAPE)
    a = Path(make_demo_dataset(str(tmp_path / "a"), seed=7, **kwargs))
    b = Path(make_demo_dataset(str(tmp_path / "b"), seed=7, **kwargs))
    c = Path(make_demo_dataset(str(tmp_path / "c"), seed=8, **kwargs))
    assert _digest(a) == _digest(b)  # byte-identical (gzip header carries no time stamp)
    case = Path("imagesTr/tr_000_0000.nii.gz")
    assert not np.allclose(_read(a / case), _read(c / case))
    # more unlabeled cases leave the labeled ones untouched
    d = Path(make_demo_dataset(str(tmp_path / "d"), seed=7, num_labeled=2, num_unlabeled=4, num_test=1,
                               shape=SMALL_SHAPE))
    assert _digest(a)["labelsTr/tr_001.nii.gz"] == _digest(d)["labelsTr/tr_001.nii.gz"]


def test_demo_refuses_to_clobber_and_id_clashes(tmp_path):
    make_demo_dataset(str(tmp_path), dataset_id=960, num_labeled=1, num_unlabeled=0, num_test=0, shape=(16, 16, 16))
    with pytest.raises(FileExistsError, match="overwrite"):
        make_demo_dataset(str(tmp_path), dataset_id=960, num_labeled=1, num_unlabeled=0, num_test=0, shape=(16,) * 3)
    with pytest.raises(FileExistsError, match="dataset id 960"):
        make_demo_dataset(str(tmp_path), dataset_id=960, name="Other", num_labeled=1, shape=(16, 16, 16))
    with pytest.raises(ValueError, match="1..999"):
        make_demo_dataset(str(tmp_path), dataset_id=1000)
    folder = make_demo_dataset(str(tmp_path), dataset_id=960, num_labeled=2, num_unlabeled=0, num_test=0,
                               shape=(16, 16, 16), overwrite=True)
    assert len(list((Path(folder) / "imagesTr").iterdir())) == 2


def test_demo_console_entry(tmp_path, capsys):
    synthetic.main(["-o", str(tmp_path), "-d", "961", "--num-labeled", "1", "--num-unlabeled", "2", "--num-test",
                    "1", "--shape", "16", "24", "24", "--spacing", "3", "1.5", "1.5", "--seed", "5"])
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tmp_path / "Dataset961_SamsslDemo"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["generator"] == {"seed": 5, "shape": [16, 24, 24], "spacing": [3.0, 1.5, 1.5]}
    assert len(list((folder / "imagesUnlabeled").iterdir())) == 2
    assert sitk.ReadImage(str(folder / "imagesTs" / "ts_000_0000.nii.gz")).GetSpacing() == (1.5, 1.5, 3.0)


def test_demo_passes_nnunet_case_checks(demo_folder, capsys):
    _check_with_nnunet(demo_folder, capsys)


@pytest.mark.slow
def test_demo_passes_nnunet_plan_and_preprocess(demo_folder, tmp_path, monkeypatch):
    """nnU-Net's integrity check, fingerprint extractor, planner and preprocessor accept the dataset. Their worker
    pools run as threads of this process (conftest.pools_in_threads: the same per-case functions, without
    spawning Python processes that import torch again, which took most of the former 20-70 s on 2 cores)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)

    from conftest import pools_in_threads

    _set_nnunet_paths(monkeypatch, demo_folder.parent, tmp_path)
    with pools_in_threads():
        fingerprint = extract_fingerprint_dataset(951, num_processes=1, check_dataset_integrity=True,
                                                  show_progress_bar=False)
        assert np.allclose(fingerprint["spacings"], [[2.0, 1.0, 1.0]] * 5)
        plans, identifier = plan_experiment_dataset(951)
        fullres = plans["configurations"]["3d_fullres"]
        assert list(fullres["spacing"]) == [2.0, 1.0, 1.0]
        assert fullres["normalization_schemes"] == ["ZScoreNormalization"]
        preprocess_dataset(951, identifier, configurations=("3d_fullres",), num_processes=(1,),
                           show_progress_bar=False)
    out = tmp_path / "preprocessed" / demo_folder.name / fullres["data_identifier"]
    assert sorted(p.name for p in out.glob("*_seg.b2nd")) == [f"tr_{i:03d}_seg.b2nd" for i in range(5)]


# ----------------------------------------------------------------------------------------------------
# real-anatomy few-label dataset
# ----------------------------------------------------------------------------------------------------
def _source_or_skip() -> Path:
    try:
        return real_anatomy.find_source_dir()
    except FileNotFoundError:
        pytest.skip(f"real-anatomy source absent: install with `{real_anatomy.INSTALL_COMMAND}`")


@pytest.fixture(scope="module")
def fewlabel_folder(tmp_path_factory) -> Path:
    _source_or_skip()
    raw = tmp_path_factory.mktemp("raw_real")
    return Path(make_fewlabel_dataset(str(raw), dataset_id=952, num_train=5, num_test=2, seed=1))


def test_fewlabel_missing_source_names_install_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install -y mricron-data"):
        real_anatomy.find_source_dir(str(tmp_path))
    monkeypatch.setenv(real_anatomy.SOURCE_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mricron-data"):
        make_fewlabel_dataset(str(tmp_path / "raw"))
    assert not (tmp_path / "raw").exists()  # nothing is written before the source is found


def test_fewlabel_layout_and_provenance(fewlabel_folder):
    meta = json.loads((fewlabel_folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "caudate": 1, "putamen": 2, "thalamus": 3}
    assert meta["numTraining"] == 5 and meta["channel_names"] == {"0": "T1"}
    train = _case_ids(fewlabel_folder / "imagesTr", True)
    test = _case_ids(fewlabel_folder / "imagesTs", True)
    assert train == _case_ids(fewlabel_folder / "labelsTr", False) and len(train) == 5
    assert test == _case_ids(fewlabel_folder / "labelsTs", False) and len(test) == 2
    assert not train & test
    provenance = (fewlabel_folder / "PROVENANCE.md").read_text()
    for needle in ["mricron-data", "ch2.nii.gz", "aal.nii.gz", "sha256", "BSD-3-clause", "Tzourio-Mazoyer",
                   *sorted(train), *sorted(test)]:
        assert needle in provenance


def test_fewlabel_classes_present_and_anatomically_aligned(fewlabel_folder):
    for image_path in sorted(fewlabel_folder.glob("images*/*.nii.gz")):
        label_dir = fewlabel_folder / image_path.parent.name.replace("images", "labels")
        image = _read(image_path).astype(np.float64)
        label = _read(label_dir / image_path.name.replace("_0000", ""))
        assert image.shape == label.shape == (40, 48, 40)
        volumes = np.bincount(label.ravel(), minlength=4)
        assert len(volumes) == len(ANATOMY_CLASSES) + 1
        assert volumes[1:].min() >= MIN_CLASS_VOXELS, volumes
        # T1 anatomy seen through the labels: the putamen is brighter than the caudate, which borders the
        # dark ventricles; a label map misaligned with the image would not show this in every case
        assert image[label == 2].mean() > image[label == 1].mean() * 1.05


def test_fewlabel_cases_really_differ(fewlabel_folder):
    images = [_read(p).astype(np.float64) for p in sorted((fewlabel_folder / "imagesTr").glob("*.nii.gz"))]
    labels = [_read(p) for p in sorted((fewlabel_folder / "labelsTr").glob("*.nii.gz"))]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            correlation = np.corrcoef(images[i].ravel(), images[j].ravel())[0, 1]
            assert correlation < 0.9, (i, j, correlation)
            overlap = (labels[i] > 0) & (labels[j] > 0)
            dice = 2 * overlap.sum() / ((labels[i] > 0).sum() + (labels[j] > 0).sum())
            assert dice < 0.9, (i, j, dice)
    # the acquisition changes too: robust intensity ranges spread over the cases
    p99 = [np.percentile(im, 99) for im in images]
    assert max(p99) / min(p99) > 1.3


def test_fewlabel_is_deterministic_and_valid_for_nnunet(fewlabel_folder, tmp_path, capsys):
    again = Path(make_fewlabel_dataset(str(tmp_path), dataset_id=952, num_train=5, num_test=2, seed=1))
    original, repeat = _digest(fewlabel_folder), _digest(again)
    assert original == repeat and len(original) == 16  # 14 volumes + dataset.json + PROVENANCE.md
    _check_with_nnunet(fewlabel_folder, capsys)


def test_fewlabel_console_entry(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        real_anatomy.main(["-o", str(tmp_path), "--source-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert real_anatomy.INSTALL_COMMAND in capsys.readouterr().err

    _source_or_skip()
    real_anatomy.main(["-o", str(tmp_path), "-d", "953", "--num-train", "1", "--num-test", "1", "--shape", "32", "40",
                       "32", "--spacing", "1.75"])
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tmp_path / "Dataset953_SamsslBrainNuclei"
    image = sitk.ReadImage(str(folder / "imagesTr" / "tr_000_0000.nii.gz"))
    assert image.GetSize() == (32, 40, 32) and image.GetSpacing() == (1.75, 1.75, 1.75)
    assert sitk.GetArrayFromImage(image).dtype == np.int16


# ----------------------------------------------------------------------------------------------------
# real-anatomy few-label dataset: default build pinned, shifted cohorts
# ----------------------------------------------------------------------------------------------------
#: sha256 of the voxel arrays (not of the gzip files) and of dataset.json of ``fewlabel_folder``, computed with
#: the builder before the shifted-cohort option existed: the default build must stay byte-identical
PINNED_SOURCE_SHA256 = {"ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
                        "aal.nii.gz": "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454"}
PINNED_DEFAULT_SHA256 = {
    "imagesTr/tr_000_0000.nii.gz": "2e12a515815b27b1621cb01b727d4493b277f01cefbf82f5f44a5c0f394cb3af",
    "labelsTr/tr_000.nii.gz": "9dc9578da82cd78d0e22556bd79c7d9378c6e95f5dd836ce6a1773e2ddc24a22",
    "imagesTs/ts_001_0000.nii.gz": "03dd7a464b25155a80a14b9759b09eea335904d348e9e2e325dd94a2b9ae0437",
    "labelsTs/ts_001.nii.gz": "c0d11d2717860c7f21a6ff60c41a5e4b132c9a9cea72d40ffeb7b34278a6cea2",
}
PINNED_DEFAULT_DATASET_JSON_SHA256 = "710b1957198c407b74deca000cb57740849fc3645c0cefcc9271f385607d3060"


def _provenance_cases(folder: Path) -> dict:
    """case id -> {column name: cell} from PROVENANCE.md's case table."""
    lines = (folder / "PROVENANCE.md").read_text().splitlines()
    start = lines.index("## Cases") + 1
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:] if line.startswith("| ")]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_fewlabel_default_build_is_unchanged(fewlabel_folder):
    source = _source_or_skip()
    found = {name: hashlib.sha256((source / name).read_bytes()).hexdigest() for name in PINNED_SOURCE_SHA256}
    if found != PINNED_SOURCE_SHA256:
        pytest.skip(f"another {real_anatomy.SOURCE_PACKAGE} release ({found}): the pinned cases do not apply")
    from numpy._core._multiarray_umath import __cpu_features__

    if not __cpu_features__.get("AVX512F"):
        # the builder's image arrays pass through np.exp and ** on float64 arrays, whose AVX-512 kernels likely round
        # differently from the AVX2 / libm ones: on an AVX2-only CPU two of the pinned images differ (labels do not)
        pytest.skip("pinned with numpy's AVX-512 kernels; this CPU has no AVX-512F, its exp / power round otherwise")
    arrays = {rel: hashlib.sha256(_read(fewlabel_folder / rel).tobytes()).hexdigest() for rel in PINNED_DEFAULT_SHA256}
    assert arrays == PINNED_DEFAULT_SHA256, "default build changed (or numpy/scipy changed its numerics)"
    assert hashlib.sha256((fewlabel_folder / "dataset.json").read_bytes()).hexdigest() == \
        PINNED_DEFAULT_DATASET_JSON_SHA256
    assert not (fewlabel_folder / "cohorts.json").exists()
    cases = _provenance_cases(fewlabel_folder)
    assert len(cases) == 7 and {row["site"] for row in cases.values()} == {"default"}


@pytest.fixture(scope="module")
def shifted_folder(tmp_path_factory) -> Path:
    """Shifted cohorts: 3 source cases, 6 unlabeled + 3 test target cases (3 per site). The grid covers
    100 x 120 x 100 mm so that the nuclei are rarely cut by the crop and their volume follows the scaling."""
    _source_or_skip()
    raw = tmp_path_factory.mktemp("raw_shifted")
    return Path(make_fewlabel_dataset(str(raw), dataset_id=954, num_train=9, num_test=3, shape=(40, 48, 40),
                                      spacing_mm=2.5, seed=0, shifted=True, num_source=3))


def test_fewlabel_shifted_cohorts_and_metadata(shifted_folder, capsys):
    cohorts = json.loads((shifted_folder / "cohorts.json").read_text())
    train = [f"tr_{i:03d}" for i in range(9)]
    test = [f"ts_{i:03d}" for i in range(3)]
    assert cohorts["source"] == train[:3]
    assert cohorts["target"] == {"site_contrast": ["tr_003", "tr_006", "ts_000"],
                                 "site_lowres": ["tr_004", "tr_007", "ts_001"],
                                 "site_size": ["tr_005", "tr_008", "ts_002"]}
    listed = cohorts["source"] + [c for ids in cohorts["target"].values() for c in ids]
    assert sorted(listed) == sorted(train + test) and len(listed) == len(set(listed))  # every case exactly once
    assert cohorts["unlabeled_pool"] == train[3:] and cohorts["test"] == test

    meta = json.loads((shifted_folder / "dataset.json").read_text())
    assert meta["generator"] == {"seed": 0, "shape": [40, 48, 40], "spacing_mm": 2.5, "shifted": True, "num_source": 3}
    assert meta["numTraining"] == 9 and meta["numTest"] == 3
    cases = _provenance_cases(shifted_folder)
    site_of = {c: "source" for c in cohorts["source"]}
    site_of.update({c: site for site, ids in cohorts["target"].items() for c in ids})
    assert {c: row["site"] for c, row in cases.items()} == site_of
    for case, row in cases.items():  # the drawn ranges, as recorded
        scales = [float(v) for v in row["scales"].split(",")]
        gamma, blur = float(row["gamma"]), float(row["blur vox"])
        if site_of[case] == "source":
            assert all(0.97 <= s <= 1.03 for s in scales) and 0.95 <= gamma <= 1.05 and blur <= 0.2, row
        elif site_of[case] == "site_size":
            assert all(0.80 <= s <= 0.88 for s in scales) or all(1.12 <= s <= 1.20 for s in scales), row
    _check_with_nnunet(shifted_folder, capsys)


def _shift_measurements(folder: Path) -> dict:
    """site -> list of (nuclei median / image 95th percentile, mean |LoG(1 voxel)| / (p99 - p1), foreground voxels)
    per case, measured on the written files."""
    from scipy import ndimage

    cohorts = json.loads((folder / "cohorts.json").read_text())
    sites = {"source": cohorts["source"], **cohorts["target"]}
    measured = {}
    for site, ids in sites.items():
        for case in ids:
            split = "Tr" if case.startswith("tr_") else "Ts"
            image = _read(folder / f"images{split}" / f"{case}_0000.nii.gz").astype(np.float64)
            label = _read(folder / f"labels{split}" / f"{case}.nii.gz")
            low, p95, high = np.percentile(image, [1, 95, 99])
            measured.setdefault(site, []).append((
                float(np.median(image[label > 0]) / p95),
                float(np.abs(ndimage.gaussian_laplace(image, 1.0)).mean() / (high - low)),
                int((label > 0).sum())))
    return measured


def _assert_sites_shifted(measured: dict) -> None:
    source = np.array(measured["source"])
    # contrast: gamma >= 1.8 darkens the nuclei against white matter (ratio ~0.82 -> ~0.6-0.7)
    contrast = np.array(measured["site_contrast"])
    assert contrast[:, 0].max() < source[:, 0].min() - 0.05, (contrast[:, 0], source[:, 0])
    # resolution: a blur of 1-1.4 voxels removes structure at the 1-voxel scale; measured with a Laplacian of
    # Gaussian (sigma 1 voxel), because the plain Laplacian is dominated by this site's 5-8 % noise
    lowres = np.array(measured["site_lowres"])
    assert lowres[:, 1].max() < 0.8 * source[:, 1].min(), (lowres[:, 1], source[:, 1])
    # anatomy size: scaling 0.80-0.88 or 1.12-1.20 per axis changes the nuclei volume by x1.7 or x0.6
    size = np.array(measured["site_size"])
    median, spread = np.median(source[:, 2]), np.ptp(source[:, 2])
    assert (np.abs(size[:, 2] - median) > spread).all(), (size[:, 2], source[:, 2])


def test_fewlabel_shifted_sites_are_measurably_shifted(shifted_folder):
    _assert_sites_shifted(_shift_measurements(shifted_folder))


@pytest.mark.parametrize("builder", ["fewlabel", "demo"])
def test_shifted_num_source_validated(builder, tmp_path, capsys):
    """Both builders check num_source before writing anything, in the function and on the command line."""
    build, main, count = {"fewlabel": (make_fewlabel_dataset, real_anatomy.main, "num_train"),
                          "demo": (make_demo_dataset, synthetic.main, "num_labeled")}[builder]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="num_source"):
            build(str(tmp_path / "raw"), **{count: 3 if builder == "demo" else 4}, shifted=True, num_source=bad)
    assert not (tmp_path / "raw").exists()  # checked before anything is written
    flag = "--" + count.replace("_", "-")
    for argv in (["--num-source", "2"], ["--shifted", flag, "3", "--num-source", "4" if builder == "demo" else "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["-o", str(tmp_path / "raw"), *argv])
        assert exit_info.value.code == 2 and "num-source" in capsys.readouterr().err.replace("_", "-")


# ----------------------------------------------------------------------------------------------------
# synthetic demo dataset, shifted cohorts
# ----------------------------------------------------------------------------------------------------
def test_demo_shifted_cohorts(tmp_path, capsys):
    folder = Path(make_demo_dataset(str(tmp_path / "raw"), dataset_id=952, num_labeled=5, num_unlabeled=4,
                                    num_test=3, shape=SMALL_SHAPE, seed=3, shifted=True, num_source=2))
    cohorts = json.loads((folder / "cohorts.json").read_text())
    assert cohorts["source"] == ["tr_000", "tr_001"]
    assert cohorts["target"] == {"site_contrast": ["tr_002", "unl_000", "unl_003", "ts_000"],
                                 "site_lowres": ["tr_003", "unl_001", "ts_001"],
                                 "site_size": ["tr_004", "unl_002", "ts_002"]}
    assert cohorts["unlabeled_pool"] == ["tr_002", "tr_003", "tr_004", "unl_000", "unl_001", "unl_002", "unl_003"]
    assert cohorts["test"] == ["ts_000", "ts_001", "ts_002"]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["generator"]["shifted"] is True and meta["generator"]["num_source"] == 2
    _check_with_nnunet(folder, capsys)
    # the unshifted build of the same arguments has no cohorts and the default site's files
    plain = Path(make_demo_dataset(str(tmp_path / "plain"), dataset_id=952, num_labeled=5, num_unlabeled=4,
                                   num_test=3, shape=SMALL_SHAPE, seed=3))
    assert not (plain / "cohorts.json").exists() and "shifted" not in json.loads((plain / "dataset.json")
                                                                                 .read_text())["generator"]


def test_demo_sites_are_measurably_shifted():
    """Each target site differs from the source site the way its name says, on the same random draws."""
    from scipy import ndimage

    def measure(site: str, index: int) -> tuple:
        """(organ contrast against the tissue ring around the labels, in noise units; foreground voxels; lesion
        voxels)"""
        image, label = synthetic.synthesize_case(synthetic.case_rng(0, "ts", index), site=site)
        ring = ndimage.binary_dilation(label > 0, iterations=4) & ~ndimage.binary_dilation(label > 0, iterations=2)
        core = ndimage.binary_erosion(label == 1, iterations=1)
        noise = np.std(image - ndimage.gaussian_filter(image, 1.0))
        return (float((np.median(image[core]) - np.median(image[ring])) / noise), int((label > 0).sum()),
                int((label == 2).sum()))

    default_lesions, source_lesions = [], []
    for index in range(4):
        source, contrast, lowres, size = (measure(s, index) for s in ("source", *synthetic.TARGET_SITES))
        assert contrast[0] < 0.7 * source[0]          # weaker organ contrast
        assert lowres[0] < 0.7 * source[0]            # more noise (and blur) for the same contrast
        assert size[1] < 0.6 * source[1]              # smaller organ (organ + lesion voxels)
        source_lesions.append(source[2])
        default_lesions.append(measure("default", index)[2])
    assert np.median(source_lesions) > 1.4 * np.median(default_lesions)  # 1.2x the semi-axes: ~1.7x the volume
    with pytest.raises(ValueError, match="unknown site"):
        synthetic.synthesize_case(synthetic.case_rng(0, "ts", 0), site="nowhere")


def test_demo_default_site_draws_are_unchanged():
    """The site machinery leaves the default draws alone: checksums of the cases built before it existed."""
    digests = [hashlib.sha256(b"".join(a.tobytes() for a in synthetic.synthesize_case(
        synthetic.case_rng(0, "tr", i)))).hexdigest()[:16] for i in range(2)]
    assert digests == EXPECTED_DEFAULT_DIGESTS
