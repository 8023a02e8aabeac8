"""Loading a :class:`~megatron_muon.config.schema.PretrainConfig` from YAML and dotted overrides with OmegaConf
structured configs: an unknown key or a value of the wrong type fails at once, with a one-line ``ConfigError``
naming the key (and the closest valid key). Loading does not validate (``checks.py``): the world size may not be
known yet.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from megatron_muon.config.errors import ConfigError, require
from megatron_muon.config.schema import PretrainConfig

__all__ = ["load_config", "to_yaml"]


def _unwrap(hint: Any) -> Any:
    """The dataclass inside ``hint`` (through Optional / unions and list elements), else ``hint``."""
    if typing.get_origin(hint) is list:
        return _unwrap(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(_unwrap(arg)):
                return _unwrap(arg)
    return hint


def _schema_paths(cls: type = PretrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (list elements as ``[]``) -> its type hint."""
    paths: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, hint = f"{prefix}{f.name}", hints[f.name]
        paths[path] = hint
        inner = _unwrap(hint)
        if dataclasses.is_dataclass(inner):
            suffix = "[]." if typing.get_origin(hint) is list else "."
            paths.update(_schema_paths(inner, path + suffix))
    return paths


def _field_hint(full_key: str) -> Any:
    """The type hint of ``full_key`` (``optimizer.betas[1]`` -> float), or None when it is not in the schema."""
    generic = re.sub(r"\[\d+\]", "[]", full_key)
    paths = _schema_paths()
    if generic in paths:
        return paths[generic]
    if generic.endswith("[]") and typing.get_origin(paths.get(generic[:-2])) is list:
        return typing.get_args(paths[generic[:-2]])[0]
    return None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _closest_key(unknown: str) -> str | None:
    """The valid dotted key most like ``unknown`` (``muon.lr`` -> ``optimizer.muon.lr``)."""
    index = re.search(r"\[\d+\]", unknown)
    generic = re.sub(r"\[\d+\]", "[]", unknown)
    paths = list(_schema_paths())
    suffixed = sorted((p for p in paths if p.endswith("." + generic)), key=len)
    match = suffixed[:1] or difflib.get_close_matches(generic, paths, n=1, cutoff=0.6)
    if not match:
        return None
    return match[0].replace("[]", index.group(0), 1) if index else match[0]


def _merge(base: DictConfig, other: DictConfig, where: str, override_key: str | None = None) -> DictConfig:
    """``base`` with ``other`` merged in; OmegaConf's errors become one-line ``ConfigError``s."""
    try:
        return typing.cast(DictConfig, OmegaConf.merge(base, other))
    except OmegaConfBaseException as error:
        raise _one_line_error(error, other, where, override_key) from None


