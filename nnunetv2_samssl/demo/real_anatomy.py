"""A few-label benchmark dataset with real anatomy: deep grey-matter nuclei in a real T1-weighted MR brain.

Source (Debian package ``mricron-data``, installed with
``apt-get update && apt-get install -y mricron-data``; files under ``/usr/share/mricron/templates``):

- ``ch2.nii.gz``: the "Colin 27" brain (Holmes et al., J Comput Assist Tomogr 22:324-333, 1998), a
  T1-weighted MR of one real person averaged over 27 scans, 181 x 217 x 181 voxels of 1 mm in MNI space,
  head and skull included;
- ``aal.nii.gz``: the AAL atlas (Tzourio-Mazoyer et al., NeuroImage 15:273-289, 2002), a manual
  parcellation drawn on that very brain, on the same 1 mm grid. Image and label map therefore describe
  the same anatomy voxel for voxel.

Foreground classes (both hemispheres merged per class): 1 caudate (AAL 71, 72), 2 putamen (AAL 73, 74),
3 thalamus (AAL 77, 78); each is 7.7-8.7 cm^3 per side, ~2,300 voxels per side at 1.5 mm.

Every case is a crop around the deep nuclei of one hemisphere (left and right alternate) of the real
brain, resampled to a small grid (default ``40 x 48 x 40`` voxels of 1.5 mm, ``(Z, Y, X)`` =
superior-inferior, anterior-posterior, right-left) through a random, smooth spatial transform, followed by
random MR-like intensity changes. Per case (ranges are the defaults, values are recorded in
``PROVENANCE.md``):

- crop centre: the hemisphere's nuclei centre shifted by up to +-6 mm per axis (different regions and
  partial structures at the crop border, the contralateral nuclei partly visible);
- affine: rotations up to +-12 degrees about each axis, scaling 0.88-1.12 per axis (head size and shape);
- elastic: a smooth displacement field (cubic interpolation of a 5 x 5 x 5 grid of Gaussian control
  displacements, standard deviation 1.5-3 mm per component);
- contrast: gamma 0.7-1.4 on the [0, 1]-normalised image;
- blur: Gaussian, sigma 0-0.6 voxels (resolution differences);
- bias field: multiplicative ``exp(a * f)`` with ``f`` a smooth field in [-1, 1] and ``a`` in 0.1-0.3;
- noise: Rician (magnitude of the image plus complex Gaussian noise), sigma 1-4 % of white matter;
- scanner scale: intensities multiplied by 400-1200 and stored as int16 (like scanner output).

Images are resampled with linear interpolation after an anti-aliasing blur; labels by linear
interpolation of each class's indicator followed by an argmax, so boundaries stay smooth under the
deformation. All cases derive from ONE person: the benchmark measures how well few labels plus unlabeled
images teach a network real MR appearance under realistic shape and acquisition variation; it says
nothing about cross-subject generalisation. Test cases (``imagesTs``/``labelsTs``, this project's
convention for held-out labeled cases) are separate random draws from the same process.

Raw layout: ``imagesTr``/``labelsTr``, ``imagesTs``/``labelsTs``, ``dataset.json``, ``PROVENANCE.md``;
no ``imagesUnlabeled`` (the few-label protocol hides the labels of a subset of ``imagesTr``).

Shifted cohorts (``shifted=True``, ``--shifted --num-source K``): a domain-shift variant. The first ``K``
training cases (``tr_000 .. tr_{K-1}``) come from one SOURCE site with a narrow acquisition, meant as the
few labeled cases; every other training case (the unlabeled pool) and every test case comes from one of three
TARGET sites, assigned round-robin (counted separately in ``imagesTr`` and ``imagesTs``, each starting with
``site_contrast``). Ranges that differ from the defaults above (all others, and the geometric draws crop shift,
rotation and elastic, keep the default ranges):

- ``source``: gamma 0.95-1.05, blur 0-0.2 voxels, bias amplitude 0.05-0.1, noise 1-1.5 % of white matter,
  scaling 0.97-1.03 per axis;
- ``site_contrast``: gamma 1.8-2.4 and bias amplitude 0.3-0.5 (another T1 contrast with a strong coil bias);
- ``site_lowres``: blur 1.0-1.4 voxels (thicker slices / lower resolution) and noise 5-8 %;
- ``site_size``: anatomy size: per case one factor class, 0.80-0.88 (larger anatomy in the grid) or
  1.12-1.20 (smaller), shared by the three axes with an independent value per axis; gamma 0.5-0.6.

The builder then also writes ``cohorts.json`` (``source``, ``target`` per site, ``unlabeled_pool``, ``test``),
adds ``"shifted": true, "num_source": K`` to ``generator`` in ``dataset.json`` and lists the site ranges in
``PROVENANCE.md`` (whose case table has a ``site`` column in every build, ``default`` without the shift).
Default builds are unchanged by this option (same random draws, byte-identical images and labels). The
few-label protocol measures the shift with ``nnUNetv2_samssl_fewlabel ... --labeled-from <dataset>/cohorts.json
--test``: labeled cases drawn from the source cases only, scored on the held-out target cases of
``imagesTs``/``labelsTs`` (``examples/fewlabel/README.md``).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunetv2_samssl.demo.synthetic import (FILE_ENDING, TEST_LABELS_FOLDER, case_rng, prepare_dataset_folder,
                                            random_rotation, smooth_random_field, write_cohorts, write_dataset_json,
                                            write_volume)
from nnunetv2_samssl.demo.synthetic import case_site as synthetic_case_site

SOURCE_PACKAGE = "mricron-data"
INSTALL_COMMAND = "apt-get update && apt-get install -y mricron-data"
SOURCE_DIR_ENV = "SAMSSL_MRICRON_TEMPLATES"
DEFAULT_SOURCE_DIRS = ("/usr/share/mricron/templates", "/usr/share/mricron", "/usr/local/share/mricron/templates")
SOURCE_IMAGE = "ch2.nii.gz"
SOURCE_LABELS = "aal.nii.gz"

#: class name -> AAL region ids merged into it (left, right)
ANATOMY_CLASSES: Dict[str, Tuple[int, ...]] = {"caudate": (71, 72), "putamen": (73, 74), "thalamus": (77, 78)}
#: centre (MNI mm, RAS) of the nuclei of each hemisphere, from the AAL regions above
HEMISPHERE_CENTERS_MM: Dict[str, Tuple[float, float, float]] = {"left": (-17.0, -3.0, 7.0),
                                                                "right": (17.0, -3.0, 7.0)}
#: a case must contain at least this many voxels of every class
MIN_CLASS_VOXELS = 200

#: default ranges of the site-dependent draws; ``gamma`` is drawn log-uniformly, ``scales`` is a tuple of
#: factor classes: one class is drawn per case (only when there are several), then one value per axis
DEFAULT_RANGES: Dict[str, tuple] = {
    "scales": ((0.88, 1.12),),
    "gamma": (0.7, 1.4),
    "blur_sigma_vox": (0.0, 0.6),
    "bias_amplitude": (0.1, 0.3),
    "noise_sigma": (0.01, 0.04),
}
#: the ranges each site changes (module docstring); crop shift, rotation and elastic never change
SITE_RANGES: Dict[str, Dict[str, tuple]] = {
    "default": {},
    "source": {"gamma": (0.95, 1.05), "blur_sigma_vox": (0.0, 0.2), "bias_amplitude": (0.05, 0.1),
               "noise_sigma": (0.01, 0.015), "scales": ((0.97, 1.03),)},
    "site_contrast": {"gamma": (1.8, 2.4), "bias_amplitude": (0.3, 0.5)},
    "site_lowres": {"blur_sigma_vox": (1.0, 1.4), "noise_sigma": (0.05, 0.08)},
    "site_size": {"scales": ((0.80, 0.88), (1.12, 1.20)), "gamma": (0.5, 0.6)},
}
#: target sites of a shifted build, in round-robin order
TARGET_SITES: Tuple[str, ...] = ("site_contrast", "site_lowres", "site_size")


@dataclass
class CaseParameters:
    """The random draws that define one case (recorded in PROVENANCE.md)."""

    hemisphere: str
    shift_mm: Tuple[float, float, float]
    rotation: np.ndarray
    scales: Tuple[float, float, float]
    elastic_sd_mm: float
    gamma: float
    blur_sigma_vox: float
    bias_amplitude: float
    noise_sigma: float
    intensity_scale: float


def find_source_dir(source_dir: Optional[str] = None) -> Path:
    """Folder holding ``ch2.nii.gz`` and ``aal.nii.gz``: ``source_dir``, else ``$SAMSSL_MRICRON_TEMPLATES``,
    else the Debian install locations.

    Raises:
        FileNotFoundError: naming the install command when neither file set is found.
    """
    candidates = [source_dir] if source_dir else ([os.environ[SOURCE_DIR_ENV]] if os.environ.get(SOURCE_DIR_ENV)
                                                  else list(DEFAULT_SOURCE_DIRS))
    for candidate in candidates:
        folder = Path(candidate)
        if (folder / SOURCE_IMAGE).is_file() and (folder / SOURCE_LABELS).is_file():
            return folder
    raise FileNotFoundError(
        f"the real-anatomy dataset needs {SOURCE_IMAGE} and {SOURCE_LABELS} from the Debian package "
        f"'{SOURCE_PACKAGE}'; looked in {candidates}. Install it with `{INSTALL_COMMAND}`, or point "
        f"source_dir / --source-dir / ${SOURCE_DIR_ENV} at a folder holding both files.")


def load_source(source_dir: Path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the brain and the atlas.

    Returns:
        ``image``: float32 ``(181, 217, 181)`` in the files' RAS voxel order, normalised so that the
        99.5th percentile is 1; ``classes``: uint8 of the same shape with the :data:`ANATOMY_CLASSES`
        indices (0 background); ``affine``: 4x4 voxel -> MNI mm (RAS) matrix shared by both files.
    """
    import nibabel as nib

    image_nii = nib.load(str(source_dir / SOURCE_IMAGE))
    labels_nii = nib.load(str(source_dir / SOURCE_LABELS))
    if image_nii.shape != labels_nii.shape or not np.allclose(image_nii.affine, labels_nii.affine):
        raise ValueError(f"{SOURCE_IMAGE} {image_nii.shape} and {SOURCE_LABELS} {labels_nii.shape} are not on the "
                         f"same grid; the installed {SOURCE_PACKAGE} is not the expected release")
    image = np.asarray(image_nii.dataobj, dtype=np.float32)
    atlas = np.asarray(labels_nii.dataobj)
    image /= np.percentile(image, 99.5)
    classes = np.zeros(atlas.shape, dtype=np.uint8)
    for index, region_ids in enumerate(ANATOMY_CLASSES.values(), start=1):
        classes[np.isin(atlas, region_ids)] = index
    return image, classes, image_nii.affine.astype(np.float64)


