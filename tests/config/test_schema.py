import pytest
import yaml

from nnunetv2_samssl.config.schema import ConfigError, bundled_config_names, parse_overrides, resolve_config
from nnunetv2_samssl.config.settings import MEAN_TEACHER_SCHEMA


def resolve(config=None, overrides=None, environ=None):
    return resolve_config(MEAN_TEACHER_SCHEMA, "mean_teacher", config=config, overrides=overrides,
                          environ=environ if environ is not None else {})


def test_bundled_default_defines_every_key_with_paper_values():
    cfg, sources = resolve()
    assert set(cfg) == {o.name for o in MEAN_TEACHER_SCHEMA}
    assert sources == ["bundled config 'mean_teacher'"]
    assert cfg["ema_decay"] == 0.99 and cfg["consistency_weight"] == 0.1
    assert cfg["consistency_loss"] == "softmax_mse" and cfg["teacher_noise_clip"] == 0.2
    assert "mean_teacher" in bundled_config_names()


def test_overrides_from_environment_are_parsed_as_yaml():
    cfg, sources = resolve(environ={"nnUNet_samssl_overrides": "num_epochs=5 ema_decay=0.999 "
                                                               "labeled_cases=[a,b] num_labeled=null"})
    assert cfg["num_epochs"] == 5 and cfg["ema_decay"] == 0.999 and cfg["labeled_cases"] == ["a", "b"]
    assert sources[-1] == "nnUNet_samssl_overrides"


def test_user_file_with_base_and_relative_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: mean_teacher\nema_decay: 0.95\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\nnum_epochs: 7\n")
    cfg, sources = resolve(environ={"nnUNet_samssl_config": str(tmp_path / "b.yaml")})
    assert cfg["ema_decay"] == 0.95 and cfg["num_epochs"] == 7 and len(sources) == 3


@pytest.mark.parametrize("text,key", [
    ("ema_decai: 0.9", "ema_decai"),
])
def test_unknown_key_names_the_key_and_the_file(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text("base: mean_teacher\n" + text + "\n")
    with pytest.raises(ConfigError, match=f"Unknown setting '{key}' in {f}"):
        resolve(config=str(f))


@pytest.mark.parametrize("override,match", [
    ({"ema_decay": 1.5}, "ema_decay.*<= 1.0"),
    ({"ema_decay": "high"}, "ema_decay.*must be a number"),
    ({"num_epochs": 0}, "num_epochs.*>= 1"),
    ({"num_epochs": True}, "num_epochs.*boolean"),
    ({"num_labeled": 0}, "num_labeled.*>= 1"),
    ({"consistency_loss": "l1"}, "consistency_loss.*one of"),
    ({"labeled_cases": []}, "labeled_cases.*non-empty"),
    ({"labeled_cases": ["a", "a"]}, "labeled_cases.*twice"),
    ({"num_labeled": 2, "labeled_cases": ["a"]}, "exclude each other"),
    ({"initial_lr": 0}, "initial_lr.*> 0"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve(overrides=override)


def test_missing_keys_in_a_file_without_base(tmp_path):
    f = tmp_path / "partial.yaml"
    f.write_text("ema_decay: 0.9\n")
    with pytest.raises(ConfigError, match="have no value.*base: mean_teacher"):
        resolve(config=str(f))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides("num_epochs 5")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(config=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no bundled config named 'nope'"):
        resolve(config="nope")


def test_base_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: ./b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        resolve(config=str(tmp_path / "a.yaml"))


def test_saved_config_round_trips(tmp_path):
    cfg, _ = resolve(overrides={"num_epochs": 3})
    f = tmp_path / "saved.yaml"
    f.write_text(yaml.safe_dump(cfg))
    again, _ = resolve(config=str(f))
    assert again == cfg


def test_mean_teacher_strong_preset_changes_only_the_four_levers():
    paper, _ = resolve_config(MEAN_TEACHER_SCHEMA, "mean_teacher", environ={})
    strong, sources = resolve_config(MEAN_TEACHER_SCHEMA, "mean_teacher", config="mean_teacher_strong", environ={})
    changed = {k: v for k, v in strong.items() if paper[k] != v}
    assert changed == {"student_view": "strong", "consistency_loss": "hard_cross_entropy",
                       "consistency_threshold": 0.9, "consistency_weight": 1.0}
    assert any("mean_teacher_strong" in s for s in sources)
