"""A dataset of unlabeled cases that nnU-Net's own ``nnUNetDataLoader`` can sample from.

Two sources feed it:

- preprocessed ``imagesUnlabeled`` cases (``<data_identifier>_unlabeled/``),
- training cases of the fold demoted to unlabeled in labeled-subset mode (the configuration's folder).

For every case only the image (``<case>.b2nd`` / ``.npy`` / ``.npz['data']``) and the properties are
read; the ``_seg`` file is never opened, so the label of a demoted case cannot reach a loss or a
prompt. The loader still needs a segmentation array for its crop/augment pipeline: it gets a
zero-cost all-zero view (``np.broadcast_to``) and ``class_locations = {}`` (no foreground sampling).

Trainers that train on cached pseudo-labels (``pseudo_labels``, a
:class:`~nnunetv2_samssl.data.pseudo_label_cache.PseudoLabelCache`) get those maps as the segmentation
instead, so they ride through the same crop and augmentation as the image.

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
    """The label map of a labeled case (diagnostics only, see the module docstring)."""
    b2nd = os.path.join(folder, identifier + "_seg.b2nd")
    if os.path.isfile(b2nd):
        import blosc2
        return blosc2.open(urlpath=b2nd, mode="r", dparams={"nthreads": 1})
    npy = os.path.join(folder, identifier + "_seg.npy")
    if os.path.isfile(npy):
        return np.load(npy, mmap_mode="r")
    with np.load(os.path.join(folder, identifier + ".npz")) as f:
        return f["seg"]


class UnlabeledDataset(nnUNetBaseDataset):
    """nnU-Net dataset interface over unlabeled cases from one or more folders.

    ``load_case(id)`` returns ``(data (C, *shape) array, zero seg (1, *shape) read-only view, None,
    properties with class_locations={})``.
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
        if self.pseudo_labels is not None:
            if self.hidden_label_cases:
                raise RuntimeError("An UnlabeledDataset carries either pseudo-labels or hidden labels, not both.")
            return data, self.pseudo_labels.load(identifier, data.shape[1:]), None, properties
        if identifier in self.hidden_label_cases:
            return data, _open_seg(folder, identifier), None, properties
        zero_seg = np.broadcast_to(np.zeros((1,) * len(data.shape), dtype=np.int16), (1, *data.shape[1:]))
        return data, zero_seg, None, properties

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("UnlabeledDataset is read-only.")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        """Case ids with a finished preprocessing (``.pkl`` present) in ``folder``."""
        return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl") and not f.startswith("."))
