"""Checks of user-given values, each failing with one ConfigError line.

``check_type`` converts and checks a value from TOML, JSON or the command line against a
dataclass field's annotation; ``check_choice`` is the one "unknown X; choose one of"
message; ``resolve_device`` the one CUDA check.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

from .choices import DEVICES
from .errors import ConfigError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(name: str, value: object, choices: Iterable[str], *, extra: str = "") -> None:
    """Refuse ``value`` unless it is one of ``choices`` (``extra`` names other accepted forms)."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}{extra}")


def resolve_device(name: str) -> str:
    """"auto" (CUDA when torch sees a device, else CPU), "cpu" or "cuda" (refused without a device)."""
    import torch  # here, so that importing this module stays cheap

    check_choice("device", name, DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_type(name: str, annotation: Any, value: Any) -> Any:
    """Return value converted to the field's type (lists become tuples) or raise ConfigError."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return check_type(name, inner, value)
    if origin is Literal:
        if value not in get_args(annotation):
            choices = ", ".join(repr(choice) for choice in get_args(annotation))
            raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of integers, got {value!r}")
        return tuple(check_type(name, int, item) for item in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"no checker for the type of field {name}: {annotation!r}")  # a bug


def check_dataclass_fields(instance: Any) -> None:
    """check_type every field of a (frozen) dataclass instance, storing the converted values."""
    for name, annotation in typing.get_type_hints(type(instance)).items():
        object.__setattr__(instance, name, check_type(name, annotation, getattr(instance, name)))
