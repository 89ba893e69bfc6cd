"""Settings objects: one definition per setting, the schema generated from it, validation on construction."""
import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from nnunetv2_samssl.config.schema import ConfigError, resolve_config
from nnunetv2_samssl.config.settings import (MEAN_TEACHER_LAYOUT, SEMISAM_LAYOUT, SEMISAM_SCHEMA,
                                             MeanTeacherSettings, SamLabelerSettings, SamModelSettings, Settings)
from nnunetv2_samssl.sam.registry import BACKENDS

PACKAGE = Path(__file__).resolve().parents[2] / "nnunetv2_samssl"


def test_bundled_yaml_defines_exactly_the_generated_schema():
    text = resources.files("nnunetv2_samssl.trainer_configs").joinpath("semisam.yaml").read_text()
    base = resources.files("nnunetv2_samssl.trainer_configs").joinpath("mean_teacher.yaml").read_text()
    keys = (set(yaml.safe_load(text)) - {"base"}) | set(yaml.safe_load(base))
    assert keys == {o.name for o in SEMISAM_SCHEMA}


def test_backends_are_listed_once():
    option = next(o for o in SEMISAM_SCHEMA if o.name == "sam_backend")
    assert option.choices == BACKENDS
    with pytest.raises(ConfigError, match="sam_backend.*one of"):
        resolve_config(SEMISAM_SCHEMA, "semisam", overrides={"sam_backend": "sam3"}, environ={})


def test_settings_objects_are_built_once_validated_and_frozen():
    cfg, _ = resolve_config(SEMISAM_SCHEMA, "semisam", overrides={"sam_checkpoint": "/x.pth", "sam_num_clicks": 3},
                            environ={})
    settings = Settings.from_config(SEMISAM_LAYOUT, cfg)
    assert settings.sam_labeler.num_clicks == 3 and settings.sam_labeler.mode == "point"
    assert settings.sam_model == SamModelSettings("sam_med3d_turbo", "/x.pth", False, False, "auto")
    assert settings.to_config() == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mean_teacher.ema_decay = 0.5
    with pytest.raises(AttributeError, match="groups"):
        settings.sam_labeler_typo
    # the components validate what they are given, in the one place the option is defined
    with pytest.raises(ConfigError, match="sam_num_clicks.*>= 1"):
        SamLabelerSettings(num_clicks=0)
    with pytest.raises(ConfigError, match="ema_decay.*<= 1.0"):
        dataclasses.replace(Settings.from_config(MEAN_TEACHER_LAYOUT, cfg).mean_teacher, ema_decay=2.0)
    assert MeanTeacherSettings.from_config(cfg).ema_decay == 0.99


def test_no_trainer_reads_a_setting_by_string_key():
    offenders = []
    for path in (PACKAGE / "training").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(ssl_config|settings|cfg)\[[\"']", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders
