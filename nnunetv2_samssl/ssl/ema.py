"""Exponential-moving-average (mean) teacher."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (in that order)."""
    if isinstance(module, DistributedDataParallel):
        module = module.module
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


class EMATeacher:
    """Teacher weights theta' <- alpha theta' + (1 - alpha) theta after every optimizer step.

    ``alpha = min(1 - 1 / (step + 1), max_decay)`` (the anchors' schedule: the teacher follows the
    student closely at first). The teacher is an eval-mode deep copy of the unwrapped student; it is
    never trained by gradients. Floating buffers are averaged like parameters, integer buffers copied.
    """

    def __init__(self, student: nn.Module, max_decay: float = 0.99):
        if not 0.0 <= max_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {max_decay}")
        self.max_decay = max_decay
        self.module = copy.deepcopy(unwrap(student))
        self.module.requires_grad_(False)
        self.module.eval()
        self._forward = self.module

    def compile(self) -> None:
        """Run the teacher's forward through ``torch.compile`` (weights stay shared with :attr:`module`)."""
        self._forward = torch.compile(self.module)

    def decay_at(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1.0), self.max_decay)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """EMA update after optimizer step number ``step`` (0-based). Returns the alpha used."""
        alpha = self.decay_at(step)
        src = unwrap(student)
        t_params = [p for p in self.module.parameters()]
        s_params = [p.detach() for p in src.parameters()]
        if len(t_params) != len(s_params):
            raise RuntimeError("Teacher and student have different parameter lists.")
        # lerp: t + (s - t) * (1 - alpha) == alpha * t + (1 - alpha) * s ; one fused kernel per dtype group
        torch._foreach_lerp_(t_params, s_params, 1.0 - alpha)
        for t_buf, s_buf in zip(self.module.buffers(), src.buffers()):
            if t_buf.dtype.is_floating_point:
                t_buf.lerp_(s_buf, 1.0 - alpha)
            else:
                t_buf.copy_(s_buf)
        return alpha

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        return self._forward(x)

    __call__ = forward

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)
