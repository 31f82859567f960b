"""Typed job configs: dataclasses loaded from YAML presets, overridden with dotted keys.

    cfg = load_config(TrainConfig, "pipelines/configs/digits_tiny.yaml",
                      overrides=["train.lr=3e-4", "data.batch_size=64"])

An unknown key or a value of the wrong type raises ConfigError naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the source."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; it is still the number people mean.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    # Nested sections not mentioned still get their defaults through default_factory.
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config from `to_dict` output (e.g. after crossing into a Ray worker)."""
    return _build(cls, data)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Put `value` at `dotted` ("optim.lr") in a nested dict such as `to_dict` gives."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[T],
    preset: str | Path | list[str | Path] | None = None,
    overrides: list[str] | None = None,
) -> T:
    """Build `cls` from its defaults, then YAML presets in order (a later one overrides
    an earlier one's keys), then dotted overrides."""
    data = to_dict(cls())
    presets = preset if isinstance(preset, list) else [] if preset is None else [preset]
    for item in presets:
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"config preset not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config preset must be a mapping")
        try:
            _build(cls, loaded)  # name unknown keys against the preset file itself
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        data = merge(data, loaded)
    for item in overrides or []:
        key, value = _parse_override(item)
        set_dotted(data, key, value)
    return _build(cls, data)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.001, ...}: the shape MLflow params want."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_preset(name_or_path: str, presets_dir: Path) -> Path:
    """A preset is a file path, or a name of a YAML file in the presets directory."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = presets_dir / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in presets_dir.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {', '.join(known)}")
    return candidate


def add_config_arguments(
    parser: argparse.ArgumentParser, default_preset: str | list[str] | None
) -> None:
    defaults = [default_preset] if isinstance(default_preset, str) else default_preset
    parser.add_argument(
        "--config",
        action="append",
        help="preset name in pipelines/configs/ or a YAML path; repeat it to layer presets, "
        f"later ones overriding earlier ones (default: {' '.join(defaults or ['none'])})",
    )
    parser.set_defaults(default_presets=defaults or [])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def config_from_args(cls: type[T], args: argparse.Namespace, presets_dir: Path) -> T:
    """The config the command line names: its presets (or the job's default ones), then
    its --set overrides."""
    names = args.config or args.default_presets
    return load_config(cls, [resolve_preset(n, presets_dir) for n in names], args.overrides)
