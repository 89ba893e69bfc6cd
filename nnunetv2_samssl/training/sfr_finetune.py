"""``nnUNetv2_samssl_sfr_finetune -d D -c C -f F``: SFR stage 1, fine-tuning a 2D promptable model on stitched
labeled patches of one fold.

The patches come from nnU-Net's own training loader and augmentation over the fold's labeled cases (labeled-subset
mode respected; unlabeled cases are never read). Each batch is cut into slices (2D configuration: the batch's
patches; 3D: the patches' slices along ``sfr_slice_axis``), optionally given random monotone intensity curves
(``sfr_curve_probability``), stitched onto canvases of the backend's input size (no slice dropped, padding =
ignore) and segmented prompt-free by the trainable model (frozen image encoder + rank ``sfr_lora_rank`` LoRA on
q and v, re-initialised K-class mask decoder); loss ``0.5 (CE + Dice)`` on the labelled pixels, AdamW.

Written to ``<fold output folder>/sfr_finetune/``:

    checkpoint_latest.pth   every sfr_save_every iterations (atomic): trainable weights, optimizer, iteration
    sfr_model.pth           the result stage 2 loads (trainable weights + the settings they were made with)
    finetune_log.txt        the log; loss.png the loss curve

A killed run started again resumes from ``checkpoint_latest.pth`` (``--restart`` starts over). The Dice of the
model's predictions on validation patches of the fold's labeled cases is logged before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from typing import List, Optional

import numpy as np
import torch

from nnunetv2_samssl.errors import UserError
from nnunetv2_samssl.pseudo_labels.sfr import IGNORE, StitchedSegmenter, sfr_loss
from nnunetv2_samssl.sam.stitching import random_monotone_curves
from nnunetv2_samssl.training.checkpointing import atomic_torch_save

LATEST = "checkpoint_latest.pth"


class Finetuning:
    """One fine-tuning run of a fold (see the module docstring)."""

    def __init__(self, trainer, restart: bool = False, log=print):
        from nnunetv2_samssl.training.nnUNetTrainerSFR import SFR_MODEL

        self.trainer = trainer
        self.settings = trainer.settings.sfr_finetune
        self.folder = trainer.sfr_folder
        self.result = os.path.join(self.folder, SFR_MODEL)
        os.makedirs(self.folder, exist_ok=True)
        self.log_file = os.path.join(self.folder, "finetune_log.txt")
        self._print = log
        if restart:
            for name in (LATEST, os.path.basename(self.result)):
                path = os.path.join(self.folder, name)
                if os.path.isfile(path):
                    os.remove(path)
        self.stitched: StitchedSegmenter = trainer.build_segmenter()
        self.params = self.stitched.segmenter.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.settings.sfr_lr,
                                           weight_decay=self.settings.sfr_weight_decay)
        self.iteration = 0
        self.losses: List[float] = []
        self.generator = torch.Generator().manual_seed(12345)
        self.ignore_label = trainer.label_manager.ignore_label

    def log(self, text: str) -> None:
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S}: {text}"
        self._print(line)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"trainable": self.stitched.segmenter.trainable_state_dict(),
                "optimizer": self.optimizer.state_dict(), "iteration": self.iteration, "losses": self.losses,
                "generator": self.generator.get_state(), "meta": self.trainer.model_meta()}

    def resume(self) -> bool:
        path = os.path.join(self.folder, LATEST)
        if not os.path.isfile(path):
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["meta"] != self.trainer.model_meta():
            raise UserError(f"{path} was written with other settings ({saved['meta']}) than now "
                            f"({self.trainer.model_meta()}); pass --restart to start the fine-tuning over.")
        self.stitched.segmenter.load_trainable_state_dict(saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.iteration, self.losses = int(saved["iteration"]), list(saved["losses"])
        self.generator.set_state(saved["generator"])
        self.log(f"Resumed from {path} at iteration {self.iteration}")
        return True

    def save(self) -> None:
        atomic_torch_save(self.state(), os.path.join(self.folder, LATEST))
        self.plot()

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(np.arange(1, len(self.losses) + 1), self.losses, lw=0.8, label="0.5 (CE + Dice)")
        if len(self.losses) >= 20:
            k = max(len(self.losses) // 50, 5)
            smooth = np.convolve(self.losses, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, len(self.losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title("SFR fine-tuning")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.folder, "loss.png"))
        plt.close(fig)

    # ------------------------------------------------------------------ data
    def slices(self, batch: dict):
        """Slices ``(N, C, h, w)`` and labels ``(N, h, w)`` (``IGNORE`` for the dataset's ignore label) of a batch."""
        device = self.trainer.device
        data = batch["data"].to(device)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        labels = target.to(device).long()
        if self.ignore_label is not None:
            labels = torch.where(labels == self.ignore_label, torch.full_like(labels, IGNORE), labels)
        images, _ = self.stitched.as_slices(data)
        label_slices, _ = self.stitched.as_slices(labels)
        return images, label_slices[:, 0]

    def step(self, batch: dict) -> float:
        images, labels = self.slices(batch)
        if self.settings.sfr_curve_probability > 0:
            images = random_monotone_curves(images.cpu(), self.settings.sfr_curve_probability,
                                            self.generator).to(images.device)
        canvases, canvas_labels, _ = self.stitched.canvases(images, labels)
        self.stitched.segmenter.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = sfr_loss(self.stitched.segmenter(canvases), canvas_labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 12)
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def validation_dice(self, loader, batches: int = 2) -> float:
        """Mean foreground Dice of the model's predictions on validation patches of labeled cases."""
        from nnunetv2_samssl.evaluation.metrics import mean_foreground_dice
        self.stitched.segmenter.eval()
        scores = []
        for _ in range(batches):
            images, labels = self.slices(next(loader))
            predicted = self.stitched.slice_logits(images).argmax(1)
            scores.append(mean_foreground_dice(predicted, labels, self.trainer.label_manager.num_segmentation_heads))
        scores = [s for s in scores if s == s]
        return float(np.mean(scores)) if scores else float("nan")

    # ------------------------------------------------------------------ run
    def run(self) -> str:
        total = self.settings.sfr_iterations
        if os.path.isfile(self.result) and not os.path.isfile(os.path.join(self.folder, LATEST)):
            self.log(f"{self.result} exists already (pass --restart to fine-tune again)")
            return self.result
        resumed = self.resume()
        train, val = self.trainer.labeled_dataloaders(self.settings.sfr_batch_size)
        try:
            if not resumed:
                self.log(f"SFR fine-tuning of {self.trainer.settings.sam_model.sam_backend} on "
                         f"{len(self.trainer.labeled_cases)} labeled cases, {total} iterations; "
                         f"{sum(p.numel() for p in self.params)} trainable parameters")
                self.log(f"Dice on validation patches before fine-tuning: {self.validation_dice(val):.4f}")
            start, t0 = self.iteration, time.time()
            while self.iteration < total:
                self.losses.append(self.step(next(train)))
                self.iteration += 1
                if self.iteration % self.settings.sfr_save_every == 0 or self.iteration == total:
                    recent = self.losses[-self.settings.sfr_save_every:]
                    self.log(f"iteration {self.iteration}/{total}: loss {np.mean(recent):.4f} "
                             f"({(time.time() - t0) / (self.iteration - start):.2f} s/iteration)")
                    self.save()
            self.log(f"Dice on validation patches after fine-tuning: {self.validation_dice(val):.4f}")
        finally:
            for loader in (train, val):
                finish = getattr(loader, "_finish", None)
                if finish is not None:
                    finish()
        atomic_torch_save({"trainable": self.stitched.segmenter.trainable_state_dict(),
                           "meta": self.trainer.model_meta(), "losses": self.losses}, self.result)
        os.remove(os.path.join(self.folder, LATEST))
        self.log(f"Fine-tuned model written to {self.result}. Now train: nnUNetv2_train "
                 f"{self.trainer.plans_manager.dataset_name} {self.trainer.configuration_name} {self.trainer.fold} "
                 f"-tr {self.trainer.__class__.__name__}")
        return self.result


def finetune(dataset: str, configuration: str, fold: int, trainer_name: str = "nnUNetTrainerSFR",
             plans_identifier: str = "nnUNetPlans", device: Optional[torch.device] = None,
             restart: bool = False) -> str:
    """Runs (or resumes) stage 1 for one fold; returns the path of the fine-tuned model."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2_samssl.training.nnUNetTrainerSFR import nnUNetTrainerSFR

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = get_trainer_from_args(str(dataset), configuration, fold, trainer_name, plans_identifier, False, device)
    if not isinstance(trainer, nnUNetTrainerSFR):
        raise UserError(f"-tr {trainer_name} is no SFR trainer; fine-tuning is stage 1 of nnUNetTrainerSFR")
    return Finetuning(trainer, restart).run()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="SFR stage 1: fine-tune a 2D promptable model on stitched labeled "
                                                 "patches of one fold (settings: trainer_configs/sfr.yaml, "
                                                 "nnUNet_samssl_config / nnUNet_samssl_overrides).")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", required=True, help="fold")
    parser.add_argument("-tr", default="nnUNetTrainerSFR", help="the SFR trainer (default nnUNetTrainerSFR)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-device", default=None, choices=("cuda", "cpu", "mps"), help="default: cuda if available")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)
    fold = args.f if args.f == "all" else int(args.f)
    try:
        finetune(args.d, args.c, fold, args.tr, args.p, None if args.device is None else torch.device(args.device),
                 args.restart)
    except UserError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(1)
