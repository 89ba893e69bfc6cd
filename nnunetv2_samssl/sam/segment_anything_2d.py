"""2D Segment-Anything behind :class:`~nnunetv2_samssl.sam.interface.PromptableModel`.

:class:`SegmentAnything2DPromptable` drives any network built from segment-anything's three modules
(image encoder, prompt encoder, mask decoder): the ViT-B/L/H checkpoints of the PyPI package
``segment-anything==1.0`` (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``),
and, through the subclass in :mod:`nnunetv2_samssl.sam.lite_medsam`, LiteMedSAM.

Coordinate convention: prompts arrive in this package's convention, ``(row, col)`` points and
``(r0, c0, r1, c1)`` boxes in the model-input grid (what ``torch.argwhere`` returns on an ``(H, W)``
array). segment-anything wants ``(x, y) = (col, row)``; the swap happens here, in
:func:`points_to_xy` / :func:`boxes_to_xy`, and nowhere else. Both conventions index pixels by their
integer position (segment-anything adds the half-pixel shift itself).

Weights are never downloaded: the user points the setting ``sam_checkpoint`` at a file. Loading is
strict (every key and shape must match); there is no fallback to random weights unless
``random_init=True`` is asked for explicitly (tests, benchmarks).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nnunetv2_samssl.errors import UserError
from nnunetv2_samssl.sam.interface import InputSpace, PromptableModel
from nnunetv2_samssl.sam.strict_loading import CHECKPOINT_SETTING, family_hint, state_dict_problems, torch_load


# ImageNet statistics in [0, 255] the segment-anything encoders were trained with (RGB order).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Width and depth of the released ViT image encoders, used to say which type a checkpoint is.
SAM_VIT_TYPES: Dict[str, Tuple[int, int]] = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}

_SEGMENT_ANYTHING_INSTALL = 'pip install "nnunetv2-samssl[segment-anything]"'


class CheckpointMismatchError(ValueError, UserError):
    """The checkpoint's keys or shapes do not match the architecture it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Coordinate conversion and normalisation helpers (shared with the LiteMedSAM backend)
# ----------------------------------------------------------------------------------------------
def points_to_xy(points: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` points as ``(row, col)`` -> ``(..., 2)`` as segment-anything's ``(x, y) = (col, row)``."""
    return points.flip(-1)


def boxes_to_xy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` boxes as ``(r0, c0, r1, c1)`` -> segment-anything's ``(x0, y0, x1, y1) = (c0, r0, c1, r1)``."""
    return boxes[..., [1, 0, 3, 2]]


def min_max_first_channel(images: torch.Tensor, channel: Union[int, Sequence[int]] = 0,
                          eps: float = 1e-8) -> torch.Tensor:
    """Per-image min-max scaling to ``[0, 1]`` of one channel, or of three channels jointly (an RGB image).

    Args:
        images: ``(B, C, H, W)`` float tensor (nnU-Net-normalised intensities, any range).
        channel: which input channel holds the image the SAM sees (the first modality by default), or the three
            channels fed as R, G, B (scaled with one minimum and maximum, so colours keep their balance).
        eps: lower bound of the intensity range, so a constant image maps to zeros, not NaN.
    Returns:
        ``(B, 1, H, W)`` (one channel) or ``(B, 3, H, W)`` float32 tensor in ``[0, 1]``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    channels = [channel] if isinstance(channel, int) else list(channel)
    if not all(0 <= c < images.shape[1] for c in channels):
        raise ValueError(f"image_channel={channel} but the patch has {images.shape[1]} channel(s)")
    image = images[:, channels].float()
    low = image.amin(dim=(-3, -2, -1), keepdim=True)
    high = image.amax(dim=(-3, -2, -1), keepdim=True)
    return (image - low) / (high - low).clamp_min(eps)


# ----------------------------------------------------------------------------------------------
# Checkpoint reading and strict loading (shared with the LiteMedSAM backend)
# ----------------------------------------------------------------------------------------------
def read_state_dict(path: Union[str, Path], setting: str = CHECKPOINT_SETTING) -> Dict[str, torch.Tensor]:
    """Read a weights file with ``torch.load(weights_only=True)`` (no pickle code is executed).

    A plain state dict is returned as is; a training checkpoint that wraps it under ``"model"``,
    ``"state_dict"`` or ``"model_state_dict"`` is unwrapped.

    Raises:
        FileNotFoundError: the file does not exist (the message names ``setting``).
        ValueError: the file needs pickle to load, or holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: '{path}'. Set '{setting}' to the path of an existing "
                                f"weights file.")
    try:
        checkpoint = torch_load(path, weights_only=True, setting=setting)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"'{path}' (setting '{setting}') stores Python objects that only a full pickle load can read; it is not "
            f"loaded that way here. Extract its weights into a plain state dict, e.g. "
            f"torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth') on a file you trust, and point "
            f"'{setting}' at the result. ({error})") from error
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"'{path}' (setting '{setting}') does not hold a state dict of tensors "
                         f"(got {type(checkpoint).__name__}).")
    return dict(checkpoint)


