"""The schema of a model folder's ``config.json``, checked when a model is loaded.

Each key is declared once — its name, whether it is required, and the type it must have —
and :func:`check_model_config` reports the first violation in one line naming the file, the
key, the expected type and what was found, e.g. ``config.json: key 'data_shape' must be a
list of positive integers, got str '1,8,8'``. The schedule's parameters are checked per kind
against the schedule's own constructor, the network's against its class's constructor
(:func:`check_arguments`), so a new schedule or network needs no schema edit.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsolve.ode.model import PREDICTION_ALIASES
from diffsolve.ode.schedule import SCHEDULES, VPDiscrete

__all__ = ["ConfigError", "Key", "check_arguments", "check_model_config"]


class ConfigError(ValueError):
    """A ``config.json`` that does not follow the schema (one-line message)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_positive_int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) and v > 0 for v in value)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_number(v) for v in value)


@dataclass(frozen=True)
class Key:
    """One key of a JSON object: its name, the type it must have (in words and as a
    check), and whether it must be present."""

    name: str
    expected: str
    check: Callable[[Any], bool]
    required: bool = False


MODEL_KEYS = (
    Key("network", "an object", lambda v: isinstance(v, dict), required=True),
    Key("schedule", "an object with a 'kind'", lambda v: isinstance(v, dict), required=True),
    Key(
        "prediction",
        f"one of {sorted(PREDICTION_ALIASES)}",
        lambda v: isinstance(v, str) and v in PREDICTION_ALIASES,
        required=True,
    ),
    Key(
        "time_input",
        "one of ['auto', 'sigma', 't', 'timestep']",
        lambda v: v in ("auto", "sigma", "t", "timestep"),
    ),
    Key("data_shape", "a list of positive integers", _is_positive_int_list, required=True),
    Key("conditioning", "an object or null", lambda v: v is None or isinstance(v, dict)),
    Key("name", "a string", lambda v: isinstance(v, str)),
    Key("description", "a string", lambda v: isinstance(v, str)),
)
CONDITIONING_KEYS = (
    Key("num_classes", "a positive integer", lambda v: _is_int(v) and v > 0, required=True),
    Key("null_class", "an integer", _is_int),
    Key("label_dropout", "a number", _is_number),
)
#: VP discrete schedules given by their arrays instead of diffusers' beta parameters.
VP_ARRAYS = (
    Key("alphas_cumprod", "a list of numbers", _is_number_list),
    Key("betas", "a list of numbers", _is_number_list),
    Key("t_max", "a number", _is_number),
)


def check_model_config(config: Any, path: str | Path) -> None:
    """Check a model folder's parsed ``config.json`` (at ``path``) against the schema;
    raise :class:`ConfigError` naming the file, the key and the expected type."""
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must be a JSON object, got {_describe(config)}")
    check_keys(config, MODEL_KEYS, path)
    if isinstance(config.get("conditioning"), dict):
        check_keys(config["conditioning"], CONDITIONING_KEYS, path, "conditioning.")
    _check_schedule(config["schedule"], path)


def check_keys(
    mapping: Mapping[str, Any], keys: Sequence[Key], path: str | Path, prefix: str = ""
) -> None:
    """Check the declared ``keys`` of ``mapping`` (``prefix``: where it sits in the file)."""
    for key in keys:
        if key.name not in mapping:
            if key.required:
                raise ConfigError(
                    f"{path}: missing required key {prefix + key.name!r} ({key.expected})"
                )
            continue
        if not key.check(mapping[key.name]):
            raise ConfigError(
                f"{path}: key {prefix + key.name!r} must be {key.expected}, got "
                f"{_describe(mapping[key.name])}"
            )


def _check_schedule(schedule: dict[str, Any], path: str | Path) -> None:
    kind = schedule.get("kind")
    if kind not in SCHEDULES:
        raise ConfigError(
            f"{path}: key 'schedule.kind' must be one of {sorted(SCHEDULES)}, got "
            f"{_describe(kind)}"
        )
    parameters = {k: v for k, v in schedule.items() if k != "kind"}
    if kind == VPDiscrete.kind and any(k.name in parameters for k in VP_ARRAYS):
        check_keys(parameters, VP_ARRAYS, path, "schedule.")
        unknown = sorted(set(parameters) - {k.name for k in VP_ARRAYS})
        if unknown:
            raise ConfigError(
                f"{path}: unknown key 'schedule.{unknown[0]}' for a {kind} schedule given by "
                "'alphas_cumprod' or 'betas'"
            )
        return
    factory = VPDiscrete.from_diffusers if kind == VPDiscrete.kind else SCHEDULES[kind]
    check_arguments(factory, parameters, path, "schedule.")


def check_arguments(
    factory: Callable[..., Any], arguments: Mapping[str, Any], path: str | Path, prefix: str
) -> None:
    """Check JSON ``arguments`` for ``factory`` against its signature: every name known,
    every value of the annotated type (``int``, ``float``, ``bool``, ``str``, ``Literal``,
    optional and sequence types; others are not checked)."""
    signature = inspect.signature(factory)
    hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    known = [n for n, p in signature.parameters.items() if n != "self" and p.kind != p.VAR_KEYWORD]
    for name, value in arguments.items():
        if name not in known:
            raise ConfigError(
                f"{path}: unknown key {prefix + name!r}; expected one of {sorted(known)}"
            )
        hint = hints.get(name)
        if hint is not None and not _matches(value, hint):
            raise ConfigError(
                f"{path}: key {prefix + name!r} must be {_hint_words(hint)}, got "
                f"{_describe(value)}"
            )


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type annotation (unknown annotations always fit)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = args[0] if args else Any
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    return True


def _hint_words(hint: Any) -> str:
    """An annotation in words: ``int | None`` → ``an integer or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_words(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple, Sequence):
        return f"a list of {_hint_words(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    words = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return "null" if hint is type(None) else words.get(hint, str(hint))


def _describe(value: Any) -> str:
    """A found value for an error message: its JSON type and a short repr."""
    if value is None:
        return "null"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:40]}" + (
        "..." if len(text) > 40 else ""
    )
