"""The student's view of an unlabeled patch: the teacher's own (weak) view, or a strong photometric perturbation.

FixMatch-style training gives the teacher a weakly augmented patch and the student a strongly augmented version
of the *same* patch. Here the weak view is what the unlabeled loader delivers (nnU-Net's augmentation, spatial
transforms included); the strong view changes intensities only, so every voxel stays where it is and the
teacher's targets stay aligned with the student's outputs without tracking any transform.

The perturbations imitate how another scanner or site changes an image after nnU-Net's per-case normalisation:
a non-linear intensity curve (gamma), a smooth multiplicative bias field, blur and noise. Each channel of each
sample draws its own parameters; the result is shifted and scaled back to the patch's own mean and standard
deviation per channel, as nnU-Net's z-scoring would after such a change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _uniform(shape: Sequence[int], low: float, high: float, device, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(shape), device=device, generator=generator)


def _applied(shape: Sequence[int], p: float, device, generator) -> torch.Tensor:
    return torch.rand(tuple(shape), device=device, generator=generator) < p


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(B, C, *spatial)`` with one ``sigma`` (voxels) per sample and channel
    ``(B, C)``; sigma 0 leaves that channel unchanged. Borders replicate the edge voxels."""
    b, c, *spatial = x.shape
    radius = int(math.ceil(3 * float(sigma.max()))) if sigma.numel() else 0
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.reshape(-1, 1).float()
    kernel = torch.exp(-0.5 * (offsets / s.clamp_min(1e-6)) ** 2)
    kernel = torch.where(s > 0, kernel, (offsets == 0).float().expand_as(kernel))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B*C, k)
    out = x.reshape(1, b * c, *spatial).float()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    for axis in range(len(spatial)):
        shape = [b * c, 1] + [1] * len(spatial)
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0] * len(spatial)
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.reshape(shape), groups=b * c)
    return out.reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class StrongPhotometricView:
    """A random strong photometric perturbation of a batch ``(B, C, *spatial)``; ``strength`` scales every range
    (0: the patch unchanged).

    At strength 1: gamma in [1/2.5, 2.5] (log-uniform) with probability 0.8, a bias field of amplitude up to
    0.5 (``exp`` of a smooth field on a 3-point grid per axis) with probability 0.5, a Gaussian blur of sigma up to
    1.5 voxels with probability 0.5, Gaussian noise up to 0.1 x the patch's standard deviation with probability
    0.5."""

    strength: float = 1.0
    max_gamma: float = 2.5
    p_gamma: float = 0.8
    max_bias: float = 0.5
    p_bias: float = 0.5
    bias_grid: int = 3
    max_blur_sigma: float = 1.5
    p_blur: float = 0.5
    max_noise: float = 0.1
    p_noise: float = 0.5

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.strength == 0:
            return x
        b, c, *spatial = x.shape
        dims = tuple(range(2, x.dim()))
        dev, s = x.device, self.strength
        y = x.float()
        mean, std = y.mean(dims, keepdim=True), y.std(dims, keepdim=True)
        stat_shape = (b, c) + (1,) * len(spatial)

        # non-linear intensity curve on the patch's range
        low, high = y.amin(dims, keepdim=True), y.amax(dims, keepdim=True)
        span = (high - low).clamp_min(1e-6)
        log_gamma = _uniform(stat_shape, -s * math.log(self.max_gamma), s * math.log(self.max_gamma), dev, generator)
        gamma = torch.where(_applied(stat_shape, self.p_gamma, dev, generator), log_gamma.exp(),
                            torch.ones_like(log_gamma))
        y = ((y - low) / span).clamp(0, 1) ** gamma

        # smooth multiplicative bias field (on the [0, 1] intensities, so it stays positive)
        amplitude = _uniform(stat_shape, 0, s * self.max_bias, dev, generator) \
            * _applied(stat_shape, self.p_bias, dev, generator)
        coarse = torch.randn((b, c) + (self.bias_grid,) * len(spatial), device=dev, generator=generator)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
        field = F.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=True)
        y = y * torch.exp(amplitude * field)

        # blur, then noise relative to the perturbed patch's spread
        sigma = _uniform((b, c), 0, s * self.max_blur_sigma, dev, generator) \
            * _applied((b, c), self.p_blur, dev, generator)
        y = gaussian_blur(y, sigma)
        noise = _uniform(stat_shape, 0, s * self.max_noise, dev, generator) \
            * _applied(stat_shape, self.p_noise, dev, generator)
        y = y + noise * y.std(dims, keepdim=True) * torch.randn(y.shape, device=dev, generator=generator)

        # back to the patch's own mean and standard deviation (nnU-Net z-scores every case)
        y = (y - y.mean(dims, keepdim=True)) / y.std(dims, keepdim=True).clamp_min(1e-6) * std + mean
        return y.to(x.dtype)


def student_view(name: str, strength: float) -> Optional[StrongPhotometricView]:
    """The ``student_view`` setting: ``None`` for ``weak`` (the student sees the teacher's patch), else the
    strong perturbation."""
    if name == "weak":
        return None
    if name == "strong":
        return StrongPhotometricView(strength=strength)
    raise ValueError(f"student_view must be 'weak' or 'strong', got {name!r}")
