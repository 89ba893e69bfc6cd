"""A small synthetic 3D nnU-Net v2 raw dataset for the demo: labeled, unlabeled and held-out test cases.

Each case is a ``(Z, Y, X)`` volume (default ``32 x 48 x 48`` voxels at ``(2.0, 1.0, 1.0)`` mm) of a
body-like elliptic cylinder of soft tissue with

- an "organ" (label 1): a randomly placed, sized and oriented ellipsoid whose surface is made irregular
  by a smooth random radius perturbation, brighter than the surrounding tissue;
- a "lesion" (label 2): a smaller darker ellipsoid inside the organ;
- distractors that are NOT labeled: tube-shaped "vessels" as bright as the organ (they may run into
  it), small bright blobs and dark "cysts" outside the organ that look like lesions. A threshold alone
  therefore cannot separate the classes: size, shape and context matter;
- a partial-volume blur, a smooth multiplicative bias field, Gaussian noise and a per-case
  intensity scale and offset (different "scanners").

Raw layout written (nnU-Net v2 conventions, file ending ``.nii.gz``, one channel ``_0000``)::

    Dataset901_SamsslDemo/
        dataset.json          channel_names, labels, numTraining, file_ending (+ numTest, numUnlabeled)
        imagesTr/tr_000_0000.nii.gz ...     labeled training images
        labelsTr/tr_000.nii.gz ...          their label maps (uint8: 0 background, 1 organ, 2 lesion)
        imagesUnlabeled/unl_000_0000.nii.gz unlabeled images (no labels exist for them)
        imagesTs/ts_000_0000.nii.gz ...     held-out test images
        labelsTs/ts_000.nii.gz ...          their label maps

``labelsTs`` is a convention of this project, not of nnU-Net (which never reads it): it holds the
reference segmentations of ``imagesTs`` so that predictions can be scored with
``nnUNetv2_evaluate_folder``. ``imagesUnlabeled`` is read only by this package's unlabeled loader.
The three prefixes ``tr_``, ``unl_`` and ``ts_`` keep case identifiers disjoint across the splits.

Shifted cohorts (``shifted=True``, ``--shifted --num-source K``): a domain-shift variant for the demo. The
first ``K`` labeled cases (``tr_000 .. tr_{K-1}``) come from one SOURCE site (strong contrast, little noise
and bias), meant as the few labeled cases; every other labeled case, every unlabeled image and every test case
comes from one of three TARGET sites, assigned round-robin per split: ``site_contrast`` (weaker organ and
lesion contrast, strong bias field), ``site_lowres`` (more blur and noise: thicker slices, another coil) and
``site_size`` (a smaller organ). In every shifted site the lesion is 1.2x larger than in the default draws (the
demo's short training finds it). The builder then also writes ``cohorts.json`` (``source``, ``target`` per
site, ``unlabeled_pool``, ``test``; the same keys as the real-anatomy builder's) and adds ``"shifted": true,
"num_source": K`` to ``generator`` in ``dataset.json``. The ranges are :data:`SITE_APPEARANCE`. Default
builds are unchanged by this option (same random draws, byte-identical files).

Determinism: every case is drawn from its own random generator seeded by ``(seed, split, index)``, so
the same arguments give byte-identical files, and e.g. asking for more unlabeled cases does not change
the labeled ones.

Array convention: arrays are ``(Z, Y, X)`` as returned by ``SimpleITK.GetArrayFromImage`` (the axis
order nnU-Net uses), spacings are given in the same order; the files carry the spacing reversed, as
ITK expects (``(x, y, z)``), an identity direction and a zero origin.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

FILE_ENDING = ".nii.gz"
LABELED_PREFIX = "tr"
UNLABELED_PREFIX = "unl"
TEST_PREFIX = "ts"
UNLABELED_IMAGES_FOLDER = "imagesUnlabeled"
TEST_LABELS_FOLDER = "labelsTs"
DEMO_LABELS = {"background": 0, "organ": 1, "lesion": 2}

# split codes mixed into the per-case seed; fixed forever so datasets stay reproducible
_SPLIT_CODES = {LABELED_PREFIX: 1, UNLABELED_PREFIX: 2, TEST_PREFIX: 3}

#: the ranges of the site-dependent draws of :func:`synthesize_case` (uniform ``(low, high)``; ``*_scale`` and
#: ``bias``/``blur`` are fixed factors); the ``default`` site draws what the generator always drew
DEFAULT_APPEARANCE: Dict[str, tuple] = {
    "organ_contrast": (30.0, 50.0),   # organ above soft tissue
    "lesion_contrast": (35.0, 60.0),  # lesion below the organ
    "noise": (6.0, 12.0),             # Gaussian noise sigma
    "bias": (0.25,),                  # amplitude of the log bias field
    "blur": (0.7,),                   # partial-volume blur, voxels of the finest axis
    "organ_scale": (1.0,),            # factor on the organ's semi-axes
    "lesion_scale": (1.0,),           # factor on the lesion's semi-axes
}
#: what each site changes (module docstring)
SITE_APPEARANCE: Dict[str, Dict[str, tuple]] = {
    "default": {},
    "source": {"organ_contrast": (40.0, 50.0), "lesion_contrast": (85.0, 95.0), "noise": (5.0, 7.0),
               "bias": (0.1,), "lesion_scale": (1.2,)},
    "site_contrast": {"organ_contrast": (14.0, 22.0), "lesion_contrast": (40.0, 50.0), "bias": (0.5,),
                      "lesion_scale": (1.2,)},
    "site_lowres": {"lesion_contrast": (70.0, 90.0), "noise": (12.0, 16.0), "blur": (1.4,), "lesion_scale": (1.2,)},
    "site_size": {"lesion_contrast": (70.0, 90.0), "organ_scale": (0.75,), "lesion_scale": (1.2 * 0.85,)},
}
#: target sites of a shifted build, in round-robin order
TARGET_SITES: Tuple[str, ...] = ("site_contrast", "site_lowres", "site_size")


def site_appearance(site: str) -> Dict[str, tuple]:
    """The draw ranges of ``site`` (a key of :data:`SITE_APPEARANCE`): the defaults with the site's changes."""
    if site not in SITE_APPEARANCE:
        raise ValueError(f"unknown site {site!r}; known: {sorted(SITE_APPEARANCE)}")
    return {**DEFAULT_APPEARANCE, **SITE_APPEARANCE[site]}


