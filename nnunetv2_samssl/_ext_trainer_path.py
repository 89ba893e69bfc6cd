"""Registers this package's trainer folder in ``nnUNet_extTrainer`` at interpreter start-up.

nnU-Net 2.8 looks for trainers outside its own package in the folders listed (os.pathsep-separated)
in the environment variable ``nnUNet_extTrainer``. The installed ``.pth`` file imports this module,
which appends our folder to whatever the user set (never overwriting it). Child processes (DDP ranks,
data-augmentation workers) inherit the variable. Only the standard library is imported here.
"""
import os

TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_shims")


def register(environ=os.environ) -> str:
    """Append :data:`TRAINER_FOLDER` to ``nnUNet_extTrainer`` if it is not listed yet; return the new value."""
    current = environ.get("nnUNet_extTrainer", "")
    parts = [p for p in current.split(os.pathsep) if p]
    if TRAINER_FOLDER not in parts:
        parts.append(TRAINER_FOLDER)
    environ["nnUNet_extTrainer"] = os.pathsep.join(parts)
    return environ["nnUNet_extTrainer"]


register()
