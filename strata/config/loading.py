"""Reading configs: YAML (duplicate keys refused), ``key.sub=value`` overrides, validation into
one-line errors naming the file and the key, and back to plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from strata.config.base import ConfigError, _KeyedError
from strata.config.run import Config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> Config:
    """Read a YAML config (or a dict), apply ``key.sub=value`` overrides, validate.

    Raises ConfigError with a one-line message naming the file and the offending key.
    """
    source = str(path) if path is not None else "<config>"
    if data is None:
        if path is None:
            raise ConfigError("load_config needs a path or data")
        data = read_yaml(Path(path))
    else:
        data = _deep_copy(data)
    for override in overrides or []:
        apply_override(data, override, source)
    return validate_config(data, source)


def validate_config(data: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if not _is_internal_loc(part))
        message = first["msg"].removeprefix("Value error, ")
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyedError):
            key = f"{key}.{cause.key}" if key else cause.key
            message = cause.message
        elif first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        elif "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
        raise ConfigError(f"{source}: {key or '<top level>'}: {message}") from None


MODEL_KINDS = ("lm", "aunet")


def _is_internal_loc(part) -> bool:
    """Parts of a pydantic error location that are not keys of the file (validators, union tags)."""
    return str(part).startswith("function-after") or part in MODEL_KINDS


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A YAML mapping (``safe_load`` rules, a key given twice refused); ConfigError names the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: {'is a directory, not' if path.is_dir() else 'no such'} config file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where}: YAML syntax error: {error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read as YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict, override: str, source: str) -> None:
    """Apply one ``key.sub=value`` override to config data, the value read as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: override {override!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    set_key(data, key.strip(), value, source)


def set_key(data: dict, key: str, value: Any, source: str = "<config>") -> None:
    """Set the dotted ``key`` of config data to a value already parsed (an override's, or one a
    sweep file gives), creating mappings on the way; a number picks a list item."""
    value = _deep_copy(value)  # the caller's value may be set into several configs
    parts = key.split(".")
    node = data
    for index, part in enumerate(parts):
        where = ".".join(parts[: index + 1])
        if isinstance(node, list):  # a list item by number: model.stages.1.d_model=128
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: {where}: {'.'.join(parts[:index])} is a list of {len(node)}; use an index 0..{len(node) - 1}")
            part = int(part)
        if index == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part) if isinstance(node, dict) else node[part]
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"{source}: {where}: is a value, cannot set {key} below it")
        node = child


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def config_to_dict(config: Config) -> dict:
    """The fully resolved config (layout spelled out, defaults filled) as plain data for YAML."""
    return config.model_dump(mode="json")