def site_ranges(site: str) -> Dict[str, tuple]:
    """The draw ranges of ``site`` (a key of :data:`SITE_RANGES`): :data:`DEFAULT_RANGES` with its changes."""
    if site not in SITE_RANGES:
        raise ValueError(f"unknown site {site!r}; known: {sorted(SITE_RANGES)}")
    return {**DEFAULT_RANGES, **SITE_RANGES[site]}


def draw_case_parameters(rng: np.random.Generator, hemisphere: str, site: str = "default") -> CaseParameters:
    """Draw one case's transform and intensity parameters (ranges in the module docstring and
    :data:`SITE_RANGES`). The ``default`` site draws exactly what this function always drew, in the same
    order; only a site with several scale classes (``site_size``) draws one extra number, the class."""
    ranges = site_ranges(site)
    shift_mm = tuple(float(v) for v in rng.uniform(-6.0, 6.0, size=3))
    rotation = random_rotation(rng, 12.0)
    scale_classes = ranges["scales"]
    scale_low, scale_high = scale_classes[int(rng.integers(len(scale_classes)))] if len(scale_classes) > 1 \
        else scale_classes[0]
    scales = tuple(float(v) for v in rng.uniform(scale_low, scale_high, size=3))
    gamma_low, gamma_high = ranges["gamma"]
    return CaseParameters(
        hemisphere=hemisphere,
        shift_mm=shift_mm,
        rotation=rotation,
        scales=scales,
        elastic_sd_mm=float(rng.uniform(1.5, 3.0)),
        gamma=float(np.exp(rng.uniform(np.log(gamma_low), np.log(gamma_high)))),
        blur_sigma_vox=float(rng.uniform(*ranges["blur_sigma_vox"])),
        bias_amplitude=float(rng.uniform(*ranges["bias_amplitude"])),
        noise_sigma=float(rng.uniform(*ranges["noise_sigma"])),
        intensity_scale=float(rng.uniform(400.0, 1200.0)),
    )


