"""Checkpoints that survive a kill at any moment.

nnU-Net writes ``checkpoint_latest.pth`` in place: a kill during ``torch.save`` leaves a truncated file
and ``--c`` then fails. Here every checkpoint is written to a temporary file in the same folder,
flushed to disk and renamed over the old one (``os.replace`` is atomic), so each name always holds a
complete checkpoint. On resume the newest loadable checkpoint among final/latest/best is used.
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

import torch

RESUME_CANDIDATES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def atomic_torch_save(obj: Any, filename: str) -> None:
    folder = os.path.dirname(os.path.abspath(filename))
    tmp = os.path.join(folder, f".{os.path.basename(filename)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def newest_checkpoint(folder: str, load: Callable[[str], dict],
                      log: Callable[[str], None] = print) -> Optional[Tuple[str, dict]]:
    """Loads every resume candidate in ``folder`` and returns (path, checkpoint) of the newest one.

    "Newest" is the highest ``current_epoch``; final wins ties. Unreadable files (e.g. a corrupt file
    written by another tool) are reported through ``log`` and skipped.
    """
    found: List[Tuple[int, int, str, dict]] = []
    for rank, name in enumerate(RESUME_CANDIDATES):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load(path)
        except Exception as e:  # a truncated zip raises RuntimeError, others are possible
            log(f"WARNING: {path} cannot be read ({type(e).__name__}: {e}); skipping it.")
            continue
        found.append((int(ckpt.get("current_epoch", 0)), -rank, path, ckpt))
    if not found:
        return None
    _, _, path, ckpt = max(found, key=lambda x: (x[0], x[1]))
    return path, ckpt