def _one_line_error(error: OmegaConfBaseException, other: DictConfig, where: str, override_key: str | None):
    full_key = getattr(error, "full_key", None) or override_key or "?"
    if isinstance(error, ConfigKeyError | AttributeError) or "not in" in str(error).split("\n")[0]:
        owner = getattr(error, "object_type", None)
        if (
            "." not in full_key
            and owner is not None
            and owner is not PretrainConfig
            and dataclasses.is_dataclass(owner)
        ):
            # Inside a list entry OmegaConf loses the path and names only the key and its dataclass.
            fields = [f.name for f in dataclasses.fields(owner)]
            close = difflib.get_close_matches(full_key, fields, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {fields}"
            return ConfigError(f"unknown config key '{full_key}' in a {owner.__name__} entry ({where}){hint}")
        # OmegaConf names the first unknown level; an override names the whole key the user wrote.
        deeper = override_key is None or full_key.startswith((override_key + ".", override_key + "["))
        unknown = full_key if deeper else override_key
        suggestion = _closest_key(unknown)
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return ConfigError(f"unknown config key '{unknown}' ({where}){hint}")
    if isinstance(error, ValidationError):
        value = OmegaConf.select(other, full_key, default=None, throw_on_missing=False)
        expected = _field_hint(full_key)
        if expected is not None and value is not None and not isinstance(value, DictConfig):
            return ConfigError(f"{full_key}={value!r} is not a valid {_type_name(expected)} ({where})")
    first_line = str(error).split("\n")[0]
    return ConfigError(f"{full_key}: {first_line} ({where})")


def _list_item_key(merged: DictConfig, key: str, item: str) -> str | None:
    """``key`` in OmegaConf's index form (``data.blend[0].prefix``) when it reaches into a list of ``merged``
    (written ``data.blend.0.prefix`` or ``data.blend[0].prefix``); None when it does not.

    Raises:
        ConfigError: the index is not a number or is out of range (one line naming the key and the valid
            indices).
    """
    segments = [part for part in re.split(r"\.|\[(\d+)\]", key) if part]
    node: Any = merged
    canonical, through_list = "", False
    for segment in segments:
        if isinstance(node, ListConfig):
            through_list = True
            size = len(node)
            valid = f"valid indices 0..{size - 1}" if size else "the list is empty"
            require(
                segment.isdigit() and int(segment) < size,
                f"override {item!r}: {canonical} has {size} entr{'y' if size == 1 else 'ies'}, so {segment!r} is "
                f"not an index of it ({valid}); to set the whole list: {canonical}=[...]",
            )
            canonical += f"[{segment}]"
            node = node[int(segment)]
        elif isinstance(node, DictConfig) and segment in node:
            canonical += f".{segment}" if canonical else segment
            node = node[segment]
        elif isinstance(node, DictConfig) or node is None:  # an unknown key: the ordinary merge reports it
            canonical += f".{segment}" if canonical else segment
            node = None
        else:
            raise ConfigError(
                f"override {item!r}: {canonical}={node!r} is a single value, not a list or section; "
                f"set it as {canonical}=<value>"
            )
    return canonical if through_list else None


def _apply_list_item_override(merged: DictConfig, key: str, raw_value: str, item: str) -> None:
    """Set one item (or a field of one item) of a list in ``merged`` in place; errors as one line."""
    where = f"in override {item!r}"
    try:
        value = OmegaConf.from_dotlist([f"value={raw_value}"])["value"]
        OmegaConf.update(merged, key, value, merge=True)
    except ValidationError as error:
        full_key = getattr(error, "full_key", None) or key
        expected = _field_hint(full_key)
        valid = f"a valid {_type_name(expected)}" if expected is not None else "valid here"
        raise ConfigError(f"{full_key}={raw_value!r} is not {valid} ({where})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: {str(error).splitlines()[0]}") from None
    except OmegaConfBaseException as error:
        raise _one_line_error(error, DictConfig({}), where, key) from None


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> PretrainConfig:
    """The ``PretrainConfig`` of the YAML file at ``path`` (None: the defaults) with dotted ``overrides``
    (``model.hidden_size=128``, ``optimizer.muon.lr=0.01``, ``data.blend=[{prefix: a, weight: 1}]``, one list item
    by index: ``data.blend.0.prefix=b`` or ``optimizer.betas[1]=0.98``) applied in order. Raises ``ConfigError`` for an unknown key, a wrong type or an unreadable file; does not call
    :func:`validate` (the world size may not be known yet)."""
    merged = OmegaConf.structured(PretrainConfig)
    if path is not None:
        try:
            file_cfg = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        require(isinstance(file_cfg, DictConfig), f"{path}: the top level must be a mapping of sections")
        merged = _merge(merged, typing.cast(DictConfig, file_cfg), f"in {path}")
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        require(bool(sep) and bool(key.strip()), f"override {item!r} is not of the form key=value")
        list_item_key = _list_item_key(merged, key.strip(), item)
        if list_item_key is not None:  # OmegaConf cannot merge {blend: {0: ...}} into a list: set it in place
            _apply_list_item_override(merged, list_item_key, raw_value, item)
            continue
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as error:
            raise ConfigError(f"override {item!r}: {str(error).splitlines()[0]}") from None
        merged = _merge(merged, dotlist, f"in override {item!r}", override_key=key.strip())
    try:
        return typing.cast(PretrainConfig, OmegaConf.to_object(merged))
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} is required but not set") from None
    except OmegaConfBaseException as error:
        raise _one_line_error(error, merged, "while building the config", None) from None


def to_yaml(cfg: PretrainConfig) -> str:
    """The resolved config as YAML; :func:`load_config` reads it back to an equal ``PretrainConfig``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
