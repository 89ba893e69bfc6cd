"""Image embeddings of whole unlabeled cases kept between SAM pseudo-label refreshes.

The promptable model is frozen and the unlabeled images never change, so with prediction-independent windows
(``sam_cache_windows: whole``) the image embedding of a window is the same at every refresh: only the prompts
change. The encoder dominates a refresh (LiteMedSAM: about 1.6 s per 256 x 256 slice on 2 CPU cores, the decoder
about 0.1 s per query), so a refresh that finds its embeddings here costs the sliding-window prediction plus the
decoder.

Entries are keyed by case, sample (the slice of a 2D configuration), slice and window geometry, and hold exactly
what the encoder returned (same dtype, in host memory), so a hit decodes bit-for-bit what a miss would. Entries
are added until ``budget_mib`` is reached; the windows that do not fit are encoded at every refresh.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["EmbeddingCache", "window_keys"]


def window_keys(case: str, sample_index: Tensor, slice_index: Optional[Tensor], offset: Tensor,
                scale: Tensor) -> List[Tuple]:
    """One hashable key per window: case, sample, slice and the window geometry (offset and scale, rounded to
    1e-4 voxel so that float noise in the same computation cannot split a key)."""
    rows = torch.cat([offset, scale], 1).detach().double().mul(1e4).round().long().cpu().tolist()
    samples = sample_index.cpu().tolist()
    slices = [-1] * len(samples) if slice_index is None else slice_index.cpu().tolist()
    return [(case, s, z, tuple(g)) for s, z, g in zip(samples, slices, rows)]


class EmbeddingCache:
    """Host-memory store of encoder outputs, at most ``budget_mib`` MiB.

    Args:
        budget_mib: memory cap; 0 keeps nothing (every refresh encodes every window).
    """

    def __init__(self, budget_mib: float):
        if budget_mib < 0:
            raise ValueError(f"budget_mib must be >= 0, got {budget_mib}")
        self.budget_bytes = int(budget_mib * 2 ** 20)
        self._store: Dict[Hashable, Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.refused = 0  # misses that did not fit the budget

    def __len__(self) -> int:
        return len(self._store)

    def reset_counts(self) -> None:
        self.hits = self.misses = self.refused = 0

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def embeddings(self, keys: Sequence[Hashable], images: Callable[[Tensor], Tensor],
                   encode: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
        """Embeddings ``(N, E, *grid)`` on ``device`` of the windows ``keys``.

        Args:
            keys: one key per window (:func:`window_keys`).
            images: ``index (M,) -> (M, C, *size)`` model inputs of the windows at ``index`` (positions in
                ``keys``), called once, for the misses only.
            encode: the encoder, ``(M, C, *size) -> (M, E, *grid)``.
            device: where the result goes.
        """
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = None
        if missing:
            index = torch.tensor(missing, dtype=torch.long)
            fresh = encode(images(index))
            for row, i in enumerate(missing):
                value = fresh[row]
                size = value.numel() * value.element_size()
                if self.bytes + size > self.budget_bytes:
                    self.refused += 1
                    continue
                self._store[keys[i]] = value.detach().to("cpu", copy=True)
                self.bytes += size
        if fresh is not None and len(missing) == len(keys):
            return fresh
        position = {i: row for row, i in enumerate(missing)}
        rows = [fresh[position[i]] if i in position else self._store[key].to(device, non_blocking=True)
                for i, key in enumerate(keys)]
        return torch.stack(rows, 0)
