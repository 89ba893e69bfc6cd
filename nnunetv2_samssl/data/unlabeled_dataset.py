"""A dataset of unlabeled cases that nnU-Net's own ``nnUNetDataLoader`` can sample from.

Two sources feed it:

- preprocessed ``imagesUnlabeled`` cases (``<data_identifier>_unlabeled/``),
- training cases of the fold demoted to unlabeled in labeled-subset mode (the configuration's folder).

For every case the image (``<case>.b2nd`` / ``.npy`` / ``.npz['data']``), the properties and nnU-Net's
non-zero mask are read, never a label value. The loader's segmentation channel carries that mask exactly as
it does for labeled cases (-1 outside the non-zero region, 0 inside), so nnU-Net's ``MaskImageTransform``
(``use_mask_for_norm``) and every other transform treat unlabeled patches like labeled ones, and
``class_locations = {}`` (no foreground sampling). The mask comes from the ``_seg`` file, which holds only
the mask for ``imagesUnlabeled`` cases; for a demoted case only the sign of its ``_seg`` values is read
(nnU-Net writes -1 there for background voxels outside the non-zero region), through :class:`MaskedMap`, so
changing its label values changes nothing. (The one thing the sign tells is that a voxel outside the image's
non-zero region is not background, where a label reaches outside the imaged region.)

Trainers that train on cached pseudo-labels (``pseudo_labels``, a
:class:`~nnunetv2_samssl.data.pseudo_label_cache.PseudoLabelCache`) get those maps as the segmentation
instead (-1 outside the non-zero mask as well), so they ride through the same crop and augmentation as the
image.

The one exception is opt-in diagnostics: with ``hidden_label_cases`` the real labels of those demoted
cases travel through the same crop/augmentation (which draws its random numbers independently of the
label values) into the batch's ``target``, which trainers use only to LOG how good their pseudo-labels
are. Tests show training stays bit-identical whatever those labels contain.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset


@dataclass(frozen=True)
class UnlabeledSource:
    """A folder of preprocessed cases and the ids taken from it as unlabeled."""

    folder: str
    identifiers: Tuple[str, ...]


def _open_image(folder: str, identifier: str):
    b2nd = os.path.join(folder, identifier + ".b2nd")
    if os.path.isfile(b2nd):
        import blosc2
        mmap = {} if os.name == "nt" else {"mmap_mode": "r"}
        return blosc2.open(urlpath=b2nd, mode="r", dparams={"nthreads": 1}, **mmap)
    npy = os.path.join(folder, identifier + ".npy")
    if os.path.isfile(npy):
        return np.load(npy, mmap_mode="r")
    npz = os.path.join(folder, identifier + ".npz")
    if os.path.isfile(npz):
        with np.load(npz) as f:
            return f["data"]
    raise FileNotFoundError(f"No preprocessed image for case '{identifier}' in {folder} (.b2nd, .npy or .npz).")


def _open_seg(folder: str, identifier: str):
    """The ``_seg`` array of a case: the label map of a labeled case (diagnostics only, or through
    :class:`MaskedMap`), nnU-Net's non-zero mask of an ``imagesUnlabeled`` case."""
    b2nd = os.path.join(folder, identifier + "_seg.b2nd")
    if os.path.isfile(b2nd):
        import blosc2
        return blosc2.open(urlpath=b2nd, mode="r", dparams={"nthreads": 1})
    npy = os.path.join(folder, identifier + "_seg.npy")
    if os.path.isfile(npy):
        return np.load(npy, mmap_mode="r")
    with np.load(os.path.join(folder, identifier + ".npz")) as f:
        return f["seg"]


