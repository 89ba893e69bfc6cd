"""CutMix of unlabeled patches, with the teacher's targets mixed the same way (``student_mix: cutmix``).

The teacher predicts every unlabeled patch as the loader delivered it; the student sees a mixed patch: a random
box of another patch of the batch pasted into it (French et al. 2020, "Semi-supervised semantic segmentation
needs strong, varied perturbations"; UniMatch). The teacher's outputs (every deep-supervision scale), the maps a
source serves through the loader and the hidden labels of the diagnostics are mixed with the same boxes, so each
target still speaks for the voxel it was predicted for, and the teacher never sees the artificial box edges.

Lower deep-supervision scales take the box through the same nearest-exact sampling as nnU-Net's
``DownsampleSegForDSTransform``: mixing a downsampled label map equals downsampling the mixed map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Outputs = Union[torch.Tensor, List[torch.Tensor]]


def _box_mask(spatial: Sequence[int], batch: int, max_volume: float, device,
              generator: Optional[torch.Generator]) -> torch.Tensor:
    """``(batch, 1, *spatial)`` bool: one axis-aligned box per sample whose volume is a fraction of the patch
    drawn uniformly in ``[max_volume / 4, max_volume]``, the same fraction of every axis (the patch's aspect
    ratio), at a uniformly random position."""
    mask = torch.zeros((batch, 1, *spatial), dtype=torch.bool, device=device)
    fraction = max_volume * (0.25 + 0.75 * torch.rand(batch, generator=generator))
    side_fraction = fraction ** (1.0 / len(spatial))
    for i in range(batch):
        box = [slice(None), slice(None)]
        for size in spatial:
            side = max(1, min(size, int(round(float(side_fraction[i]) * size))))
            start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
            box.append(slice(start, start + side))
        mask[i:i + 1][tuple(box)] = True
    return mask


@dataclass(frozen=True)
class BoxMix:
    """One CutMix draw for a batch: sample ``i`` takes the voxels of ``mask[i]`` from sample ``partner[i]``."""

    partner: torch.Tensor  # (b,) long
    mask: torch.Tensor  # (b, 1, *patch) bool

    @classmethod
    def draw(cls, shape: Sequence[int], max_volume: float, device=None,
             generator: Optional[torch.Generator] = None) -> "BoxMix":
        """A draw for a batch of ``shape`` ``(b, C, *patch)``: each sample's box comes from the next sample
        (cyclically), so with ``b >= 2`` no sample is mixed with itself."""
        b = int(shape[0])
        if b < 2:
            raise ValueError(f"CutMix needs at least 2 unlabeled patches per step, got a batch of {b}")
        partner = (torch.arange(b, device=device) + 1) % b
        return cls(partner, _box_mask(tuple(shape[2:]), b, max_volume, device, generator))

    def mask_at(self, spatial: Sequence[int]) -> torch.Tensor:
        """The boxes at a (deep-supervision) resolution, sampled as nnU-Net downsamples its targets."""
        spatial = tuple(int(s) for s in spatial)
        if spatial == tuple(self.mask.shape[2:]):
            return self.mask
        return F.interpolate(self.mask.float(), size=spatial, mode="nearest-exact") > 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Mixes ``x`` ``(b, C, *spatial)`` (images, logits, label maps) at its own resolution."""
        return torch.where(self.mask_at(x.shape[2:]), x[self.partner], x)

    def outputs(self, outputs: Optional[Outputs]) -> Optional[Outputs]:
        """Mixes a network output or a deep-supervision list scale by scale (``None`` stays ``None``)."""
        if outputs is None or isinstance(outputs, torch.Tensor):
            return None if outputs is None else self(outputs)
        return [self(o) for o in outputs]
