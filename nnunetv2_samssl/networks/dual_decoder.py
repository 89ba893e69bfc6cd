"""Two prediction branches on one nnU-Net encoder (the two segmenters of CPAC-SAM's cross prompting).

``DualDecoderNetwork(network)`` keeps nnU-Net's network (``PlainConvUNet``, ``ResidualEncoderUNet``, ... any
``encoder`` + ``decoder`` architecture of ``dynamic_network_architectures``) and adds a second decoder,
``decoder_b``: a copy of the first with its own, independent initialisation, reading the same encoder skips.

- ``forward(x)`` is what nnU-Net calls (validation, ``nnUNetv2_predict``, sliding window): the mean of the two
  branches' logits (every deep-supervision scale when it is on), so the trained model predicts from the image
  alone with nnU-Net's own inference code.
- ``forward(x, branches=True)`` returns both branches' outputs (and with ``features=True`` the feature map each
  decoder feeds its full-resolution segmentation layer), what the trainer needs.

Why two decoders on one encoder, and not two networks: the public CPAC-SAM code has one (SAM) encoder and two
mask decoders; a shared encoder costs about 1.5x one network per step instead of 2x; and one module keeps
nnU-Net's checkpoint, optimizer, DDP and inference code paths unchanged.
"""
from __future__ import annotations

import copy
from typing import List, Tuple, Union

import torch
from torch import nn

Outputs = Union[torch.Tensor, List[torch.Tensor]]


def average_outputs(a: Outputs, b: Outputs) -> Outputs:
    """Mean of two network outputs (tensors or deep-supervision lists)."""
    if isinstance(a, torch.Tensor):
        return 0.5 * (a + b)
    return [0.5 * (x + y) for x, y in zip(a, b)]


def _reinitialise(module: nn.Module, network: nn.Module) -> None:
    """The architecture's own initialisation (``network.initialize``, nnU-Net's He init) or every layer's default."""
    init = getattr(type(network), "initialize", None)
    if callable(init):
        module.apply(init)
        return
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


class DualDecoderNetwork(nn.Module):
    """nnU-Net's network plus a second decoder on the same encoder (see the module docstring).

    Args:
        network: a freshly built nnU-Net network with ``encoder`` and ``decoder``.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        if not (isinstance(getattr(network, "encoder", None), nn.Module)
                and isinstance(getattr(network, "decoder", None), nn.Module)):
            raise TypeError(f"{type(network).__name__} has no encoder/decoder pair; the two branches need an "
                            f"nnU-Net architecture built from dynamic_network_architectures")
        self.architecture = type(network).__name__
        self.encoder = network.encoder
        self.decoder = network.decoder
        decoder_b = copy.deepcopy(network.decoder)
        _reinitialise(decoder_b, network)
        if isinstance(getattr(decoder_b, "encoder", None), nn.Module):
            decoder_b.encoder = self.encoder  # the decoder keeps a reference to its encoder: share it, not a copy
        self.decoder_b = decoder_b

    def forward(self, x: torch.Tensor, branches: bool = False, features: bool = False):
        """``branches=False``: the mean of both branches (nnU-Net's view). ``branches=True``: ``(out_a, out_b)``,
        plus ``(features_a, features_b)`` (the last decoder stage's output, full resolution) with ``features``."""
        self.decoder_b.deep_supervision = self.decoder.deep_supervision  # nnU-Net switches the first only
        captured = []
        hooks = []
        if features:
            for decoder in (self.decoder, self.decoder_b):
                hooks.append(decoder.stages[-1].register_forward_hook(lambda m, i, o: captured.append(o)))
        try:
            skips = self.encoder(x)
            a, b = self.decoder(skips), self.decoder_b(skips)
        finally:
            for hook in hooks:
                hook.remove()
        if not branches:
            return average_outputs(a, b)
        if features:
            return a, b, (captured[0], captured[1])
        return a, b

    def compute_conv_feature_map_size(self, input_size) -> int:
        return int(self.encoder.compute_conv_feature_map_size(input_size)
                   + 2 * self.decoder.compute_conv_feature_map_size(input_size))


def branch_outputs(network: nn.Module, x: torch.Tensor, features: bool = False) -> Tuple:
    """``network(x, branches=True, features=...)`` for a (possibly DDP / compile wrapped) dual network."""
    return network(x, branches=True, features=features)