def case_site(prefix: str, index: int, num_source: Optional[int]) -> str:
    """Site of case ``{prefix}_{index:03d}``: ``default`` when ``num_source`` is None (no shift); otherwise
    ``source`` for the first ``num_source`` training cases and :data:`TARGET_SITES` round-robin for the other
    training cases and for the test cases (counted separately per split)."""
    return synthetic_case_site(prefix, index, num_source, TARGET_SITES)


def _rotation_angle_deg(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def render_case(source_image: np.ndarray, source_classes: np.ndarray, affine: np.ndarray, params: CaseParameters,
                rng: np.random.Generator, shape: Sequence[int] = (40, 48, 40),
                spacing_mm: float = 1.5) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """Resample one case out of the source brain.

    Args:
        source_image, source_classes, affine: output of :func:`load_source` (``source_image`` already
            anti-alias blurred).
        params: the case's draws; ``rng`` supplies the random fields (elastic, bias, noise).
        shape: ``(Z, Y, X)`` output voxels; Z runs inferior->superior, Y anterior->posterior, X right->left
            (ITK's LPS axes with identity direction).
        spacing_mm: isotropic output voxel size.
    Returns:
        ``image`` int16 ``(Z, Y, X)``, ``label`` uint8 ``(Z, Y, X)`` (0 background, 1..3 classes), and the
        ITK origin (LPS mm) of voxel 0 (the undeformed crop position in MNI space, for viewers).
    """
    shape = tuple(int(s) for s in shape)
    # output voxel centres relative to the crop centre, in LPS mm, then as RAS offsets
    axes = [(np.arange(n) - (n - 1) / 2.0) * spacing_mm for n in shape]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    offsets_ras = np.stack([-xx, -yy, zz]).reshape(3, -1)  # (3, N): LPS -> RAS flips x and y

    elastic = np.stack([smooth_random_field(rng, shape, (5, 5, 5)) for _ in range(3)]).reshape(3, -1)
    elastic *= params.elastic_sd_mm / max(float(elastic.std()), 1e-8)

    center = np.asarray(HEMISPHERE_CENTERS_MM[params.hemisphere]) + np.asarray(params.shift_mm)
    linear = params.rotation @ np.diag(params.scales)
    points_ras = center[:, None] + linear @ offsets_ras + elastic
    inverse = np.linalg.inv(affine)
    voxels = inverse[:3, :3] @ points_ras + inverse[:3, 3:4]

    image = ndimage.map_coordinates(source_image, voxels, order=1, mode="constant", cval=0.0).reshape(shape)
    num_classes = int(source_classes.max())
    scores = np.empty((num_classes + 1, voxels.shape[1]), dtype=np.float32)
    for c in range(1, num_classes + 1):
        scores[c] = ndimage.map_coordinates((source_classes == c).astype(np.float32), voxels, order=1,
                                            mode="constant", cval=0.0)
    scores[0] = 1.0 - scores[1:].sum(axis=0)
    label = scores.argmax(axis=0).astype(np.uint8).reshape(shape)

    # MR-like acquisition changes, in the order a scanner would apply them
    image = np.clip(image, 0.0, None) ** params.gamma
    if params.blur_sigma_vox > 0:
        image = ndimage.gaussian_filter(image, params.blur_sigma_vox)
    image = image * np.exp(params.bias_amplitude * smooth_random_field(rng, shape, (3, 3, 3)))
    white_matter = float(np.percentile(image, 95))
    sigma = params.noise_sigma * white_matter
    image = np.sqrt((image + rng.normal(0.0, sigma, shape)) ** 2 + rng.normal(0.0, sigma, shape) ** 2)
    image = np.clip(np.round(image * params.intensity_scale), 0, np.iinfo(np.int16).max).astype(np.int16)

    corner_lps = np.array([-center[0], -center[1], center[2]]) - np.array(
        [(shape[2] - 1) / 2.0, (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0]) * spacing_mm
    return image, label, tuple(float(v) for v in corner_lps)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package_version() -> str:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE], capture_output=True,
                                text=True, timeout=10)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    changelog = Path(f"/usr/share/doc/{SOURCE_PACKAGE}/changelog.Debian.gz")
    if changelog.is_file():
        with gzip.open(changelog, "rt") as f:
            first = f.readline()
        if "(" in first and ")" in first:
            return first[first.index("(") + 1:first.index(")")]
    return "unknown"


