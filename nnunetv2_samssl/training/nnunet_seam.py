"""The one place that depends on nnU-Net's trainer internals beyond its documented hooks.

Everything else in this package extends ``nnUNetTrainer`` through ``super()`` and its hooks (``initialize``,
``do_split``, ``get_dataloaders``, ``on_*``, ``train_step``, ``validation_step``). What cannot be done that way
lives here, each piece saying which nnU-Net code it relies on:

- :meth:`nnUNetSeam.save_checkpoint`: nnU-Net writes checkpoints in place with ``torch.save`` (a kill leaves a
  corrupt ``checkpoint_latest.pth``) and has no hook for extra state. This is a copy of its dict (same keys) plus
  our ``samssl`` key, written atomically. :data:`PINNED_SOURCES` pins the nnU-Net source it copies: an nnU-Net
  upgrade that changes that method fails ``tests/training/test_nnunet_seam.py`` instead of drifting silently.
- :meth:`nnUNetSeam.backward_and_step`: nnU-Net's update (grad scaler, clip at 12, step) is inlined in its
  ``train_step``, which a semi-supervised step (one fused forward over labeled and unlabeled patches) cannot
  call. Copied for several trainable parts, pinned the same way.
- :meth:`nnUNetSeam.load_checkpoint` calls nnU-Net's own and then restores the extra state.
- :meth:`nnUNetSeam.deep_supervision_weights` reads the weights nnU-Net's loss was built with (its own rule:
  1/2^i, the lowest scale 0, or 1e-6 under DDP without compile, normalised).
- the deep-supervision switch of the default architecture for the EMA teacher, nnU-Net's sliding-window
  predictor on a network in memory (whole-case pseudo-labels), and the local logger with extra panels;
- :func:`geometry_only_view`: nnU-Net's training transforms without zoom and intensity changes (it reads the
  structure of the list ``nnUNetTrainer.get_training_transforms`` returns).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from nnunetv2_samssl.ssl.ema import unwrap
from nnunetv2_samssl.training.checkpointing import RESUME_CANDIDATES, atomic_torch_save, newest_checkpoint
from nnunetv2_samssl.training.parts import TrainableParts
from nnunetv2_samssl.training.progress import SSLLocalLogger

CHECKPOINT_KEY = "samssl"

# nnU-Net's intensity (and resolution) augmentations: a promptable model should see the image as nnU-Net
# normalised it, not brightened, blurred, noised or down-sampled
_INTENSITY_TRANSFORMS = ("GaussianNoiseTransform", "GaussianBlurTransform", "MultiplicativeBrightnessTransform",
                         "ContrastTransform", "SimulateLowResolutionTransform", "GammaTransform")


def geometry_only_view(transforms):
    """nnU-Net's training transforms (a ``ComposeTransforms``) with zoom switched off (``SpatialTransform``
    ``p_scaling = 0``) and the intensity / resolution augmentations left out: patches at the configuration's
    spacing with nnU-Net-normalised intensities, still cropped, rotated and mirrored (labels / maps follow).

    For promptable models that expect a physical scale (SAM-Med3D: 1.5 mm) and the intensities they were
    trained on: nnU-Net zooms patches by 0.7-1.4, so the configuration's spacing would be wrong by up to 40%.
    """
    import copy

    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    kept = []
    for t in transforms.transforms:
        inner = t.transform if isinstance(t, RandomTransform) else t
        if type(inner).__name__ in _INTENSITY_TRANSFORMS:
            continue
        if isinstance(t, SpatialTransform):
            t = copy.copy(t)
            t.p_scaling = 0.0
        kept.append(t)
    if not any(isinstance(t, SpatialTransform) for t in kept):
        raise RuntimeError("nnU-Net's training transforms have no SpatialTransform: geometry_only_view does not know "
                           "this nnU-Net version's augmentation")
    return ComposeTransforms(kept)


# sha256 of inspect.getsource(...) of the nnU-Net methods copied here, per supported nnU-Net version
PINNED_SOURCES: Dict[str, Dict[str, str]] = {
    "2.8.1": {
        "nnUNetTrainer.save_checkpoint": "de4f196c42e6bcf522641d62c8e30af2c4c094f8c541943e07bbb39b965c3307",
        "nnUNetTrainer.train_step": "c8993de84c8c419f6471f619f82839931c8e7d1bae0b0eddca42951fcab90819",
    },
}


def source_digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


class nnUNetSeam:
    """Mixin for ``nnUNetTrainer`` subclasses (put it before ``nnUNetTrainer`` in the bases).

    A trainer keeps its models in :attr:`parts` (:class:`TrainableParts`; the student is added by
    :meth:`initialize`) and adds checkpoint state through :meth:`checkpoint_extras` /
    :meth:`load_checkpoint_extras`.
    """

    parts: TrainableParts

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net pops this from the plans: whether this process was started with --c
        self.continue_training = bool(plans.get("continue_training", False))
        self.resumed = False  # set once a checkpoint was loaded
        super().__init__(plans, configuration, fold, dataset_json, device)

    def initialize(self):
        super().initialize()
        self.parts = TrainableParts()
        self.parts.add("student", self.network, self.optimizer, self.lr_scheduler, predicts=True,
                       owned_by_nnunet=True)

    # ------------------------------------------------------------------ logging
    def install_log_panels(self, panels: Mapping[str, Sequence[str]]) -> None:
        """Extra per-epoch keys, drawn as extra panels of ``progress.png`` (nnU-Net plots its own keys only)."""
        self.logger.local_logger = SSLLocalLogger(panels)

    # ------------------------------------------------------------------ deep supervision
    def deep_supervision_weights(self) -> Optional[List[float]]:
        """The per-scale weights nnU-Net's loss uses (normalised), or ``None`` without deep supervision."""
        if not self.enable_deep_supervision:
            return None
        return [float(w) for w in self.loss.weight_factors]

    @contextlib.contextmanager
    def plain_outputs(self, *others: torch.nn.Module) -> Iterator[None]:
        """The student (and ``others``, e.g. the EMA teacher) return full-resolution logits only inside."""
        self.set_deep_supervision_enabled(False)
        for module in others:
            unwrap(module).decoder.deep_supervision = False
        try:
            yield
        finally:
            self.set_deep_supervision_enabled(self.enable_deep_supervision)
            for module in others:
                unwrap(module).decoder.deep_supervision = self.enable_deep_supervision

    def sliding_window_probabilities(self, network: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(channels, *shape)`` of ``network`` on a whole preprocessed case ``(C, *shape)`` with
        nnU-Net's sliding window (no mirroring) and its output activation (softmax, or sigmoid for regions), on
        the training device. Call inside :meth:`plain_outputs`; the network's
        train/eval mode is restored."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        cache = self.__dict__.setdefault("_sliding_window_predictors", {})
        predictor = cache.get(id(network))
        if predictor is None:
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                        perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                        verbose=False, allow_tqdm=False)
            predictor.manual_initialization(network, self.plans_manager, self.configuration_manager, None,
                                            self.dataset_json, self.__class__.__name__, None)
            cache[id(network)] = predictor
        was_training = network.training
        try:
            logits = predictor.predict_sliding_window_return_logits(image)
        finally:
            network.train(was_training)
        return self.label_manager.apply_inference_nonlin(logits.to(self.device).float())

    # ------------------------------------------------------------------ the update
    def backward_and_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's update for every trainable part (grad scaler on CUDA, gradient norm clipped at 12 per part),
        then :meth:`after_optimizer_step`."""
        trainable = [part for _, part in self.parts.trainable()]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.synchronize_gradients()
            for part in trainable:
                self.grad_scaler.unscale_(part.optimizer)
                torch.nn.utils.clip_grad_norm_(part.module.parameters(), 12)
            for part in trainable:
                self.grad_scaler.step(part.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.synchronize_gradients()
            for part in trainable:
                torch.nn.utils.clip_grad_norm_(part.module.parameters(), 12)
                part.optimizer.step()
        self.after_optimizer_step()

    def synchronize_gradients(self) -> None:
        """Hook after ``backward``: average the gradients of parts DDP does not wrap over the ranks."""

    def after_optimizer_step(self) -> None:
        """Hook, e.g. the EMA teacher update."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # steps the student's scheduler
        self.parts.step_schedulers(self.current_epoch)

    # ------------------------------------------------------------------ checkpoints
    def prediction_weights(self) -> Dict[str, torch.Tensor]:
        """Weights written as ``network_weights`` (what ``nnUNetv2_predict`` loads)."""
        return self.parts.predicting().plain.state_dict()

    def checkpoint_extras(self) -> Dict[str, Any]:
        """State stored under ``checkpoint["samssl"]`` besides the parts."""
        return {}

    def load_checkpoint_extras(self, state: Mapping[str, Any]) -> None:
        pass

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {  # nnU-Net's keys (nnUNetTrainer.save_checkpoint), network_weights from the predicting part
            "network_weights": self.prediction_weights(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: {"parts": self.parts.state_dict(), **self.checkpoint_extras()},
        }
        atomic_torch_save(checkpoint, filename)

    def checkpoint_to_load(self, filename: str) -> Tuple[str, Optional[dict]]:
        """The file to load, and its content where choosing it meant reading it already (else ``None``). Only the resume of a ``--c`` run (its first load) may choose: among final, latest
        and best of this fold, the newest readable one (nnU-Net would take latest even if best were newer, or
        fail on a corrupt latest). Every other load (``--val``, ``--val_best``, ``-pretrained_weights`` is not a
        checkpoint load) reads exactly the file asked for."""
        resuming, self.continue_training = self.continue_training, False  # the resume is the first load only
        folder = os.path.dirname(os.path.abspath(filename))
        if not resuming or os.path.basename(filename) not in RESUME_CANDIDATES \
                or folder != os.path.abspath(self.output_folder):
            return filename, None
        load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
        found = newest_checkpoint(folder, load, self.print_to_log_file)
        if found is None:
            raise RuntimeError(f"No readable checkpoint in {folder}; start a new training without --c.")
        return found

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, (str, os.PathLike)):
            raise TypeError("load_checkpoint takes the path of a checkpoint file (nnU-Net 2.8.1 cannot load a dict)")
        filename, checkpoint = self.checkpoint_to_load(str(filename_or_checkpoint))
        super().load_checkpoint(filename)  # nnU-Net's own: network_weights, optimizer, logger, epoch, ...
        if checkpoint is None:  # our state (loading copies it onto the parts' devices)
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None or "parts" not in state:
            raise RuntimeError(f"{filename} has no {self.__class__.__name__} training state (it was written by "
                               f"another trainer or an older version), so training cannot resume from it. Start a "
                               f"new training without --c (use -pretrained_weights to initialise the student).")
        self.parts.load_state_dict(state["parts"])
        self.load_checkpoint_extras(state)
        self.resumed = True
        self.print_to_log_file(f"Loaded {filename} (epoch {checkpoint['current_epoch']})")
