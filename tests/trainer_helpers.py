"""Building trainers in-process for tests (what ``nnUNetv2_train`` does, minus the CLI)."""
from __future__ import annotations

import os

import pytest
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
    from nnunetv2_samssl.training.seeding import seed_everything as seed_all
    seed_all(seed)


def student_state(trainer):
    from nnunetv2_samssl.ssl.ema import unwrap
    return {k: v.detach().clone() for k, v in unwrap(trainer.network).state_dict().items()}


def run_iterations(trainer, n: int):
    """on_train_start + ``n`` training iterations of epoch 0 with the real loaders; returns the outputs."""
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(n)]
    return outs


# a tiny random-weight SAM-Med3D instead of the configured backend: use `tiny_sam` as an autouse fixture
# (``from trainer_helpers import SAM, tiny_sam``) and pass ``**SAM`` as trainer settings
SAM = dict(sam_backend="sam_med3d", sam_random_init=True, sam_num_clicks=3)
BUILT = []  # (backend, checkpoint, kwargs) of every promptable model the trainers asked for


@pytest.fixture(autouse=True)
def tiny_sam(monkeypatch):
    """Every trainer gets a tiny SAM-Med3D (same structure, 32^3 input) with fixed random weights."""
    import nnunetv2_samssl.sam.registry as registry
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable

    def build(backend, checkpoint, device, **kwargs):
        BUILT.append((backend, checkpoint, kwargs))
        torch.manual_seed(0)
        return SAMMed3DPromptable.from_checkpoint(None, config="tiny", device=device, random_init=True)

    monkeypatch.setattr(registry, "build_promptable_model", build)
