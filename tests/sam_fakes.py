"""A small fake promptable model shared by the SAM-branch and trainer tests (no real SAM anywhere)."""
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_samssl.sam.interface import InputSpace, PromptableModel

SPACE_3D = InputSpace(ndim=3, size=(32, 32, 32), spacing_mm=(1.5, 1.5, 1.5), in_channels=1,
                      low_res_size=(16, 16, 16), prompt_kinds=frozenset({"points", "masks"}))
SPACE_2D = InputSpace(ndim=2, size=(64, 64), spacing_mm=None, in_channels=1, low_res_size=(32, 32),
                      prompt_kinds=frozenset({"points", "boxes", "masks"}))
SPACE_2D_BOXES = InputSpace(ndim=2, size=(64, 64), spacing_mm=None, in_channels=1, low_res_size=(32, 32),
                            prompt_kinds=frozenset({"boxes"}))


class FakeSam(PromptableModel):
    """Segments bright voxels (image > 0.5) near its prompts: within ``radius`` model voxels of a positive
    point and not within ``radius`` of a negative one, inside a box, or where a mask-only prompt is positive.
    Decides at the model input resolution and area-pools to the low-res grid (soft partial-volume logits).
    Records every encode / decode call."""

    def __init__(self, input_space: InputSpace, radius: float = 40.0):
        super().__init__()
        self.input_space = input_space
        self.radius = radius
        self.gain = nn.Parameter(torch.ones(()))
        self.encoded = []
        self.calls = []
        self.outputs = []

    def normalize(self, images):
        return images.mean(1, keepdim=True) * self.gain

    def encode(self, images):
        self.encoded.append(images.shape[0])
        return images  # the "embedding" is the image itself, on the model input grid

    def decode(self, embeddings, points=None, point_labels=None, boxes=None, mask_logits=None):
        self.calls.append(dict(points=None if points is None else points.clone(),
                               labels=None if point_labels is None else point_labels.clone(),
                               boxes=None if boxes is None else boxes.clone(),
                               mask=None if mask_logits is None else mask_logits.clone()))
        q, d, size = embeddings.shape[0], self.input_space.ndim, self.input_space.size
        centres = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size],
                                             indexing="ij"), -1).unsqueeze(0)  # (1, *size, d)
        view = (q,) + (1,) * d
        region = torch.zeros((q, *size), dtype=torch.bool)
        if points is not None:
            carved = torch.zeros_like(region)
            for n in range(points.shape[1]):  # a test double: a loop over the few points is fine
                near = ((centres - points[:, n].view(q, *([1] * d), d)) ** 2).sum(-1) <= self.radius ** 2
                region |= near & (point_labels[:, n] == 1).view(view)
                carved |= near & (point_labels[:, n] == 0).view(view)
            region &= ~carved
        if boxes is not None:
            region |= ((centres >= boxes[:, :d].view(q, *([1] * d), d))
                       & (centres <= boxes[:, d:].view(q, *([1] * d), d))).all(-1)
        if mask_logits is not None and points is None and boxes is None:
            region = self.upscale(mask_logits)[:, 0] > 0
        segmented = (region & (embeddings[:, 0] > 0.5)).float().unsqueeze(1)
        pool = F.adaptive_avg_pool3d if d == 3 else F.adaptive_avg_pool2d
        logits = 2.0 * torch.logit(pool(segmented, self.input_space.low_res_size).clamp(0.01, 0.99))
        self.outputs.append(logits.clone())
        return logits, torch.ones(q, 1)
