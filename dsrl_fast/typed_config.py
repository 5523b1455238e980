"""The typed-config engine of train, eval and plan: dataclass sections with coercion and checks, YAML files, dotted
``key=value`` overrides and help text from the field docs.

A config is a dataclass deriving from :class:`Section`; its fields are coerced to their annotated types when it is
built (int -> float, numeric strings -> float, lists -> tuples, mappings -> nested sections; bool is never a number)
and then checked by the section's ``_check``. Every error is one line naming the dotted key, what was expected and
what was received.
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeGuard, Union

import yaml


def is_section(hint: Any) -> TypeGuard[type]:
    """True for a section dataclass type (ModelConfig, ...), False for values and instances."""
    return isinstance(hint, type) and is_dataclass(hint)


def type_name(hint: Any) -> str:
    """Human name of a field type, as used in error messages."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])} values"
        return f"a list of {len(args)} {type_name(args[0])} values"
    if is_section(hint):
        return f"a mapping of {hint.__name__} fields"
    return hint.__name__


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the field type `hint`; TypeError naming `key` when it does not fit.

    Accepted conversions: int -> float, a numeric string -> float (PyYAML reads ``1e-6`` as a string),
    list -> tuple, mapping -> section dataclass. bool is never taken for int or float.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        if value is not None:
            try:
                return coerce(key, value, inner)
            except TypeError:
                pass
    elif value is not None:
        if hint is bool and isinstance(value, bool):
            return value
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if hint is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        if is_section(hint):
            if isinstance(value, hint):
                return value
            if isinstance(value, Mapping):
                return from_mapping(hint, value, key)
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    raise TypeError(f"{key} must be {type_name(hint)}, got {got}")


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type of each dataclass field of `cls` (class variables excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def from_mapping(cls: type, mapping: Mapping[str, Any] | None, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise ValueError naming the key path and the valid keys."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        where = prefix or "the config"
        raise TypeError(f"{where} must be a mapping of {cls.__name__} fields, got {type(mapping).__name__} {mapping!r}")
    valid = [f.name for f in fields(cls)]
    for key in mapping:
        if key not in valid:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ValueError(f"unknown config key {path!r}; valid keys{' of ' + prefix if prefix else ''}: "
                             f"{', '.join(valid)}")
    hints = field_hints(cls)
    # a YAML section whose entries are all commented out reads as null: it means "all defaults"
    kwargs = {k: {} if v is None and is_section(hints[k]) else v for k, v in mapping.items()}
    return cls(**kwargs)


def check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


def check_min(key: str, value: float | None, minimum: float, *, strict: bool = False) -> None:
    if value is None:
        return
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{key} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def check_max(key: str, value: float | None, maximum: float, *, strict: bool = False) -> None:
    if value is None:
        return
    if value > maximum or (strict and value == maximum):
        raise ValueError(f"{key} must be {'<' if strict else '<='} {maximum}, got {value!r}")


def check_not_empty(key: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{key} must be a non-empty string or null, got {value!r}")


class Section:
    """Type coercion of every field in __post_init__, then the section's own checks in `_check`."""

    SECTION: ClassVar[str] = ""

    def key(self, name: str) -> str:
        """The dotted key of field `name` (``optim.lr``)."""
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def __post_init__(self) -> None:
        for name, hint in field_hints(type(self)).items():
            value = coerce(self.key(name), getattr(self, name), hint)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{self.key(name)} must be a finite number, got {value!r}")
            setattr(self, name, value)
        self._check()

    def _check(self) -> None:
        raise NotImplementedError

    def _min(self, name: str, minimum: float, *, strict: bool = False) -> None:
        check_min(self.key(name), getattr(self, name), minimum, strict=strict)


def to_plain(value: Any) -> Any:
    """Dataclasses as nested dicts, tuples as lists (YAML- and JSON-safe)."""
    if is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


def leaf_hint(root: type, dotted: str) -> tuple[list[str], Any]:
    """Split a dotted key and find its field type in the config class `root`; ValueError naming the key and the
    valid keys if unknown."""
    parts = dotted.split(".")
    cls: Any = root
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not is_section(cls):
            raise ValueError(f"unknown config key {dotted!r}: {prefix!r} is a value, not a section")
        hints = field_hints(cls)
        if part not in hints:
            valid = ", ".join(f.name for f in fields(cls))
            raise ValueError(f"unknown config key {dotted!r}; valid keys{' of ' + prefix if prefix else ''}: {valid}")
        cls = hints[part]
    if is_section(cls):
        valid = ", ".join(f"{dotted}.{f.name}" for f in fields(cls))
        raise ValueError(f"config key {dotted!r} is a section; override its fields instead: {valid}")
    return parts, cls


def accepts_str(hint: Any) -> bool:
    return hint is str or str in typing.get_args(hint)


def apply_override(root: type, data: dict[str, Any], item: str) -> None:
    """Set the dotted `key=value` of `item` in the nested mapping `data` of config class `root` (the value parsed as
    YAML)."""
    if not isinstance(item, str):
        raise TypeError(f"overrides must be strings 'key=value', got {type(item).__name__} {item!r}")
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override must look like key=value (e.g. algo.switch_step=10), got {item!r}")
    parts, hint = leaf_hint(root, key)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if not accepts_str(hint):
            raise ValueError(f"{key}: cannot parse {text!r} as YAML ({exc})") from exc
        value = text
    if accepts_str(hint) and value is not None and not isinstance(value, str):
        value = text.strip()  # a string field keeps the literal text: wandb_project=2024 is the name "2024"
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise TypeError(f"{'.'.join(parts[:depth + 1])} must be a mapping, got {type(child).__name__} {child!r}")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike[str], root: type) -> dict[str, Any]:
    """The mapping in YAML file `path` (empty file: {}); one-line errors for a missing file, bad YAML or text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"config file {str(path)!r} must hold a mapping of {root.__name__} fields, "
                        f"got {type(data).__name__}")
    return data


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the class docstring's ``Attributes:`` block (continuation lines joined)."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    if not any(line.strip() == "Attributes:" for line in lines):
        return docs
    body = lines[[line.strip() for line in lines].index("Attributes:") + 1:]
    indent = None
    current = None
    for line in body:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth == indent:
            name, _, text = line.strip().partition(":")
            current = name
            docs[current] = text.strip()
        elif depth > indent and current is not None:
            docs[current] += " " + line.strip()
    return docs


def describe(root: type) -> str:
    """Every key of config class `root` with its type, its default and its documentation (the ``Attributes:`` block
    of its class docstring), one block per key; sections are walked recursively."""
    out = []

    def walk(cls: type, prefix: str, defaults: Any) -> None:
        docs = field_docs(cls)
        for name, hint in field_hints(cls).items():
            key = f"{prefix}{name}"
            value = getattr(defaults, name)
            if is_section(hint):
                walk(hint, f"{key}.", value)
                continue
            shown = "null" if value is None else yaml.safe_dump(to_plain(value), default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            out.append(f"  {key} ({type_name(hint)}, default {shown})\n      {docs.get(name, '')}")

    walk(root, "", root())
    return "\n".join(out)


def build(root: type, data: dict[str, Any], overrides: Sequence[str]) -> Any:
    """Config class `root` built from the nested mapping `data` with each dotted `key=value` override applied."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    for item in overrides:
        apply_override(root, data, item)
    return from_mapping(root, data, "")
