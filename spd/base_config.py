"""Strict, frozen pydantic base model and friendly validation errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config (file, dict or override) is invalid. The message names every bad field."""


class BaseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _loc(loc: tuple[Any, ...]) -> str:
    # Discriminated unions put the tag into the location ("losses.0.stochastic_recon.routing"); it is kept,
    # since it names which kind of loss entry the bad field belongs to.
    return ".".join(str(part) for part in loc)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = _loc(e["loc"]) or "<top level>"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  - {where}: {msg}{got_s}")
    return "\n".join(lines)


def validate(cls: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML; list items addressed by index: `losses.0.coeff=2`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like `path.to.field=value`")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value = yaml.safe_load(raw)
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {'.'.join(parts[:i]) or '<top>'} is a list of {len(node)} items; "
                        f"{part!r} is not a valid index"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a mapping or list")
    return data
