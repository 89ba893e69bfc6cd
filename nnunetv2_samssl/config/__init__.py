"""Trainer settings: schema, bundled defaults (``trainer_configs/``) and resolution from the environment."""