def _cohort_section(num_source: Optional[int]) -> List[str]:
    """PROVENANCE.md lines describing the sites of a shifted build (none for a default build)."""
    if num_source is None:
        return []

    def fmt(key: str, value: tuple) -> str:
        return " or ".join(f"{lo}-{hi}" for lo, hi in value) if key == "scales" else f"{value[0]}-{value[1]}"

    keys = list(DEFAULT_RANGES)
    return [
        "## Shifted cohorts",
        f"The first {num_source} training cases are the labeled-to-be SOURCE site; the other training cases (the "
        "unlabeled pool) and all test cases are TARGET cases, assigned round-robin (per split) to "
        f"{', '.join(TARGET_SITES)}; `cohorts.json` lists them. Ranges per site (crop shift, rotation, elastic "
        "and scanner scale keep the default ranges everywhere; scales: one factor class per case, one value per "
        "axis):",
        "",
        "| site | " + " | ".join(keys) + " |",
        "| --- " * (1 + len(keys)) + "|",
        *(f"| {site} | " + " | ".join(fmt(k, site_ranges(site)[k]) for k in keys) + " |"
          for site in ("default", "source", *TARGET_SITES)),
        "",
    ]


def _provenance(folder: Path, source_dir: Path, rows: List[str], shape: Sequence[int], spacing_mm: float,
                seed: int, class_table: List[str], num_source: Optional[int] = None) -> str:
    image_path, labels_path = source_dir / SOURCE_IMAGE, source_dir / SOURCE_LABELS
    return "\n".join([
        f"# Provenance of {folder.name}",
        "",
        "## Source",
        f"- Debian package `{SOURCE_PACKAGE}` version {_package_version()} "
        f"(install: `{INSTALL_COMMAND}`), folder `{source_dir}`.",
        f"- Image: `{SOURCE_IMAGE}` (sha256 {_sha256(image_path)}): the Colin 27 T1-weighted MR brain of one "
        "person, average of 27 scans, 1 mm MNI space (Holmes CJ et al., Enhancement of MR images using "
        "registration for signal averaging, J Comput Assist Tomogr 22:324-333, 1998).",
        f"- Labels: `{SOURCE_LABELS}` (sha256 {_sha256(labels_path)}): the AAL atlas, manually drawn on that same "
        "brain and grid (Tzourio-Mazoyer N et al., Automated anatomical labeling of activations in SPM using a "
        "macroscopic anatomical parcellation of the MNI MRI single-subject brain, NeuroImage 15:273-289, 2002).",
        f"- License: the package's copyright file (`/usr/share/doc/{SOURCE_PACKAGE}/copyright`) places its files "
        "under BSD-3-clause (MRIcron, Chris Rorden). Cite the two papers above when publishing results.",
        "",
        "## Classes",
        "| label | name | AAL region ids (left, right) |",
        "| --- | --- | --- |",
        *class_table,
        "",
        "## Transforms",
        f"Builder: `nnunetv2_samssl.demo.real_anatomy`, seed {seed}, output grid {tuple(shape)} (Z, Y, X) at "
        f"{spacing_mm} mm isotropic; Z inferior->superior, Y anterior->posterior, X right->left (ITK LPS with "
        "identity direction). The origin written into each file is the undeformed crop corner in MNI mm.",
        "1. The source image is normalised (99.5th percentile = 1) and blurred against aliasing with a Gaussian "
        "of sigma 0.5 x sqrt((output spacing / source spacing)^2 - 1) source voxels.",
        "2. Each output voxel is mapped into the source: crop centre (hemisphere nuclei centre + shift) + "
        "rotation x scaling x offset + smooth elastic displacement (5x5x5 control grid, cubic). Image: linear "
        "interpolation; labels: linear interpolation of each class indicator, then argmax.",
        "3. Intensity: gamma, Gaussian blur, multiplicative bias field exp(a f), Rician noise (sigma relative to "
        "the 95th percentile), scale to scanner units, round to int16.",
        "",
        "All cases come from one person: variation is synthetic (shape, pose, field of view, contrast, noise); "
        "the dataset does not measure cross-subject generalisation.",
        "",
        *_cohort_section(num_source),
        "## Cases",
        "| case | site | hemisphere | shift mm (R,A,S) | rotation angle deg | scales | elastic sd mm | gamma | "
        "blur vox | bias a | noise | scale | " + " | ".join(f"{n} voxels" for n in ANATOMY_CLASSES) + " |",
        "| --- " * (12 + len(ANATOMY_CLASSES)) + "|",
        *rows,
        "",
    ])


