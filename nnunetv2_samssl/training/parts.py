"""The named set of a trainer's models: what is trained, what is only averaged, what predicts.

A semi-supervised method has more than one model: the student (nnU-Net's network), an EMA teacher, a second
branch, a promptable model's decoder or LoRA weights. :class:`TrainableParts` holds them by name, each with its
optimizer and learning-rate scheduler (none for a non-trainable part such as the EMA teacher). It

- zeroes and steps every trainable part in one update (``nnunet_seam.nnUNetSeam.backward_and_step``),
- wraps trainable parts in DDP when nnU-Net runs with several GPUs (the student is wrapped by nnU-Net itself),
- saves and restores all of them in the nnU-Net checkpoint under one key (``checkpoint["samssl"]["parts"]``),
- says which part's weights ``nnUNetv2_predict`` loads (``predicts``); the others never reach
  ``network_weights``.

The student's optimizer is nnU-Net's ``self.optimizer`` and its state stays in nnU-Net's own checkpoint keys
(``owned_by_nnunet``); the set stores its weights only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from nnunetv2_samssl.ssl.ema import unwrap


@dataclass
class Part:
    """One model of the trainer.

    Attributes:
        module: the module as used in training (possibly DDP / compile wrapped).
        optimizer, lr_scheduler: ``None`` for a part that is not trained by gradients.
        predicts: its weights are written as ``network_weights``.
        owned_by_nnunet: nnU-Net's checkpoint keys hold its optimizer state (the student).
        compact: the module saves only what it trains (``compact_state_dict`` / ``load_compact_state_dict``), e.g. a
            promptable model whose frozen pretrained weights come from its own checkpoint file.
    """

    module: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    lr_scheduler: Optional[Any] = None
    predicts: bool = False
    owned_by_nnunet: bool = False
    compact: bool = False

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def plain(self) -> nn.Module:
        return unwrap(self.module)


class TrainableParts:
    """Named models of one trainer (insertion order is kept)."""

    def __init__(self):
        self._parts: Dict[str, Part] = {}

    def add(self, name: str, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
            lr_scheduler: Optional[Any] = None, predicts: bool = False, owned_by_nnunet: bool = False,
            ddp: bool = False, device_ids: Optional[List[int]] = None, compact: bool = False) -> nn.Module:
        """Adds a part and returns its module as training should call it: wrapped in DDP (``device_ids`` as
        nnU-Net passes them, ``[local_rank]`` on GPUs) when it is trainable and ``ddp`` is set, unchanged
        otherwise."""
        if name in self._parts:
            raise ValueError(f"a part named {name!r} exists already")
        if optimizer is not None and ddp and not isinstance(module, nn.parallel.DistributedDataParallel):
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        self._parts[name] = Part(module, optimizer, lr_scheduler, predicts, owned_by_nnunet, compact)
        return module

    def set_predicting(self, name: str) -> None:
        """Makes ``name`` the one part whose weights ``nnUNetv2_predict`` loads."""
        if name not in self._parts:
            raise KeyError(name)
        for key, part in self._parts.items():
            part.predicts = key == name

    def __getitem__(self, name: str) -> Part:
        return self._parts[name]

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def items(self) -> Iterator[Tuple[str, Part]]:
        return iter(self._parts.items())

    def trainable(self) -> List[Tuple[str, Part]]:
        return [(k, p) for k, p in self._parts.items() if p.trainable]

    def predicting(self) -> Part:
        chosen = [p for p in self._parts.values() if p.predicts]
        if len(chosen) != 1:
            raise RuntimeError(f"exactly one part must predict, found {len(chosen)}")
        return chosen[0]

    # ------------------------------------------------------------------ training
    def zero_grad(self) -> None:
        for _, part in self.trainable():
            part.optimizer.zero_grad(set_to_none=True)

    def step_schedulers(self, epoch: int) -> None:
        """Steps the schedulers of the parts nnU-Net does not step itself (it steps the student's)."""
        for _, part in self.trainable():
            if part.lr_scheduler is not None and not part.owned_by_nnunet:
                part.lr_scheduler.step(epoch)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for name, part in self._parts.items():
            state: Dict[str, Any] = {"weights": part.plain.compact_state_dict() if part.compact
                                     else part.plain.state_dict()}
            if part.trainable and not part.owned_by_nnunet:
                state["optimizer"] = part.optimizer.state_dict()
                if part.lr_scheduler is not None and hasattr(part.lr_scheduler, "state_dict"):
                    state["lr_scheduler"] = part.lr_scheduler.state_dict()
            out[name] = state
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restores every part; a part missing from ``state`` (or an extra one) is an error naming it."""
        missing, extra = sorted(set(self._parts) - set(state)), sorted(set(state) - set(self._parts))
        if missing or extra:
            raise RuntimeError(f"The checkpoint's trainer parts {sorted(state)} do not match this trainer's "
                               f"{sorted(self._parts)} (missing: {missing}, unexpected: {extra}): it was written by "
                               f"another trainer or setting. Resume with the settings it was trained with, or start "
                               f"a new training without --c.")
        for name, part in self._parts.items():
            weights = {k[7:] if k.startswith("module.") else k: v for k, v in state[name]["weights"].items()}
            if part.compact:
                part.plain.load_compact_state_dict(weights)
            else:
                part.plain.load_state_dict(weights)
            if "optimizer" in state[name]:
                part.optimizer.load_state_dict(state[name]["optimizer"])
            if "lr_scheduler" in state[name]:
                part.lr_scheduler.load_state_dict(state[name]["lr_scheduler"])
