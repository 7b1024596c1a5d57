"""Typed YAML to dataclasses: every value checked against its annotation, every error naming the key
path (`stages.sft.args.max_steps: expected int, got 'ten'`) and what is allowed there."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

__all__ = ["RecipeError", "build", "check_finite", "convert", "join_path"]


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key path."""


def _item_path(path: str, i: int, value: Any) -> str:
    """`stages.sft` for a named stage, `x[3]` otherwise."""
    named = path == "stages" and isinstance(value, dict) and isinstance(value.get("name"), str)
    return f"stages.{value['name']}" if named else f"{path}[{i}]"


def check_finite(data: Any, path: str) -> None:
    """NaN and infinity pass every `> 0` check and train to garbage; refuse them anywhere."""
    if isinstance(data, float) and not math.isfinite(data):
        raise RecipeError(f"{path or 'recipe'}: must be a finite number, got {data}.")
    if isinstance(data, dict):
        for key, value in data.items():
            check_finite(value, join_path(path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            check_finite(value, _item_path(path, i, value))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return convert(value, option, path)
            except RecipeError as err:
                errors.append((option, err))
        sections = [err for option, err in errors if dataclasses.is_dataclass(option)]
        if isinstance(value, dict) and len(sections) == 1:
            raise sections[0]  # a mapping for a section: its own error (an unknown key, …) says more
        allowed = " or ".join(_type_name(o) for o in options)
        raise RecipeError(f"{path}: expected {allowed}, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {value!r}.")
        (item,) = typing.get_args(tp)
        return [convert(v, item, _item_path(path, i, v)) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{path}: expected one of {list(typing.get_args(tp))}, got {value!r}.")
        return value
    if not isinstance(tp, type):
        return value  # an annotation this checker does not know: transformers checks it
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-3" (no dot) as a string.
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            check_finite(number, path)
            return number
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    return value


def build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RecipeError(f"{join_path(path, key)}: unknown key{hint}; allowed: {sorted(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(data[name], hints[name], join_path(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{join_path(path, name)}: required key is missing.")
    return cls(**kwargs)


def join_path(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
