"""SAM-Med3D behind the :class:`~nnunetv2_samssl.sam.interface.PromptableModel` interface.

Input space: one channel, ``(128, 128, 128)`` at 1.5 mm isotropic spacing for ``vit_b_ori``; points
``(Q, N, 3)`` in voxels of that grid, tensor axis order ``(d, h, w)`` (what ``torch.argwhere`` gives),
no axis swap; low-res logits and mask prompts ``(Q, 1, 32, 32, 32)``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..interface import InputSpace, PromptableModel
from .build import SAMMed3DConfig, build_sam_med3d, get_config
from .checkpoint import load_sam_med3d, load_sam_med3d_state_dict, matching_config
from .model import SAMMed3D

SAM_MED3D_SPACING_MM = (1.5, 1.5, 1.5)


class SAMMed3DPromptable(PromptableModel):
    """SAM-Med3D as a promptable model: normalise, encode once, decode many prompt sets.

    Intensity normalisation. SAM-Med3D was trained on crops z-normalised with the mean and standard
    deviation of the voxels above 0 in raw intensities (CT clamped to [-1000, 1000] HU): for MR that is
    the non-zero (body) region, for CT the tissue above water. nnU-Net hands over patches in its own
    normalised space, where 0 has no fixed meaning, so the default rule here takes the statistics over
    the voxels above the sample's minimum: it leaves out the constant background and padding (MR air,
    CT air clipped at nnU-Net's lower percentile, padded borders, which all sit at the minimum) and
    matches the raw rule for MR. For CT the raw rule can be reproduced exactly: z-normalisation does
    not change under a positive affine intensity map, so with nnU-Net's CT normalisation
    ``(HU - mean) / std`` pass ``foreground_threshold = -mean / std`` (the normalised value of 0 HU);
    for raw intensities pass ``foreground_threshold = 0``. One channel is used (``image_channel``, 0 by default).

    Prompts: points with labels 1 (positive), 0 (negative) and -1 (padding), and low-res mask logits.
    Padding points are ignored exactly (masked out of attention), so prompt sets with different numbers
    of points can be batched; boxes are not supported by the released model.
    """

    def __init__(self, model: SAMMed3D, config: Union[str, SAMMed3DConfig] = "vit_b_ori",
                 foreground_threshold: Optional[float] = None, frozen: bool = True, image_channel: int = 0) -> None:
        """
        Args:
            model: the network (e.g. from :func:`~.checkpoint.load_sam_med3d`).
            config: its configuration (name or :class:`SAMMed3DConfig`), which fixes the input space.
            foreground_threshold: voxels above this value (input units) define the normalisation
                statistics; ``None`` uses the voxels above each sample's minimum (see class docstring).
            frozen: put the model in eval mode and disable its gradients.
        """
        super().__init__()
        cfg = get_config(config)
        self.config = cfg
        self.model = model
        self.foreground_threshold = foreground_threshold
        if not isinstance(image_channel, int):
            raise ValueError(f"SAM-Med3D sees one channel; image_channel must be an index, got {image_channel!r}")
        self.image_channel = image_channel  # which channel of the nnU-Net patch the model sees
        self.input_space = InputSpace(
            ndim=3, size=(cfg.img_size,) * 3, spacing_mm=SAM_MED3D_SPACING_MM, in_channels=cfg.in_chans,
            low_res_size=(cfg.low_res_size,) * 3, prompt_kinds=frozenset({"points", "masks"}),
            first_pass_mask_prompt=True)
        if frozen:
            self.model.eval()
            self.model.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path, config: Union[str, SAMMed3DConfig] = "vit_b_ori",
                        device: Union[str, torch.device] = "cpu", allow_pickle: bool = False, *,
                        random_init: bool = False, foreground_threshold: Optional[float] = None,
                        frozen: bool = True, image_channel: int = 0) -> "SAMMed3DPromptable":
        """Build ``config`` and load its weights strictly.

        Args:
            path: the weights file (setting ``sam_checkpoint``): a tensors-only file from
                ``nnUNetv2_samssl_convert_sam_med3d``, a ``.safetensors`` file, or (with ``allow_pickle``)
                an official ``sam_med3d*.pth``. Nothing is downloaded.
            config: architecture name (``vit_b_ori`` for the released checkpoints; ``auto``: the named
                configuration the weights fit).
            device: where the model goes.
            allow_pickle: setting ``sam_checkpoint_allow_pickle``: read pickled files, which executes code
                stored in them (see :mod:`.checkpoint`).
            random_init: build with random weights and ignore ``path`` (tests and benchmarks only).
            foreground_threshold, frozen: see the class.
        Returns:
            the wrapped model, float32, in eval mode (``requires_grad=False`` everywhere if ``frozen``).
        Raises:
            FileNotFoundError / SAMCheckpointError: a missing, unset, pickled (without ``allow_pickle``)
                or mismatching checkpoint; the message names the setting and lists the offending keys.
        """
        if random_init:
            model = build_sam_med3d(config).to(device)
        else:
            if config == "auto":
                config = matching_config(load_sam_med3d_state_dict(path, allow_pickle=allow_pickle))
            model = load_sam_med3d(path, config=config, allow_pickle=allow_pickle, device=device)
        return cls(model, config, foreground_threshold=foreground_threshold, frozen=frozen,
                   image_channel=image_channel)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S, S)`` -> ``(B, 1, S, S, S)`` float32 z-normalised over each sample's foreground.

        ``(x - mean_fg) / std_fg`` (unbiased std, at least 1e-6) applied to every voxel of channel 0;
        a sample with fewer than two foreground voxels uses all its voxels.
        """
        if images.ndim != 5 or images.shape[1] < 1:
            raise ValueError(f"normalize expects (B, C, D, H, W) images, got {tuple(images.shape)}")
        if not 0 <= self.image_channel < images.shape[1]:
            raise ValueError(f"image_channel={self.image_channel} but the patch has {images.shape[1]} channel(s)")
        x = images[:, self.image_channel:self.image_channel + 1].float()
        dims = (2, 3, 4)
        if self.foreground_threshold is None:
            fg = x > x.amin(dim=dims, keepdim=True)
        else:
            fg = x > self.foreground_threshold
        fg = fg | (fg.sum(dim=dims, keepdim=True) < 2)
        count = fg.sum(dim=dims, keepdim=True).float()
        mean = torch.where(fg, x, 0.0).sum(dim=dims, keepdim=True) / count
        var = torch.where(fg, (x - mean) ** 2, 0.0).sum(dim=dims, keepdim=True) / (count - 1).clamp_min(1.0)
        return (x - mean) / var.sqrt().clamp_min(1e-6)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S, S)`` normalised crops -> embeddings ``(B, 384, 8, 8, 8)`` for ``vit_b_ori``."""
        expected = (self.input_space.in_channels,) + self.input_space.size
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"encode expects (B, {', '.join(map(str, expected))}) normalised crops "
                             f"(see input_space), got {tuple(images.shape)}")
        return self.model.encode_image(images)

    def decode(self, embeddings: torch.Tensor, points: Optional[torch.Tensor] = None,
               point_labels: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
               mask_logits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per query, batched (see :meth:`PromptableModel.decode`).

        Args:
            embeddings: ``(Q, E, G, G, G)`` (or ``(1, ...)``, shared by all queries).
            points: ``(Q, N, 3)`` voxel coordinates in the ``S^3`` input grid, tensor axis order.
            point_labels: ``(Q, N)`` int: 1 positive, 0 negative, -1 padding (ignored).
            boxes: must be ``None`` (not in ``prompt_kinds``).
            mask_logits: ``(Q, 1, L, L, L)`` low-res logits of a previous decode.
        Returns:
            ``(low_res_logits (Q, 1, L, L, L), iou_pred (Q, 1))``, ``L = 32`` for ``vit_b_ori``.
        """
        if boxes is not None:
            raise ValueError("SAM-Med3D takes no box prompts (prompt_kinds = points, masks)")
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        q = embeddings.shape[0]
        if q == 1:  # one image shared by all prompt sets
            q = points.shape[0] if points is not None else (mask_logits.shape[0] if mask_logits is not None else 1)
        if points is not None and (points.ndim != 3 or points.shape[0] != q or points.shape[-1] != 3
                                   or tuple(point_labels.shape) != tuple(points.shape[:2])):
            raise ValueError(f"expected points (Q, N, 3) and point_labels (Q, N) with Q = {q}, got "
                             f"{tuple(points.shape)} and {tuple(point_labels.shape)}")
        expected_mask = (q, 1) + self.input_space.low_res_size
        if mask_logits is not None and tuple(mask_logits.shape) != expected_mask:
            raise ValueError(f"expected mask_logits of shape {expected_mask}, got {tuple(mask_logits.shape)}")
        return self.model.decode(embeddings, points, point_labels, mask_logits, multimask_output=False)