class MaskedMap:
    """A read-only ``(1, *shape)`` array view that nnU-Net's loader crops like a ``_seg`` array: ``-1`` where
    the case's ``_seg`` is negative (outside nnU-Net's non-zero mask), else ``labels`` (0 when ``None``).

    Only what a crop reads is read from disk; the label values of ``seg`` never reach the result.
    """

    def __init__(self, seg, labels=None):
        if labels is not None and tuple(labels.shape) != tuple(seg.shape):
            raise ValueError(f"labels of shape {tuple(labels.shape)} for a mask of shape {tuple(seg.shape)}")
        self.seg, self.labels = seg, labels
        self.shape = tuple(seg.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.int16)

    def __getitem__(self, index) -> np.ndarray:
        outside = np.asarray(self.seg[index]) < 0
        inside = np.zeros(outside.shape, np.int16) if self.labels is None \
            else np.asarray(self.labels[index]).astype(np.int16)
        return np.where(outside, np.int16(-1), inside)

    def __array__(self, dtype=None, copy=None):
        out = self[tuple(slice(None) for _ in self.shape)]
        return out if dtype is None else out.astype(dtype)


class UnlabeledDataset(nnUNetBaseDataset):
    """nnU-Net dataset interface over unlabeled cases from one or more folders.

    ``load_case(id)`` returns ``(data (C, *shape) array, (1, *shape) mask view (-1 outside the non-zero region,
    else 0 or the cached pseudo-label), None, properties with class_locations={})``.
    """

    def __init__(self, sources: Sequence[UnlabeledSource], hidden_label_cases: Sequence[str] = ()):
        self._folder_of: Dict[str, str] = {}
        for src in sources:
            for identifier in src.identifiers:
                if identifier in self._folder_of:
                    raise ValueError(f"Unlabeled case id '{identifier}' occurs in both {self._folder_of[identifier]} "
                                     f"and {src.folder}; case ids must be unique.")
                self._folder_of[identifier] = src.folder
        if not self._folder_of:
            raise ValueError("UnlabeledDataset needs at least one case.")
        unknown = set(hidden_label_cases) - set(self._folder_of)
        if unknown:
            raise ValueError(f"hidden_label_cases {sorted(unknown)[:5]} are not cases of this dataset.")
        self.hidden_label_cases = frozenset(hidden_label_cases)
        self.pseudo_labels = None  # a PseudoLabelCache: its maps replace the all-zero segmentation
        # deliberately not calling nnUNetBaseDataset.__init__: it lists one folder
        self.source_folder = None
        self.folder_with_segs_from_previous_stage = None
        self.identifiers = sorted(self._folder_of)

    def load_image(self, identifier: str):
        """``(C, *shape)`` preprocessed image of a case (memory-mapped where the format allows)."""
        return _open_image(self._folder_of[identifier], identifier)

    def load_hidden_label(self, identifier: str):
        """The reference label of a labeled-subset case, for LOGGED diagnostics only (never a loss or prompt)."""
        return _open_seg(self._folder_of[identifier], identifier)

    def load_case(self, identifier):
        folder = self._folder_of[identifier]
        data = _open_image(folder, identifier)
        properties = dict(load_pickle(os.path.join(folder, identifier + ".pkl")))
        properties["class_locations"] = {}
        if identifier in self.hidden_label_cases:
            if self.pseudo_labels is not None:
                raise RuntimeError("An UnlabeledDataset carries either pseudo-labels or hidden labels, not both.")
            return data, _open_seg(folder, identifier), None, properties
        labels = None if self.pseudo_labels is None else self.pseudo_labels.load(identifier, data.shape[1:])
        return data, MaskedMap(self.load_mask_source(identifier), labels), None, properties

    def load_mask_source(self, identifier: str):
        """The array whose negative values mark nnU-Net's non-zero mask (see the module docstring)."""
        folder = self._folder_of[identifier]
        try:
            return _open_seg(folder, identifier)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Case '{identifier}' in {folder} has an image but no _seg file (nnU-Net's non-zero mask). The "
                f"folder is incomplete: for imagesUnlabeled cases delete the case's files there and run "
                f"nnUNetv2_samssl_preprocess_unlabeled again; for training cases, nnUNetv2_preprocess.") from None

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("UnlabeledDataset is read-only.")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        """Case ids with a finished preprocessing (``.pkl`` present) in ``folder``."""
        return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl") and not f.startswith("."))
