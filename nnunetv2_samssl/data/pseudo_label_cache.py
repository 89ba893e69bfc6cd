"""Per-case pseudo-label maps on disk, written as whole generations that readers switch to atomically.

Layout under ``root`` (a trainer keeps it in its output folder)::

    root/CURRENT             name of the generation readers use (replaced atomically)
    root/epoch_0010/<case>.b2nd   (1, *case shape) labels, 0..K-1 = class, K = unknown (no pseudo-label)
    root/epoch_0010/DONE     written last: the generation is complete
    root/epoch_0010.tmp/     a generation being written (never read)

A generation is published by renaming its ``.tmp`` folder and then replacing ``CURRENT``, so a reader (the
unlabeled loader's worker processes read ``CURRENT`` on every case they load) always sees one complete
generation: the previous one until the new one is in place. The generation before the current one is kept
for readers that opened it just before the switch; older ones are deleted.

Cases without a pseudo-label (no generation yet, or a case missing from it) read as all-unknown, which
the losses mask out. The maps are derived from images and model predictions only; nothing here ever
reads a reference label.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional, Sequence

import numpy as np

CURRENT_FILE = "CURRENT"
DONE_FILE = "DONE"


def generation_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _label_dtype(unknown_label: int):
    return np.uint8 if unknown_label <= np.iinfo(np.uint8).max else np.int16


class PseudoLabelCache:
    """Reads and writes generations of per-case label maps (see the module docstring). Picklable.

    Args:
        root: folder of the cache (created on the first write).
        unknown_label: the value of voxels without a pseudo-label (the number of classes ``K``).
    """

    def __init__(self, root: str, unknown_label: int):
        if unknown_label < 1:
            raise ValueError(f"unknown_label must be the number of classes (>= 2), got {unknown_label}")
        self.root = root
        self.unknown_label = int(unknown_label)

    # ------------------------------------------------------------------ reading
    def current_generation(self) -> Optional[str]:
        """Name of the generation readers use, or None before the first one is published."""
        try:
            with open(os.path.join(self.root, CURRENT_FILE)) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        return name or None

    def has_generation(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, DONE_FILE))

    def load(self, identifier: str, spatial_shape: Sequence[int]):
        """``(1, *spatial_shape)`` labels of a case from the current generation; all-unknown without one."""
        name = self.current_generation()
        if name is not None:
            path = os.path.join(self.root, name, identifier + ".b2nd")
            if os.path.isfile(path):
                import blosc2
                labels = blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1})
                if tuple(labels.shape[1:]) != tuple(spatial_shape):
                    raise RuntimeError(f"The cached pseudo-label {path} has shape {tuple(labels.shape)}, the image "
                                       f"has spatial shape {tuple(spatial_shape)}. The cache does not belong to "
                                       f"this preprocessed data; delete {self.root} and let training rebuild it.")
                return labels
        unknown = np.full((1,) * (1 + len(spatial_shape)), self.unknown_label, dtype=_label_dtype(self.unknown_label))
        return np.broadcast_to(unknown, (1, *spatial_shape))

    # ------------------------------------------------------------------ writing
    def staging_folder(self, name: str) -> str:
        """The folder a generation is written into before :meth:`publish` (created, may already hold cases of
        other DDP ranks)."""
        folder = os.path.join(self.root, name + ".tmp")
        os.makedirs(folder, exist_ok=True)
        return folder

    def clear_staging(self, name: str) -> None:
        shutil.rmtree(os.path.join(self.root, name + ".tmp"), ignore_errors=True)

    def write_case(self, name: str, identifier: str, labels: np.ndarray, patch_size: Sequence[int]) -> None:
        """Writes ``labels`` ``(*spatial)`` (values 0..K) of one case into the staging folder of ``name``."""
        import blosc2
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
        labels = np.asarray(labels)
        if labels.min(initial=0) < 0 or labels.max(initial=0) > self.unknown_label:
            raise ValueError(f"pseudo-labels must lie in [0, {self.unknown_label}], got "
                             f"[{labels.min()}, {labels.max()}]")
        array = np.ascontiguousarray(labels[None].astype(_label_dtype(self.unknown_label)))
        blocks, chunks = comp_blosc2_params(array.shape, patch_size, array.itemsize)
        folder = self.staging_folder(name)
        final = os.path.join(folder, identifier + ".b2nd")
        partial = os.path.join(folder, "." + identifier + ".b2nd.part")
        blosc2.asarray(array, urlpath=partial, chunks=chunks, blocks=blocks, mode="w",
                       cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
        os.replace(partial, final)

    def publish(self, name: str) -> None:
        """Makes the staged generation ``name`` the current one (atomic for readers) and prunes old ones."""
        staged = os.path.join(self.root, name + ".tmp")
        if not os.path.isdir(staged):
            raise RuntimeError(f"No staged pseudo-label generation {staged} to publish.")
        with open(os.path.join(staged, DONE_FILE), "w") as f:
            f.write("complete\n")
        final = os.path.join(self.root, name)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(staged, final)
        self.activate(name)

    def activate(self, name: str) -> None:
        """Points ``CURRENT`` at the complete generation ``name`` (e.g. the one a resumed checkpoint used)."""
        if not self.has_generation(name):
            raise RuntimeError(f"Pseudo-label generation {os.path.join(self.root, name)} is missing or incomplete.")
        previous = self.current_generation()
        tmp = os.path.join(self.root, "." + CURRENT_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, CURRENT_FILE))
        keep = {name, previous}
        for old in self.generations():
            if old not in keep:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def generations(self) -> List[str]:
        """Complete generations on disk, oldest first."""
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root) if n.startswith("epoch_") and not n.endswith(".tmp")
                      and self.has_generation(n))
