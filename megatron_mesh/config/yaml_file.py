"""YAML experiment files -> typed configuration. The only place raw user input is parsed.

A file may ``extends:`` one or more other files (paths relative to it, else to the project's
configs/ directory: ``PROJECT_CONFIGS``); later files and the
file's own keys override earlier ones, mappings merge key by key. ``--set a.b=value`` overrides
come last and are parsed as YAML values. Every key is checked against ``SCHEMA``: an unknown key
is an error naming the key, the file it came from and the closest valid key.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import yaml

from megatron_mesh.config.experiment import SECTIONS, section_keys, type_name, type_ok
from megatron_mesh.errors import ConfigError
from megatron_mesh.config.model import MODEL_KEYS, MeshConfig

SCHEMA: Dict[str, Tuple[str, ...]] = {
    "model": MODEL_KEYS, **{name: section_keys(name) for name in SECTIONS}}
"""Top-level sections and their keys (one schema for every file): ``model`` holds the MeshConfig
fields whose role is a model key (config.Role), the others are typed in
``megatron_mesh.config.experiment``; ``extends`` and ``description`` are also allowed."""

META_KEYS = ("extends", "description")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: PyYAML (YAML 1.1) reads `6e-4` as the string '6e-4'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A YAML scalar/collection from text, with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict, origins: dict, source: str, prefix: str = "") -> dict:
    """Deep-merge ``update`` into ``base``, recording which source set each leaf key."""
    merged = dict(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, origins, source, f"{path}.")
        else:
            merged[key] = value
            origins[path] = source
            if isinstance(value, dict):
                for sub in _leaf_paths(value, f"{path}."):
                    origins[sub] = source
    return merged


def _leaf_paths(tree: dict, prefix: str = "") -> Iterable[str]:
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaf_paths(value, f"{prefix}{key}.")


def _load_file(path: Path, origins: dict, chain: Tuple[Path, ...]) -> Dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'extends' cycle: {' -> '.join(map(str, (*chain, path)))}")
    data = _read_yaml(path)
    parents = data.pop("extends", None) or []
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: 'extends' must be a file path or a list of paths")
    tree: Dict[str, Any] = {}
    for parent in parents:
        # the parent's keys were recorded in `origins` while loading it
        tree = _merge(tree, _load_file(_parent_path(path, parent), origins, (*chain, path)), {}, "")
    return _merge(tree, data, origins, str(path))


PROJECT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The project's own configs/: where an ``extends:`` path is looked up when it is not beside
the file, so a config copied out of the repository (``cp configs/tiny-cpu.yml ~/mine.yml``)
still finds ``train/cpu-smoke.yml``."""


def _parent_path(path: Path, parent: str) -> Path:
    for candidate in (path.parent / parent, PROJECT_CONFIGS / parent):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{path}: extends {parent!r}: neither {path.parent / parent} nor "
                      f"{PROJECT_CONFIGS / parent} exists")


def _parse_override(item: str) -> Tuple[List[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or "" in key.strip().split("."):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. model.layout=4+8R2+4")
    return key.strip().split("."), parse_value(value)


def _nested(keys: Sequence[str], value: Any) -> Dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def _unknown_key(path: str, valid: Iterable[str], source: str) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown key '{path}'{hint}")


def _check_keys(tree: Dict[str, Any], origins: Dict[str, str]) -> None:
    sections = [*SCHEMA, *META_KEYS]
    for section, body in tree.items():
        if section in META_KEYS:
            continue
        if section not in SCHEMA:
            raise _unknown_key(section, sections, origins.get(section, "?"))
        if not isinstance(body, dict):
            raise ConfigError(f"{origins.get(section, '?')}: '{section}' must be a mapping")
        for key in body:
            if key not in SCHEMA[section]:
                valid = [f"{section}.{k}" for k in SCHEMA[section]]
                raise _unknown_key(f"{section}.{key}", valid, origins.get(f"{section}.{key}", "?"))


def load_config_tree(
    path, overrides: Sequence[str] = ()
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read ``path`` (with its ``extends``) and ``--set`` overrides; check every key.

    Returns the merged tree and, for every dotted key, the file (or '--set') that set it.
    """
    origins: Dict[str, str] = {}
    tree = _load_file(Path(path), origins, ())
    for item in overrides:
        keys, value = _parse_override(item)
        tree = _merge(tree, _nested(keys, value), origins, f"--set {item}")
    _check_keys(tree, origins)
    return tree, origins


def _check_type(key: str, value: Any, source: str) -> None:
    hint = typing.get_type_hints(MeshConfig)[key]
    if key == "layout" and isinstance(value, int) and not isinstance(value, bool):
        return  # 24 is a vanilla layout
    if not type_ok(value, hint):
        raise ConfigError(f"{source}: model.{key}={value!r} has type {type(value).__name__}, "
                          f"expected {type_name(hint)}")


def model_config(tree: Dict[str, Any], origins: Dict[str, str], **extra: Any) -> MeshConfig:
    """The typed model config of a loaded tree; ``extra`` adds non-YAML fields (e.g. parallelism)."""
    section = tree.get("model")
    if not section:
        raise ConfigError("no 'model' section: expected at least model.layout and the model shape")
    for key, value in section.items():
        _check_type(key, value, origins.get(f"model.{key}", "?"))
    try:
        return MeshConfig.from_section(section, **extra)
    except ValueError as err:  # MeshConfig's ConfigError, or megatron's own check of a value
        named = [k for k in section if k in str(err)] or list(section)
        raise ConfigError(f"{origins.get('model.' + named[0], '?')}: model: {err}") from None


def load_model_config(path, overrides: Sequence[str] = (), **extra: Any) -> MeshConfig:
    """``load_config_tree`` + ``model_config`` in one call."""
    tree, origins = load_config_tree(path, overrides)
    return model_config(tree, origins, **extra)
