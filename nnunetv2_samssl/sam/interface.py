"""The one small interface every promptable model (SAM-Med3D, 2D SAM, LiteMedSAM) implements.

A trainer never talks to a concrete SAM: it asks the model which input space it expects
(:class:`InputSpace`), maps its patches into that space (``nnunetv2_samssl.sam.space``), encodes the
image batch once and decodes as many prompt sets as it likes against the cached embeddings.

Coordinate convention (everywhere in this package): points and boxes are given in the model-input
grid, in the tensor's own axis order: ``(row, col)`` for 2D, ``(d, h, w)`` for 3D, i.e. exactly what
``torch.argwhere`` returns on a ``(H, W)`` or ``(D, H, W)`` array. Backends whose native convention
differs (segment-anything uses ``(x, y) = (col, row)``) convert internally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpace:
    """What a promptable model expects its image to look like.

    Attributes:
        ndim: 2 or 3 spatial dimensions.
        size: spatial size of the model input, e.g. ``(128, 128, 128)`` or ``(256, 256)``.
        spacing_mm: target voxel spacing in mm (per axis, tensor order) the model was trained at, or
            ``None`` when the model wants the region of interest resized to ``size`` whatever its spacing
            (2D SAMs).
        in_channels: channels of the (already normalised) tensor given to :meth:`PromptableModel.encode`.
        low_res_size: spatial size of the low-resolution logits the decoder returns and accepts as a
            mask prompt (``(32, 32, 32)`` for SAM-Med3D, ``(256, 256)`` for 2D SAM).
        prompt_kinds: which prompts ``decode`` accepts, a subset of ``{"points", "boxes", "masks"}``.
        first_pass_mask_prompt: the model was trained with a mask prompt on every decode, zeros on the first
            (SAM-Med3D: its training loop, its inference code and SemiSAM's code all pass the previous low-res
            mask, zeros at the first click), so its learned "no mask" embedding is untrained: the first decode of
            a click loop gets a zero ``(Q, 1, *low_res_size)`` mask prompt instead of none. 2D SAMs trained
            without masks on the first pass keep theirs.
        trained_prompt: the sparse prompt kind the model was trained with, which ``prompt_kind: auto`` chooses
            (LiteMedSAM: ``"boxes"``); ``None``: points when the model accepts them, else boxes.
    """

    ndim: int
    size: Tuple[int, ...]
    spacing_mm: Optional[Tuple[float, ...]]
    in_channels: int
    low_res_size: Tuple[int, ...]
    prompt_kinds: frozenset
    first_pass_mask_prompt: bool = False
    trained_prompt: Optional[str] = None


class PromptableModel(nn.Module):
    """Base class of the promptable backends. Frozen, inference-only unless a trainer fine-tunes it.

    Subclasses implement :meth:`normalize`, :meth:`encode` and :meth:`decode` and set ``input_space``.
    """

    input_space: InputSpace

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Intensity normalisation the model was trained with.

        Args:
            images: ``(B, C, *size)`` float tensor already resampled/cropped to ``input_space.size``,
                in the nnU-Net-normalised intensity space; ``C`` is whatever the nnU-Net patch had
                (the backend decides how to reduce/replicate channels).
        Returns:
            ``(B, input_space.in_channels, *size)`` tensor ready for :meth:`encode`.
        """
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Run the image encoder once. ``images``: output of :meth:`normalize`. Returns embeddings
        ``(B, E, *grid)`` to be passed (indexed per query) to :meth:`decode`."""
        raise NotImplementedError

    def decode(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_logits: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per query.

        Args:
            embeddings: ``(Q, E, *grid)``, one row per query (index the encoder output to repeat an image).
            points: ``(Q, N, ndim)`` float coordinates in the model-input grid (tensor axis order).
            point_labels: ``(Q, N)`` int, 1 positive, 0 negative, -1 padding (ignored point).
            boxes: ``(Q, 2 * ndim)`` as ``(min corner..., max corner...)`` in tensor axis order.
            mask_logits: ``(Q, 1, *low_res_size)`` logits of a previous decode, used as dense prompt.
        Returns:
            ``(low_res_logits (Q, 1, *low_res_size), iou_pred (Q, 1))``.
        """
        raise NotImplementedError

    def upscale(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``(Q, 1, *low_res_size)`` -> logits at ``input_space.size`` (bilinear/trilinear)."""
        mode = "bilinear" if self.input_space.ndim == 2 else "trilinear"
        return nn.functional.interpolate(low_res_logits.float(), size=self.input_space.size, mode=mode,
                                         align_corners=False)