def case_site(prefix: str, index: int, num_source: Optional[int],
              target_sites: Sequence[str] = TARGET_SITES) -> str:
    """Site of case ``{prefix}_{index:03d}``: ``default`` when ``num_source`` is None (no shift); otherwise
    ``source`` for the first ``num_source`` labeled (``tr``) cases and ``target_sites`` round-robin for the other
    cases, counted separately per split."""
    if num_source is None:
        return "default"
    if prefix == LABELED_PREFIX:
        if index < num_source:
            return "source"
        index -= num_source
    return target_sites[index % len(target_sites)]


def write_cohorts(folder: Path, sites: Dict[str, str], target_sites: Sequence[str]) -> None:
    """``cohorts.json`` of a shifted build from case id -> site: the ``source`` cases, the cases of each target
    site, the ``unlabeled_pool`` (every non-test case outside the source site) and the ``test`` cases."""
    test = [c for c in sites if c.startswith(f"{TEST_PREFIX}_")]
    cohorts = {"source": [c for c, s in sites.items() if s == "source"],
               "target": {t: [c for c, s in sites.items() if s == t] for t in target_sites},
               "unlabeled_pool": [c for c, s in sites.items() if c not in test and s != "source"],
               "test": test}
    (folder / "cohorts.json").write_text(json.dumps(cohorts, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# helpers shared with the real-anatomy builder
# ----------------------------------------------------------------------------------------------------
def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{id:03d}_{name}`` after validating both parts the way nnU-Net needs them."""
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999 (nnU-Net uses 3 digits), got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"dataset name must contain only letters, digits, '_' and '-', got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def prepare_dataset_folder(nnunet_raw: str, dataset_id: int, name: str, subfolders: Sequence[str],
                           overwrite: bool = False) -> Path:
    """Create ``nnunet_raw/DatasetXXX_name`` with the given subfolders.

    Raises:
        FileExistsError: the folder exists and ``overwrite`` is False, or another dataset in
            ``nnunet_raw`` already uses ``dataset_id`` (nnU-Net could then not resolve the id).
    """
    raw = Path(nnunet_raw)
    folder_name = dataset_folder_name(dataset_id, name)
    clashes = [p.name for p in raw.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != folder_name]
    if clashes:
        raise FileExistsError(f"{raw} already holds {clashes} with dataset id {int(dataset_id)}; nnU-Net resolves "
                              f"datasets by id, so pick another id (-d / dataset_id) or remove that folder")
    folder = raw / folder_name
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(folder)
    for sub in subfolders:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def write_volume(array_zyx: np.ndarray, spacing_zyx: Sequence[float], path: Path,
                 origin_xyz: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
    """Write a ``(Z, Y, X)`` array as compressed NIfTI with an identity direction.

    ``spacing_zyx`` is in array axis order; ITK stores it reversed, so nnU-Net's SimpleITK reader gives
    back exactly this array and this spacing. ``origin_xyz`` is the ITK (LPS, mm) position of voxel 0.
    """
    if array_zyx.ndim != 3 or len(spacing_zyx) != 3:
        raise ValueError(f"expected a 3D array and 3 spacings, got shape {array_zyx.shape} and {spacing_zyx}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    image.SetOrigin([float(o) for o in origin_xyz])
    sitk.WriteImage(image, str(path), useCompression=True)


def write_dataset_json(folder: Path, channel_names: Dict[str, str], labels: Dict[str, int], num_training: int,
                       **extra) -> None:
    """Write ``dataset.json`` with nnU-Net's required keys first and any descriptive ``extra`` keys after."""
    content = {
        "channel_names": {str(k): v for k, v in channel_names.items()},
        "labels": {k: int(v) for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
    }
    content.update(extra)
    with open(folder / "dataset.json", "w") as f:
        json.dump(content, f, indent=2)


def case_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator of one case, a pure function of ``(seed, split, index)``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], int(index)]))


