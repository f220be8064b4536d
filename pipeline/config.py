"""Load and validate the pipeline configuration.

The single source of truth is ``config/schema.yaml`` (JSON schema, draft 2020-12). Validation
fills defaults recursively and rejects unknown keys, so every value the code reads is declared
and documented in the schema. The package is used from its checkout (``pip install -e .``), as
the Snakefile and the schema live there.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.exceptions import ConfigError

SCHEMA = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def load_schema() -> dict:
    if not SCHEMA.is_file():
        raise ConfigError(
            f"schema '{SCHEMA}' not found: install the package from its checkout "
            "with pip install -e ."
        )
    with open(SCHEMA) as fh:
        return yaml.safe_load(fh)


def _extend_with_default(validator_class):
    """A validator that fills ``default`` values before validating properties.

    This is the recipe from the jsonschema FAQ; defaults of nested objects are filled because
    the parent default (``{}``) is inserted first and then validated recursively.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_default(jsonschema.Draft202012Validator)


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<top level>"


def validate(config: Mapping[str, Any]) -> dict:
    """Validate ``config`` against the schema and return a copy with defaults filled.

    Raises:
        ConfigError: naming the offending key, the problem and the allowed values.
    """
    cfg = copy.deepcopy(dict(config))
    validator = _Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        hint = ""
        if err.validator == "additionalProperties":
            hint = " (unknown key: check its spelling against config/schema.yaml)"
        elif err.validator == "enum":
            hint = f" (valid choices: {', '.join(map(str, err.validator_value))})"
        raise ConfigError(f"config key '{_key_path(err)}': {err.message}{hint}")
    return cfg


def coerce_types(config: dict, schema: dict | None = None) -> dict:
    """Convert string values to the number or boolean their schema entry declares, in place.

    ``snakemake --config section='{key: 5}'`` delivers nested values as strings; parsing them
    as YAML scalars where the schema expects a number, integer or boolean makes such overrides
    behave like the same value written in config.yaml. Other values are left for validation.
    """
    schema = load_schema() if schema is None else schema
    props = schema.get("properties", {})
    for key, value in config.items():
        sub = props.get(key)
        if sub is None:
            continue
        types = sub.get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if isinstance(value, dict):
            coerce_types(value, sub)
        elif isinstance(value, list) and isinstance(sub.get("items"), dict):
            item_types = sub["items"].get("type")
            if item_types in ("number", "integer", "boolean"):
                config[key] = [_scalar(v) for v in value]
        elif isinstance(value, str) and {"number", "integer", "boolean", "null"} & set(types):
            config[key] = _scalar(value)
    return config


def _scalar(value):
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.subkey=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    cfg = copy.deepcopy(config)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = cfg
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return cfg


def load_config(
    path: str | Path | None = None,
    *,
    json_text: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Read a YAML file and/or a JSON string, apply ``key=value`` overrides, validate.

    The Snakefile passes the already-validated sections a step needs as JSON (so that a
    ``snakemake --config`` override reaches the step); the command line uses a YAML file.
    """
    cfg: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            with open(path) as fh:
                cfg = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
    if json_text:
        try:
            cfg.update(json.loads(json_text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from None
    return validate(coerce_types(apply_overrides(cfg, overrides)))


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a configuration (sorted JSON), recorded in provenance."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scatter_uses_emulator(laplace: Mapping[str, Any]) -> bool:
    """Whether the ``laplace`` config section fits a scatter model that takes the offset of
    the predicted labels from the emulator's (``scatter_emulator``; 'linear' scatter only):
    its laplace and ensemble_scatter jobs then need the emulator file."""
    return laplace["scatter"] == "linear" and bool(laplace.get("scatter_emulator", True))
