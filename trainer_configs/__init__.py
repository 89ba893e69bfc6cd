"""Bundled trainer configurations (YAML). Installed as ``nnunetv2_samssl.trainer_configs``."""