def load_state_dict_strictly(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                             setting: str = CHECKPOINT_SETTING, hint: str = "") -> None:
    """Load ``state_dict`` into ``module`` only if every key and every shape matches.

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and shape mismatches; the message
            names ``setting`` and ends with ``hint`` (e.g. which model type the checkpoint looks like).
    """
    problems = state_dict_problems(state_dict, {k: tuple(v.shape) for k, v in module.state_dict().items()})
    if problems:
        raise CheckpointMismatchError(
            f"The SAM checkpoint '{source}' (setting '{setting}') does not match the {type(module).__name__} "
            f"architecture: " + "; ".join(problems) + ". Nothing was loaded." + (f" {hint}" if hint else ""))
    module.load_state_dict(state_dict, strict=True)


def guess_sam_vit_type(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which released segment-anything ViT (``'vit_b'``, ``'vit_l'``, ``'vit_h'``) a state dict belongs to,
    judged from the patch-embedding width and the number of encoder blocks; ``None`` if none fits."""
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, (width, blocks) in SAM_VIT_TYPES.items():
        if patch.shape[0] == width and depth == blocks:
            return name
    return None


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------
class SegmentAnything2DPromptable(PromptableModel):
    """A 2D segment-anything network as a :class:`PromptableModel`.

    The three modules follow segment-anything 1.0's layout (``ImageEncoderViT`` or any encoder with the
    same output, ``PromptEncoder``, ``MaskDecoder``); the input space is read off the prompt encoder:
    ``size = prompt_encoder.input_image_size`` (1024 x 1024 for ViT-B/L/H), ``low_res_size =
    prompt_encoder.mask_input_size`` (256 x 256), 3 input channels, no target spacing.

    Decoding is batched over queries: query ``q`` decodes ``embeddings[q]`` with the ``q``-th prompt set,
    which is what ``encode`` once, index, ``decode`` many times needs (segment-anything's own decoder
    instead pairs ONE image with all prompts).

    Args:
        image_encoder, prompt_encoder, mask_decoder: the segment-anything modules (weights loaded).
        pixel_mean, pixel_std: per-channel statistics in ``[0, 255]`` applied by :meth:`normalize`.
        image_channel: which channel of the nnU-Net patch is shown to the model (replicated to RGB).
        multimask_output: ``False`` returns the decoder's single-mask output (token 0, what box prompts
            and several points want); ``True`` decodes the three ambiguity-aware masks and returns, per
            query, the one with the highest predicted IoU (better for a single click).
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module, *,
                 pixel_mean: Sequence[float] = SAM_PIXEL_MEAN, pixel_std: Sequence[float] = SAM_PIXEL_STD,
                 image_channel: Union[int, Sequence[int]] = 0, multimask_output: bool = False) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.image_channel = int(image_channel) if isinstance(image_channel, int) else tuple(map(int, image_channel))
        self.multimask_output = bool(multimask_output)
        self.input_space = InputSpace(
            ndim=2,
            size=tuple(int(s) for s in prompt_encoder.input_image_size),
            spacing_mm=None,
            in_channels=3,
            low_res_size=tuple(int(s) for s in prompt_encoder.mask_input_size),
            prompt_kinds=frozenset({"points", "boxes", "masks"}),
        )
        self.embedding_size = tuple(int(s) for s in prompt_encoder.image_embedding_size)
        self.embedding_dim = int(prompt_encoder.embed_dim)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Optional[Union[str, Path]], model_type: str = "vit_b",
                        device: Union[str, torch.device] = "cpu", *, random_init: bool = False,
                        **kwargs) -> "SegmentAnything2DPromptable":
        """Build a segment-anything ViT and load the user's weights strictly.

        The architecture comes from ``segment_anything.sam_model_registry[model_type]`` built without
        weights; the file is then read with ``torch.load(weights_only=True)`` and must match key for key
        and shape for shape. The released files (``sam_vit_b_01ec64.pth`` etc.) are plain state dicts.

        Args:
            path: the weights file (setting ``sam_checkpoint``). ``None`` is an error: segment-anything
                ships no weights and nothing is downloaded.
            model_type: ``'vit_b'``, ``'vit_l'`` or ``'vit_h'``; must match the file.
            device: where the model goes.
            random_init: build with random weights and ignore ``path`` (tests and benchmarks only).
            **kwargs: ``image_channel``, ``multimask_output`` (see the class).
        Returns:
            the model in eval mode with ``requires_grad=False`` on every parameter.
        Raises:
            ImportError: ``segment-anything`` is not installed.
            ValueError / FileNotFoundError / CheckpointMismatchError: a missing or wrong checkpoint; a
                wrong ``model_type`` says which type the file's keys and shapes suggest.
        """
        if model_type not in SAM_VIT_TYPES:
            raise ValueError(f"model_type must be one of {sorted(SAM_VIT_TYPES)}, got {model_type!r}")
        if path is None and not random_init:
            raise ValueError(f"No SAM checkpoint given for segment-anything {model_type}: set '{CHECKPOINT_SETTING}' "
                             f"to the path of the weights file (e.g. sam_vit_b_01ec64.pth); weights are never "
                             f"downloaded and random weights are not used in their place.")
        try:
            from segment_anything import sam_model_registry
        except ImportError as error:
            raise ImportError(f"The 2D segment-anything backend needs the optional dependency 'segment-anything': "
                              f"{_SEGMENT_ANYTHING_INSTALL}") from error
        state_dict = None if random_init else read_state_dict(path)
        if state_dict is not None:
            guessed = guess_sam_vit_type(state_dict)
            if guessed is not None and guessed != model_type:
                # said before building: a wrong ViT-H would cost seconds and gigabytes for nothing
                raise CheckpointMismatchError(
                    f"The SAM checkpoint '{path}' (setting '{CHECKPOINT_SETTING}') holds a segment-anything {guessed} "
                    f"(image encoder width {SAM_VIT_TYPES[guessed][0]}, {SAM_VIT_TYPES[guessed][1]} blocks), not "
                    f"{model_type}: use model_type='{guessed}' (backend 'sam2d_{guessed}').")
        sam = sam_model_registry[model_type](checkpoint=None)
        if state_dict is not None:
            hint = "" if guessed is not None else ("Its keys and shapes match none of vit_b / vit_l / vit_h. "
                                                   + family_hint(state_dict, "sam2d")).strip()
            load_state_dict_strictly(sam, state_dict, source=str(path), hint=hint)
        model = cls(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder,
                    pixel_mean=sam.pixel_mean.flatten().tolist(), pixel_std=sam.pixel_std.flatten().tolist(),
                    **kwargs)
        return model.frozen().to(device)

    def frozen(self) -> "SegmentAnything2DPromptable":
        """Eval mode and no gradients for every parameter (a trainer may unfreeze parts it fine-tunes)."""
        self.eval()
        self.requires_grad_(False)
        return self

    # -- PromptableModel ------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """nnU-Net patch -> segment-anything input.

        ``images[:, image_channel]`` is min-max scaled per image to ``[0, 255]``, replicated to three
        channels (or three channels fed as R, G, B), and standardised with the model's pixel mean/std.

        Args:
            images: ``(B, C, H, W)``, ``(H, W) = input_space.size``, nnU-Net-normalised intensities.
        Returns:
            ``(B, 3, H, W)`` float32.
        """
        self._check_spatial(images, "images")
        unit = min_max_first_channel(images, self.image_channel)
        return (unit * 255.0 - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` from :meth:`normalize` -> embeddings ``(B, 256, H/16, W/16)``
        (``(B, 256, 64, 64)`` for both the 1024 ViTs and LiteMedSAM's 256 TinyViT)."""
        self._check_spatial(images, "images")
        if images.shape[1] != self.input_space.in_channels:
            raise ValueError(f"encode expects {self.input_space.in_channels} channels (the output of normalize), "
                             f"got {images.shape[1]}")
        return self.image_encoder(images)

    def decode(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_logits: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per query (all prompts optional; none at all = unprompted decoding).

        Args:
            embeddings: ``(Q, 256, 64, 64)``, row ``q`` the image of query ``q``.
            points: ``(Q, N, 2)`` as ``(row, col)`` pixel coordinates in the model-input grid.
            point_labels: ``(Q, N)``: 1 positive, 0 negative, -1 padding.
            boxes: ``(Q, 4)`` as ``(r0, c0, r1, c1)`` (inclusive pixel corners, model-input grid).
            mask_logits: ``(Q, 1, *low_res_size)`` logits of a previous decode (dense prompt).
        Returns:
            ``low_res_logits`` ``(Q, 1, *low_res_size)`` float32 and ``iou_pred`` ``(Q, 1)`` float32.
        """
        queries = self._check_prompts(embeddings, points, point_labels, boxes, mask_logits)
        sparse, dense, image_pe = self._embed_prompts(queries, points, point_labels, boxes, mask_logits)
        masks, iou_pred = self._predict_masks(embeddings, image_pe, sparse, dense)
        if self.multimask_output:
            best = iou_pred[:, 1:].argmax(dim=1, keepdim=True) + 1
            masks = torch.take_along_dim(masks, best[:, :, None, None], dim=1)
            iou_pred = torch.take_along_dim(iou_pred, best, dim=1)
        else:
            masks, iou_pred = masks[:, :1], iou_pred[:, :1]
        return masks.float(), iou_pred.float()

    # -- internals ------------------------------------------------------------------------------
    def _embed_prompts(self, queries: int, points, point_labels, boxes, mask_logits):
        """Prompt embeddings in float32 with autocast off: the Fourier features of the coordinates lose
        pixel precision in bf16, and this step costs nothing next to the decoder."""
        device = self.pixel_mean.device
        with torch.autocast(device_type=device.type, enabled=False):
            point_prompt = None
            if points is not None:
                point_prompt = (points_to_xy(points.float()), point_labels.to(device=points.device, dtype=torch.int64))
            box_prompt = boxes_to_xy(boxes.float()) if boxes is not None else None
            mask_prompt = mask_logits.float() if mask_logits is not None else None
            sparse, dense = self.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=mask_prompt)
            if sparse.shape[0] != queries:  # unprompted: the prompt encoder returns one row
                sparse = sparse.expand(queries, -1, -1)
                dense = dense.expand(queries, -1, -1, -1)
            image_pe = self.prompt_encoder.get_dense_pe()
        return sparse, dense, image_pe

    def _predict_masks(self, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                       dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder's forward pass with one image embedding per query.

        Returns all ``num_mask_tokens`` masks ``(Q, T, *low_res_size)`` and IoU predictions ``(Q, T)``.
        """
        decoder = self.mask_decoder
        queries = embeddings.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(queries, -1, -1).to(sparse.dtype), sparse], dim=1)
        src = embeddings + dense.to(embeddings.dtype)
        pos = image_pe.to(embeddings.dtype).expand(queries, -1, -1, -1)
        hidden_tokens, src_tokens = decoder.transformer(src, pos, tokens)
        channels, height, width = src.shape[1:]
        upscaled = decoder.output_upscaling(src_tokens.transpose(1, 2).reshape(queries, channels, height, width))
        mask_token_out = hidden_tokens[:, 1:1 + decoder.num_mask_tokens]
        hyper = torch.stack([mlp(mask_token_out[:, t]) for t, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                            dim=1)  # (Q, T, C'), one small MLP per mask token
        masks = torch.einsum("qtc,qchw->qthw", hyper, upscaled.to(hyper.dtype))
        iou_pred = decoder.iou_prediction_head(hidden_tokens[:, 0])
        return masks, iou_pred

    def _check_spatial(self, images: torch.Tensor, name: str) -> None:
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.input_space.size:
            raise ValueError(f"{name} must have shape (B, C, {self.input_space.size[0]}, {self.input_space.size[1]}) "
                             f"(resize/crop to input_space.size first), got {tuple(images.shape)}")

    def _check_prompts(self, embeddings, points, point_labels, boxes, mask_logits) -> int:
        expected_grid = (self.embedding_dim, *self.embedding_size)
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != expected_grid:
            raise ValueError(f"embeddings must have shape (Q, {', '.join(map(str, expected_grid))}), "
                             f"got {tuple(embeddings.shape)}")
        queries = embeddings.shape[0]
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        if points is not None:
            if points.ndim != 3 or points.shape[0] != queries or points.shape[2] != 2:
                raise ValueError(f"points must have shape (Q={queries}, N, 2) as (row, col), got {tuple(points.shape)}")
            if tuple(point_labels.shape) != tuple(points.shape[:2]):
                raise ValueError(f"point_labels must have shape {tuple(points.shape[:2])}, got "
                                 f"{tuple(point_labels.shape)}")
        if boxes is not None and tuple(boxes.shape) != (queries, 4):
            raise ValueError(f"boxes must have shape (Q={queries}, 4) as (r0, c0, r1, c1), got {tuple(boxes.shape)}")
        if mask_logits is not None and tuple(mask_logits.shape) != (queries, 1, *self.input_space.low_res_size):
            raise ValueError(f"mask_logits must have shape (Q={queries}, 1, "
                             f"{', '.join(map(str, self.input_space.low_res_size))}), got {tuple(mask_logits.shape)}")
        return queries
