"""Seeded training (``training_seed``): nnU-Net draws its initial weights, patches and augmentations unseeded.

With a seed, :func:`seed_everything` runs before the network is built, so trainers given one seed start from the
same weights, and every data loader's workers get seeds of their own stream (:func:`stream_seeds`: the labeled
training patches, the validation patches, the unlabeled patches), so one stream does not depend on how much
another trainer draws from the others. A resumed run (``--c``) mixes the epoch it resumes at into every seed:
it goes on with new draws, not with those of the first epochs.
"""
from __future__ import annotations

import random
from typing import List

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

STREAMS = ("main", "train", "val", "unlabeled")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stream_seeds(seed: int, stream: str, rank: int, epoch: int, n: int) -> List[int]:
    """``n`` seeds (one per worker) of one stream, independent of the other streams, ranks and resume epochs."""
    sequence = np.random.SeedSequence([seed, STREAMS.index(stream), rank, epoch])
    return [int(s) for s in sequence.generate_state(max(n, 1))]


def reseed_loader(loader, seeds: List[int]) -> None:
    """Restarts a multi-process augmenter's workers with ``seeds`` (nnU-Net starts them unseeded). An in-process
    loader (``SingleThreadedAugmenter``, ``nnUNet_n_proc_DA=0``) draws from the seeded global generators."""
    if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        loader.seeds = list(seeds[:loader.num_processes])
        loader.restart()
