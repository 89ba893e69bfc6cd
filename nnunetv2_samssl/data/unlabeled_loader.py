"""The unlabeled batch stream: nnU-Net's ``nnUNetDataLoader`` + training augmentation, no foreground oversampling."""
from __future__ import annotations

from typing import List, Optional, Sequence

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def split_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """The per-rank share of a global batch, distributed like nnU-Net distributes the labeled batch."""
    if global_batch_size < world_size:
        raise ValueError(f"unlabeled_batch_size={global_batch_size} is smaller than the {world_size} DDP ranks; "
                         f"each rank needs at least one unlabeled patch.")
    sizes: List[int] = [global_batch_size // world_size] * world_size
    for i in range(global_batch_size - sum(sizes)):
        sizes[i] += 1
    return sizes[rank]


def build_unlabeled_loader(dataset, batch_size: int, initial_patch_size: Sequence[int],
                           final_patch_size: Sequence[int], label_manager, transforms,
                           num_processes: int, pin_memory: bool, seeds: Optional[Sequence[int]] = None):
    """An infinite iterator of dicts with ``data`` ``(b, C, *patch)`` (``target`` is a dummy, never use it).

    ``num_processes`` workers run the augmentation (0 = in the main process), separate from the
    labeled loader's workers; ``seeds``: one per worker (``None``: unseeded, as nnU-Net's loaders).
    """
    loader = nnUNetDataLoader(dataset, batch_size, initial_patch_size, final_patch_size, label_manager,
                              oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                              transforms=transforms, probabilistic_oversampling=False)
    # unlabeled cases have no class locations: with an ignore label nnU-Net's sampler would look up the
    # locations of annotated voxels; unlabeled patches are drawn uniformly like any non-oversampled patch
    loader.has_ignore = False
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(6, num_processes // 2),
                                        seeds=None if seeds is None else list(seeds[:num_processes]),
                                        pin_memory=pin_memory, wait_time=0.002)
