"""Building trainers in-process for tests (what ``nnUNetv2_train`` does, minus the CLI)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIG


def make_trainer(trainer_class, env, fold=0, continue_training=False, use_overrides=True, configuration=CONFIG,
                 **overrides):
    """A trainer on the tiny dataset, on CPU. ``overrides`` (on top of a short schedule) become
    nnUNet_samssl_overrides; ``use_overrides=False`` sets none (as a user resuming with a bare ``--c``)."""
    text = " ".join(f"{k}={_yaml(v)}" for k, v in {"num_epochs": 2, "num_iterations_per_epoch": 2,
                                                     "num_val_iterations_per_epoch": 1, **overrides}.items())
    os.environ["nnUNet_samssl_overrides"] = text if use_overrides else ""
    try:
        plans = load_json(os.path.join(env.dataset_pp, "nnUNetPlans.json"))
        plans["continue_training"] = continue_training
        dataset_json = load_json(os.path.join(env.dataset_pp, "dataset.json"))
        return trainer_class(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
    finally:
        del os.environ["nnUNet_samssl_overrides"]


def _yaml(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def student_state(trainer):
    from nnunetv2_samssl.ssl.ema import unwrap
    return {k: v.detach().clone() for k, v in unwrap(trainer.network).state_dict().items()}


def run_iterations(trainer, n: int):
    """on_train_start + ``n`` training iterations of epoch 0 with the real loaders; returns the outputs."""
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(n)]
    return outs