def make_fewlabel_dataset(nnunet_raw: str, dataset_id: int = 902, name: str = "SamsslBrainNuclei",
                          num_train: int = 14, num_test: int = 6, shape: Sequence[int] = (40, 48, 40),
                          spacing_mm: float = 1.5, seed: int = 0, source_dir: Optional[str] = None,
                          overwrite: bool = False, shifted: bool = False, num_source: int = 4) -> str:
    """Write the real-anatomy few-label dataset (see the module docstring) as an nnU-Net v2 raw dataset.

    Args:
        nnunet_raw: the nnU-Net raw folder; created if missing.
        dataset_id, name: folder ``Dataset{dataset_id:03d}_{name}``.
        num_train: labeled cases in ``imagesTr``/``labelsTr`` (ids ``tr_000``...), at least 5 for nnU-Net's
            default 5-fold split.
        num_test: held-out labeled cases in ``imagesTs``/``labelsTs`` (ids ``ts_000``...).
        shape: ``(Z, Y, X)`` voxels per case; at 1.5 mm the default covers 60 x 72 x 60 mm.
        spacing_mm: isotropic voxel size.
        seed: base seed; the same arguments and source files give byte-identical cases.
        source_dir: folder with ``ch2.nii.gz`` and ``aal.nii.gz`` (default: see :func:`find_source_dir`).
        overwrite: replace an existing folder of the same name.
        shifted: build the shifted cohorts (module docstring): ``tr_000 .. tr_{num_source-1}`` from the source
            site, all other cases from three target sites; also writes ``cohorts.json``. False (default) writes
            exactly the unshifted dataset.
        num_source: number of source training cases when ``shifted``, ``1 .. num_train - 1``; ignored otherwise.
    Returns:
        The dataset folder path.
    Raises:
        FileNotFoundError: the source package is not installed (the message gives the install command).
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 axes of at least 16 voxels, got {tuple(shape)}")
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    if shifted and not 1 <= num_source <= num_train - 1:
        raise ValueError(f"num_source must be in 1..num_train - 1 = {num_train - 1} with shifted=True (at least one "
                         f"source case and one unlabeled target case), got num_source={num_source}")
    site_source_count = int(num_source) if shifted else None
    source = find_source_dir(source_dir)
    image, classes, affine = load_source(source)
    source_spacing = float(np.abs(np.diag(affine)[:3]).min())
    if spacing_mm > source_spacing:
        image = ndimage.gaussian_filter(image, 0.5 * np.sqrt((spacing_mm / source_spacing) ** 2 - 1.0))

    Path(nnunet_raw).mkdir(parents=True, exist_ok=True)
    folder = prepare_dataset_folder(nnunet_raw, dataset_id, name,
                                    ["imagesTr", "labelsTr", "imagesTs", TEST_LABELS_FOLDER], overwrite=overwrite)
    spacing = (float(spacing_mm),) * 3
    rows = []
    sites: Dict[str, str] = {}
    for prefix, count, image_dir, label_dir in (("tr", num_train, "imagesTr", "labelsTr"),
                                                ("ts", num_test, "imagesTs", TEST_LABELS_FOLDER)):
        for index in range(count):
            case_id = f"{prefix}_{index:03d}"
            hemisphere = "left" if index % 2 == 0 else "right"
            site = sites[case_id] = case_site(prefix, index, site_source_count)
            rng = case_rng(seed, prefix, index)
            for _ in range(20):  # redraw on the rare crop that cuts a class below MIN_CLASS_VOXELS
                params = draw_case_parameters(rng, hemisphere, site)
                case_image, label, origin = render_case(image, classes, affine, params, rng, shape, spacing_mm)
                volumes = np.bincount(label.ravel(), minlength=len(ANATOMY_CLASSES) + 1)[1:]
                if volumes.min() >= MIN_CLASS_VOXELS:
                    break
            else:
                raise RuntimeError(f"case {case_id}: a class kept fewer than {MIN_CLASS_VOXELS} voxels in 20 draws; "
                                   f"the grid {tuple(shape)} x {spacing_mm} mm is too small for the nuclei")
            write_volume(case_image, spacing, folder / image_dir / f"{case_id}_0000{FILE_ENDING}", origin)
            write_volume(label, spacing, folder / label_dir / f"{case_id}{FILE_ENDING}", origin)
            rows.append(
                f"| {case_id} | {site} | {hemisphere} | {', '.join(f'{v:+.1f}' for v in params.shift_mm)} | "
                f"{_rotation_angle_deg(params.rotation):.1f} | {', '.join(f'{v:.2f}' for v in params.scales)} | "
                f"{params.elastic_sd_mm:.2f} | {params.gamma:.2f} | {params.blur_sigma_vox:.2f} | "
                f"{params.bias_amplitude:.2f} | {params.noise_sigma:.3f} | {params.intensity_scale:.0f} | "
                + " | ".join(str(int(v)) for v in volumes) + " |")

    labels = {"background": 0, **{n: i for i, n in enumerate(ANATOMY_CLASSES, start=1)}}
    generator = {"seed": int(seed), "shape": [int(s) for s in shape], "spacing_mm": float(spacing_mm)}
    description = ("Deep grey-matter nuclei (caudate, putamen, thalamus) in hemisphere crops of the real Colin 27 "
                   "T1 MR brain with AAL labels, under random elastic/affine, contrast, bias and noise changes. "
                   "See PROVENANCE.md.")
    if shifted:
        generator.update(shifted=True, num_source=int(num_source))
        description += (f" Shifted cohorts: tr_000..tr_{num_source - 1:03d} from one source site, all other cases "
                        f"from the target sites {', '.join(TARGET_SITES)}; see cohorts.json.")
        write_cohorts(folder, sites, TARGET_SITES)
    write_dataset_json(
        folder, {"0": "T1"}, labels, num_train,
        name=folder.name,
        description=description,
        licence=f"BSD-3-clause (Debian package {SOURCE_PACKAGE}); cite Holmes 1998 and Tzourio-Mazoyer 2002",
        reference="Colin 27 (Holmes et al. 1998); AAL (Tzourio-Mazoyer et al. 2002)",
        numTest=int(num_test),
        test_labels_folder=TEST_LABELS_FOLDER,
        generator=generator,
    )
    class_table = [f"| {i} | {n} | {', '.join(str(r) for r in ids)} |"
                   for i, (n, ids) in enumerate(ANATOMY_CLASSES.items(), start=1)]
    provenance = _provenance(folder, source, rows, shape, spacing_mm, seed, class_table, site_source_count)
    (folder / "PROVENANCE.md").write_text(provenance)
    return str(folder)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry ``nnUNetv2_samssl_make_fewlabel_dataset``."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_make_fewlabel_dataset",
        description="Write the real-anatomy few-label dataset (caudate, putamen, thalamus in the Colin 27 T1 brain "
                    f"from the Debian package {SOURCE_PACKAGE}) into an nnU-Net raw folder.")
    parser.add_argument("-o", "--output", default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset-id", type=int, default=902, help="dataset id (default 902)")
    parser.add_argument("-n", "--name", default="SamsslBrainNuclei", help="dataset name (default SamsslBrainNuclei)")
    parser.add_argument("--num-train", type=int, default=14, help="labeled training cases (default 14)")
    parser.add_argument("--num-test", type=int, default=6, help="held-out labeled test cases (default 6)")
    parser.add_argument("--shape", type=int, nargs=3, default=(40, 48, 40), metavar=("Z", "Y", "X"),
                        help="voxels per case (default 40 48 40)")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm (default 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--source-dir", default=None,
                        help=f"folder with {SOURCE_IMAGE} and {SOURCE_LABELS} (default: ${SOURCE_DIR_ENV} or "
                             f"{DEFAULT_SOURCE_DIRS[0]})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--shifted", action="store_true",
                        help="shifted cohorts: the first --num-source training cases from one narrow source site, "
                             "all other training and test cases from three shifted target sites (contrast + bias, "
                             "low resolution + noise, anatomy size); writes cohorts.json")
    parser.add_argument("--num-source", type=int, default=None, metavar="K",
                        help="source training cases with --shifted (default 4; 1 .. num-train - 1)")
    args = parser.parse_args(argv)
    if not args.output:
        parser.error("no output folder: pass -o RAW_FOLDER or set nnUNet_raw")
    if args.num_source is not None and not args.shifted:
        parser.error("--num-source only applies with --shifted")
    try:
        folder = make_fewlabel_dataset(args.output, args.dataset_id, args.name, args.num_train, args.num_test,
                                       tuple(args.shape), args.spacing, args.seed, args.source_dir, args.overwrite,
                                       shifted=args.shifted,
                                       num_source=4 if args.num_source is None else args.num_source)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    except ValueError as error:
        parser.error(str(error))
    print(folder)


if __name__ == "__main__":
    main()