def smooth_random_field(rng: np.random.Generator, shape: Sequence[int], control_points: Sequence[int]) -> np.ndarray:
    """Smooth random field of ``shape``: standard-normal values on a coarse ``control_points`` grid,
    interpolated with cubic splines over the whole volume (the grid corners sit on the volume corners).

    Returns a float32 array of ``shape`` normalised to zero mean and unit maximum absolute value.
    """
    coarse = rng.standard_normal(tuple(int(c) for c in control_points))
    axes = [np.linspace(0.0, c - 1.0, n) for c, n in zip(coarse.shape, shape)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    field = ndimage.map_coordinates(coarse, coords, order=3, mode="nearest")
    field -= field.mean()
    field /= max(np.abs(field).max(), 1e-8)
    return field.astype(np.float32)


def random_rotation(rng: np.random.Generator, max_angle_deg: Optional[float] = None) -> np.ndarray:
    """A 3x3 rotation matrix: uniformly random over SO(3) when ``max_angle_deg`` is None, otherwise the
    product of rotations about the three axes with angles uniform in ``[-max, max]`` degrees."""
    if max_angle_deg is None:
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        return np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])
    a, b, c = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------------------------------
# synthetic case generator
# ----------------------------------------------------------------------------------------------------
def _grid_mm(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """``(3, Z, Y, X)`` physical coordinates (mm) of the voxel centres, centred on the volume centre."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def _ellipsoid_radius(grid: np.ndarray, center: np.ndarray, semi_axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius of every voxel (< 1 inside). ``grid``: (3, Z, Y, X) mm;
    ``rotation`` columns are the ellipsoid's axes in grid coordinates."""
    offset = grid - center.reshape(3, 1, 1, 1)
    local = np.einsum("ji,j...->i...", rotation, offset)  # coordinates along the ellipsoid's own axes
    return np.sqrt(np.sum((local / semi_axes.reshape(3, 1, 1, 1)) ** 2, axis=0))


def synthesize_case(rng: np.random.Generator, shape: Sequence[int] = (32, 48, 48),
                    spacing: Sequence[float] = (2.0, 1.0, 1.0), site: str = "default") -> Tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic case.

    Args:
        rng: the case's random generator (see :func:`case_rng`).
        shape: ``(Z, Y, X)`` voxels; each axis at least 16.
        spacing: ``(Z, Y, X)`` voxel size in mm.
        site: the acquisition site (:data:`SITE_APPEARANCE`); every site makes the same number of random draws
            in the same order, so a case's geometry differs between sites only by the site's size factors.
    Returns:
        ``image``: float32 ``(Z, Y, X)``, arbitrary scanner-like units (tissue ~ 100, air ~ 0, before a
        random per-case scale/offset); ``label``: uint8 ``(Z, Y, X)`` with 0 background, 1 organ,
        2 lesion; both classes are always present.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 axes of at least 16 voxels, got {shape}")
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    look = site_appearance(site)
    grid = _grid_mm(shape, spacing)
    half_fov = np.asarray(shape) * spacing / 2.0  # mm from the centre to the volume border, per axis
    # object sizes scale with the smallest in-plane half field of view (24 mm at the defaults)
    unit = float(min(half_fov[1:]))

    # body: elliptic cylinder along Z filling most of the in-plane field of view
    body_axes = half_fov[1:] * rng.uniform(0.82, 0.95, size=2)
    body = ((grid[1] / body_axes[0]) ** 2 + (grid[2] / body_axes[1]) ** 2) < 1.0

    tissue = 100.0
    image = np.where(body, tissue, 0.0).astype(np.float32)
    image += body * 8.0 * smooth_random_field(rng, shape, (5, 6, 6))  # slow tissue heterogeneity

    organ_level = tissue + rng.uniform(*look["organ_contrast"])

    # vessels: bright tubes through the body, painted before the organ so the organ overrides them
    for _ in range(rng.integers(2, 5)):
        point = np.array([rng.uniform(-0.6, 0.6) * half_fov[0], *(rng.uniform(-0.5, 0.5, 2) * body_axes)])
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(0.06, 0.12) * unit
        offset = grid - point.reshape(3, 1, 1, 1)
        along = np.einsum("i,i...->...", direction, offset)
        distance = np.sqrt(np.maximum(np.sum(offset ** 2, axis=0) - along ** 2, 0.0))
        image[(distance < radius) & body] = organ_level + rng.uniform(-5.0, 10.0)

    # organ: irregular ellipsoid, fully inside the body
    for _ in range(100):
        organ_axes = np.array([rng.uniform(0.3, 0.55) * min(half_fov[0], 1.4 * unit),
                               *rng.uniform(0.3, 0.5, size=2) * unit]) * look["organ_scale"][0]
        organ_rot = random_rotation(rng)
        reach = organ_axes.max() * 1.2
        margin = half_fov - reach
        if np.all(margin > 0):
            organ_center = rng.uniform(-margin, margin) * np.array([1.0, 0.6, 0.6])
            rho = _ellipsoid_radius(grid, organ_center, organ_axes, organ_rot)
            organ = (rho < 1.0 + 0.15 * smooth_random_field(rng, shape, (4, 4, 4))) & body
            if organ.sum() > 20:
                break
    else:  # pragma: no cover - only reachable with absurd shapes
        raise RuntimeError(f"could not place an organ in a volume of shape {shape} and spacing {tuple(spacing)}")

    # lesion: small dark ellipsoid centred well inside the organ, clipped to the organ
    for _ in range(100):
        lesion_axes = rng.uniform(0.14, 0.26, size=3) * unit * look["lesion_scale"][0]
        u = rng.standard_normal(3)
        u *= rng.uniform(0.0, 0.4) / np.linalg.norm(u)
        lesion_center = organ_center + organ_rot @ (u * organ_axes)
        lesion = (_ellipsoid_radius(grid, lesion_center, lesion_axes, random_rotation(rng)) < 1.0) & organ
        if lesion.sum() >= 4:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not place a lesion inside the organ; increase the volume shape")

    image[organ] = organ_level
    image[organ] += 6.0 * smooth_random_field(rng, shape, (8, 10, 10))[organ]  # parenchymal texture
    lesion_level = organ_level - rng.uniform(*look["lesion_contrast"])
    image[lesion] = lesion_level

    # unlabeled look-alikes outside the organ: small bright blobs and dark cysts
    outside = body & ~ndimage.binary_dilation(organ, iterations=2)
    for kind in ["blob"] * int(rng.integers(1, 3)) + ["cyst"] * int(rng.integers(1, 3)):
        candidates = np.argwhere(outside)
        if len(candidates) == 0:
            break
        center = grid[(slice(None), *candidates[rng.integers(len(candidates))])]
        axes = rng.uniform(0.08, 0.18, size=3) * unit
        blob = (_ellipsoid_radius(grid, center, axes, random_rotation(rng)) < 1.0) & outside
        image[blob] = (organ_level + rng.uniform(5.0, 20.0)) if kind == "blob" else (lesion_level + rng.uniform(-5, 5))

    # acquisition: partial-volume blur, bias field, noise, scanner scale/offset
    image = ndimage.gaussian_filter(image, sigma=look["blur"][0] / spacing * spacing.min())
    image *= np.exp(look["bias"][0] * smooth_random_field(rng, shape, (3, 3, 3)))
    image += rng.normal(0.0, rng.uniform(*look["noise"]), size=shape)
    image = image * rng.uniform(0.7, 1.4) + rng.uniform(-20.0, 20.0)

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = DEMO_LABELS["organ"]
    label[lesion] = DEMO_LABELS["lesion"]
    return image.astype(np.float32), label


# ----------------------------------------------------------------------------------------------------
# dataset builder
# ----------------------------------------------------------------------------------------------------
def make_demo_dataset(nnunet_raw: str, dataset_id: int = 901, name: str = "SamsslDemo", num_labeled: int = 8,
                      num_unlabeled: int = 24, num_test: int = 8, shape: Sequence[int] = (32, 48, 48),
                      spacing: Sequence[float] = (2.0, 1.0, 1.0), seed: int = 0, overwrite: bool = False,
                      shifted: bool = False, num_source: int = 4) -> str:
    """Write the synthetic demo dataset as an nnU-Net v2 raw dataset (layout in the module docstring).

    Args:
        nnunet_raw: the nnU-Net raw folder (usually ``$nnUNet_raw``); created if missing.
        dataset_id: nnU-Net dataset id, 1..999.
        name: dataset name; the folder is ``Dataset{dataset_id:03d}_{name}``.
        num_labeled: cases in ``imagesTr``/``labelsTr`` (``numTraining``). nnU-Net's default 5-fold split
            needs at least 5; fewer work only with ``fold all`` or a custom ``splits_final.json``.
        num_unlabeled: images in ``imagesUnlabeled``.
        num_test: cases in ``imagesTs``/``labelsTs``.
        shape: ``(Z, Y, X)`` voxels per case.
        spacing: ``(Z, Y, X)`` voxel size in mm.
        seed: base seed; same arguments give byte-identical files.
        overwrite: replace an existing folder of the same name.
        shifted: build the shifted cohorts (module docstring): ``tr_000 .. tr_{num_source-1}`` from the source
            site, all other cases from three target sites; also writes ``cohorts.json``. False (default) writes
            exactly the unshifted dataset.
        num_source: source cases among the labeled ones when ``shifted``, ``1 .. num_labeled``; ignored otherwise.
    Returns:
        The dataset folder path.
    """
    if num_labeled < 1:
        raise ValueError(f"num_labeled must be >= 1, got {num_labeled}")
    if num_unlabeled < 0 or num_test < 0:
        raise ValueError(f"num_unlabeled and num_test must be >= 0, got {num_unlabeled} and {num_test}")
    if shifted and not 1 <= num_source <= num_labeled:
        raise ValueError(f"num_source must be in 1..num_labeled = {num_labeled} with shifted=True, got {num_source}")
    site_source_count = int(num_source) if shifted else None
    sites: Dict[str, str] = {}
    Path(nnunet_raw).mkdir(parents=True, exist_ok=True)
    folder = prepare_dataset_folder(nnunet_raw, dataset_id, name,
                                    ["imagesTr", "labelsTr", UNLABELED_IMAGES_FOLDER, "imagesTs", TEST_LABELS_FOLDER],
                                    overwrite=overwrite)
    splits = [(LABELED_PREFIX, num_labeled, "imagesTr", "labelsTr"),
              (UNLABELED_PREFIX, num_unlabeled, UNLABELED_IMAGES_FOLDER, None),
              (TEST_PREFIX, num_test, "imagesTs", TEST_LABELS_FOLDER)]
    for prefix, count, image_dir, label_dir in splits:
        for index in range(count):
            case_id = f"{prefix}_{index:03d}"
            site = sites[case_id] = case_site(prefix, index, site_source_count)
            image, label = synthesize_case(case_rng(seed, prefix, index), shape, spacing, site)
            write_volume(image, spacing, folder / image_dir / f"{case_id}_0000{FILE_ENDING}")
            if label_dir is not None:
                write_volume(label, spacing, folder / label_dir / f"{case_id}{FILE_ENDING}")

    description = ("Synthetic 3D demo data: an irregular ellipsoidal organ (1) with a darker lesion (2) among "
                   "organ-bright vessels, blobs and lesion-dark cysts that are not labeled; bias field and noise.")
    generator = {"seed": int(seed), "shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing]}
    if shifted:
        generator.update(shifted=True, num_source=int(num_source))
        description += (f" Shifted cohorts: tr_000..tr_{num_source - 1:03d} from one source site, all other cases "
                        f"from the target sites {', '.join(TARGET_SITES)}; see cohorts.json.")
        write_cohorts(folder, sites, TARGET_SITES)
    write_dataset_json(
        folder, {"0": "MR"}, DEMO_LABELS, num_labeled,
        name=folder.name,
        description=description,
        licence="CC0-1.0 (synthetic data)",
        reference="nnunetv2_samssl.demo.synthetic",
        numTest=int(num_test),
        numUnlabeled=int(num_unlabeled),
        unlabeled_images_folder=UNLABELED_IMAGES_FOLDER,
        test_labels_folder=TEST_LABELS_FOLDER,
        generator=generator,
    )
    return str(folder)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry ``nnUNetv2_samssl_make_demo``."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_make_demo",
        description="Write the synthetic semi-supervised demo dataset (imagesTr/labelsTr, imagesUnlabeled, "
                    "imagesTs/labelsTs) into an nnU-Net raw folder.")
    parser.add_argument("-o", "--output", default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset-id", type=int, default=901, help="dataset id (default 901)")
    parser.add_argument("-n", "--name", default="SamsslDemo", help="dataset name (default SamsslDemo)")
    parser.add_argument("--num-labeled", type=int, default=8, help="labeled training cases (default 8)")
    parser.add_argument("--num-unlabeled", type=int, default=24, help="unlabeled images (default 24)")
    parser.add_argument("--num-test", type=int, default=8, help="held-out test cases with labels (default 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("Z", "Y", "X"),
                        help="voxels per case (default 32 48 48)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.0, 1.0, 1.0), metavar=("Z", "Y", "X"),
                        help="voxel size in mm (default 2.0 1.0 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--shifted", action="store_true",
                        help="shifted cohorts: the first --num-source labeled cases from one source site, every other "
                             "case from three target sites (writes cohorts.json)")
    parser.add_argument("--num-source", type=int, default=None, help="source cases with --shifted (default 4)")
    args = parser.parse_args(argv)
    if not args.output:
        parser.error("no output folder: pass -o RAW_FOLDER or set nnUNet_raw")
    if args.num_source is not None and not args.shifted:
        parser.error("--num-source needs --shifted")
    if args.shifted and args.num_source is not None and not 1 <= args.num_source <= args.num_labeled:
        parser.error(f"--num-source must be in 1..--num-labeled = {args.num_labeled}, got {args.num_source}")
    folder = make_demo_dataset(args.output, args.dataset_id, args.name, args.num_labeled, args.num_unlabeled,
                               args.num_test, tuple(args.shape), tuple(args.spacing), args.seed, args.overwrite,
                               args.shifted, 4 if args.num_source is None else args.num_source)
    print(folder)


if __name__ == "__main__":
    main()
