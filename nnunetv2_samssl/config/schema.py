"""Reading, merging and validating trainer settings.

Defaults live in the YAML files of ``trainer_configs/`` (installed as ``nnunetv2_samssl.trainer_configs``).
Which keys exist, with their types and ranges, is declared once, on the settings objects of
:mod:`nnunetv2_samssl.config.settings`; a trainer's schema is generated from them. This module merges what the
user gives, validates it against such a schema and checks the settings that depend on each other.

How a user picks settings (no code edits, no new ``nnUNetv2_train`` flags):

- ``nnUNet_samssl_config``: the name of a bundled config (``mean_teacher``) or the path of a YAML file.
  A file may start from another one with ``base: <name or path>`` and list only what it changes.
- ``nnUNet_samssl_overrides``: whitespace-separated ``key=value`` pairs applied last, values parsed
  as YAML (``num_epochs=5 ema_decay=0.999 labeled_cases=[case_000,case_003]``).

Unknown keys and bad values raise :class:`ConfigError` naming the key and where it came from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from nnunetv2_samssl.errors import UserError

CONFIG_ENV = "nnUNet_samssl_config"
OVERRIDES_ENV = "nnUNet_samssl_overrides"
BASE_KEY = "base"


class ConfigError(ValueError, UserError):
    """A setting is unknown, missing or has a bad value."""


@dataclass(frozen=True)
class Option:
    """One setting: its name, accepted type(s) and range, and what it means."""

    name: str
    types: Tuple[type, ...]
    doc: str
    nullable: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error message or None

    def validate(self, value: Any, source: str) -> Any:
        where = f"setting '{self.name}' (from {source})"
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{where} must not be null. {self.doc}")
        # bool is an int subclass: never accept it for numbers, and accept ints for floats
        if isinstance(value, bool) and bool not in self.types:
            raise ConfigError(f"{where} must be {self._type_names()}, got the boolean {value!r}.")
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.types):
            raise ConfigError(f"{where} must be {self._type_names()}, got {type(value).__name__} {value!r}.")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where} must be one of {list(self.choices)}, got {value!r}.")
        if self.minimum is not None and isinstance(value, (int, float)):
            if value < self.minimum or (self.exclusive_minimum and value == self.minimum):
                op = ">" if self.exclusive_minimum else ">="
                raise ConfigError(f"{where} must be {op} {self.minimum}, got {value!r}.")
        if self.maximum is not None and isinstance(value, (int, float)) and value > self.maximum:
            raise ConfigError(f"{where} must be <= {self.maximum}, got {value!r}.")
        if self.check is not None:
            message = self.check(value)
            if message:
                raise ConfigError(f"{where}: {message}")
        return value

    def _type_names(self) -> str:
        names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list"}
        out = " or ".join(names.get(t, t.__name__) for t in self.types)
        return out + (" or null" if self.nullable else "")


def list_of_strings(value: List[Any]) -> Optional[str]:
    if not value or not all(isinstance(v, str) and v for v in value):
        return "must be a non-empty list of case identifiers (strings)."
    if len(set(value)) != len(value):
        return "lists a case identifier twice."
    return None


# ----------------------------------------------------------------------------------------------------
# Loading and merging
# ----------------------------------------------------------------------------------------------------
def bundled_config_names() -> List[str]:
    folder = resources.files("nnunetv2_samssl.trainer_configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> Tuple[Dict[str, Any], str]:
    """Returns (mapping, description of its source)."""
    if os.path.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")) or os.path.isfile(name_or_path):
        path = os.path.abspath(name_or_path)
        if not os.path.isfile(path):
            raise ConfigError(f"Config file {path} does not exist (set by {CONFIG_ENV} or a 'base:' key).")
        with open(path) as f:
            text = f.read()
        source = path
    else:
        resource = resources.files("nnunetv2_samssl.trainer_configs").joinpath(name_or_path + ".yaml")
        if not resource.is_file():
            raise ConfigError(f"There is no bundled config named '{name_or_path}'. Bundled configs: "
                              f"{bundled_config_names()}; or give the path of a YAML file.")
        text = resource.read_text()
        source = f"bundled config '{name_or_path}'"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must contain a mapping of settings, got {type(data).__name__}.")
    return data, source


def _load_chain(name_or_path: str, seen: Tuple[str, ...] = ()) -> List[Tuple[Dict[str, Any], str]]:
    data, source = _read_yaml(name_or_path)
    if source in seen:
        raise ConfigError(f"Config 'base:' chain loops: {' -> '.join(seen + (source,))}")
    base = data.pop(BASE_KEY, None)
    chain: List[Tuple[Dict[str, Any], str]] = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"'base' in {source} must be a config name or path, got {base!r}.")
        if os.path.sep in base and not os.path.isabs(base) and os.path.isfile(source):
            base = os.path.join(os.path.dirname(source), base)
        chain = _load_chain(base, seen + (source,))
    return chain + [(data, source)]


def parse_overrides(text: str) -> Dict[str, Any]:
    """``"a=1 b=[x,y]"`` -> ``{"a": 1, "b": ["x", "y"]}`` (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for token in text.split():
        if "=" not in token:
            raise ConfigError(f"{OVERRIDES_ENV}: '{token}' is not of the form key=value.")
        key, value = token.split("=", 1)
        try:
            out[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{OVERRIDES_ENV}: the value of '{key}' is not valid YAML: {e}") from e
    return out


def resolve_config(schema: Sequence[Option], default_config: str,
                   config: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                   environ: Mapping[str, str] = os.environ,
                   base: Optional[str] = None) -> Tuple[Dict[str, Any], List[str]]:
    """Merges the chosen config (or the trainer's default) with overrides and validates it.

    Args:
        schema: the trainer's options.
        default_config: bundled config used when neither ``config`` nor ``nnUNet_samssl_config`` is given.
        config: name or path; ``None`` reads ``nnUNet_samssl_config``.
        overrides: mapping applied last; ``None`` reads ``nnUNet_samssl_overrides``.
        base: config (name or path) laid under ``config``, as if it started with ``base:`` (used for saved
            configs, which list every setting of their version and no base).
    Returns:
        (validated settings with every schema key present, list of the sources used in order).
    """
    if config is None:
        config = environ.get(CONFIG_ENV) or default_config
    if overrides is None:
        overrides = parse_overrides(environ.get(OVERRIDES_ENV, ""))
    options = {o.name: o for o in schema}
    merged: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    layers = (_load_chain(base) if base is not None else []) + _load_chain(config) \
        + ([(dict(overrides), OVERRIDES_ENV)] if overrides else [])
    for data, source in layers:
        for key, value in data.items():
            if key not in options:
                raise ConfigError(f"Unknown setting '{key}' in {source}. Known settings: {sorted(options)}.")
            merged[key] = value
            origin[key] = source
    missing = [k for k in options if k not in merged]
    if missing:
        raise ConfigError(f"Settings {missing} have no value: config '{config}' must define them or start from a "
                          f"bundled config with 'base: {default_config}'.")
    validated = {k: options[k].validate(merged[k], origin[k]) for k in options}
    _cross_checks(validated)
    return validated, [s for _, s in layers]


def resolve_saved_config(schema: Sequence[Option], default_config: str,
                         saved: str) -> Tuple[Dict[str, Any], List[str], Dict[str, Any]]:
    """The settings a run saved (``samssl_config.yaml``), for resuming or validating that run.

    A run started by an older version lacks the settings added since. Those take the trainer's bundled default
    (``default_config``) and are returned so the caller can log them. A saved setting this version does not know
    is still an error.

    Returns:
        (validated settings, sources used in order, {added setting: the default it took}).
    """
    data, _ = _read_yaml(saved)
    added = [] if BASE_KEY in data else [o.name for o in schema if o.name not in data]
    if not added:
        cfg, sources = resolve_config(schema, default_config, config=saved, overrides={})
        return cfg, sources, {}
    cfg, sources = resolve_config(schema, default_config, config=saved, overrides={}, base=default_config)
    return cfg, sources, {k: cfg[k] for k in added}


def _cross_checks(cfg: Mapping[str, Any]) -> None:
    if cfg.get("num_labeled") is not None and cfg.get("labeled_cases") is not None:
        raise ConfigError("Settings 'num_labeled' and 'labeled_cases' exclude each other: set one of them to null.")
    if cfg.get("sam_loss") == "uncertainty_mse" and cfg.get("sam_prompt_mode") != "unc":
        raise ConfigError("Setting sam_loss: uncertainty_mse needs the voxel-wise uncertainty of "
                          "sam_prompt_mode: unc.")
    if cfg.get("sam_loss") == "uncertainty_mse" and cfg.get("sam_loss_scales") == "all":
        raise ConfigError("Setting sam_loss: uncertainty_mse has a full-resolution uncertainty map only: use "
                          "sam_loss_scales: full_res.")
    if cfg.get("sam_pseudo_labels") == "cached":
        if cfg["sam_target"] == "soft":
            raise ConfigError("Setting sam_target: soft needs SAM's probabilities, but sam_pseudo_labels: cached stores "
                              "hard labels: use sam_target: hard, or sam_pseudo_labels: online.")
        if cfg["sam_loss"] == "uncertainty_mse":
            raise ConfigError("Setting sam_pseudo_labels: cached stores hard labels without the SemiSAM+ uncertainty "
                              "map: use sam_loss soft_mse or dice_ce, or sam_pseudo_labels: online.")
        if cfg["sam_every"] != 1:
            raise ConfigError("Setting sam_every applies to sam_pseudo_labels: online only; with cached pseudo-labels "
                              "set sam_cache_refresh_epochs instead (and sam_every: 1).")
        if cfg.get("num_epochs") is not None and cfg["sam_cache_refresh_epochs"] >= cfg["num_epochs"]:
            raise ConfigError(f"Setting sam_cache_refresh_epochs={cfg['sam_cache_refresh_epochs']} is not below "
                              f"num_epochs={cfg['num_epochs']}: the first pseudo-labels are made at epoch "
                              f"sam_cache_refresh_epochs, so the SAM loss would never act. Lower it.")
    if "sam_backend" in cfg and cfg["sam_checkpoint"] is None and not cfg["sam_random_init"] \
            and cfg["sam_backend"] != "litemedsam":
        raise ConfigError(f"Setting 'sam_checkpoint' is required for sam_backend '{cfg['sam_backend']}': give the "
                          f"path of its weights (no weights are downloaded), e.g. "
                          f"nnUNet_samssl_overrides=\"sam_checkpoint=/path/to/weights.pth\".")


def describe(schema: Iterable[Option]) -> str:
    """Human-readable list of settings (used by the README and ``--help`` texts)."""
    return "\n".join(f"{o.name}: {o.doc}" for o in schema)
