"""The folder nnU-Net's trainer lookup scans (via ``nnUNet_extTrainer``).

nnU-Net imports the files of this folder as top-level modules and removes them from ``sys.modules``
afterwards, so this file only re-exports classes defined in the real package (which keeps pickling
in worker processes working). Add new trainers to ``nnunetv2_samssl.training.registry``.
"""
from nnunetv2_samssl.training.registry import *  # noqa: F401,F403
from nnunetv2_samssl.training.registry import __all__  # noqa: F401
