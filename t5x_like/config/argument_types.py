"""A run's settings checked against their type annotations, before any work starts.

Gin passes whatever a binding says: `--gin.TRAIN_STEPS="'ten'"` hands train() the
string 'ten', which used to fail only when first compared with a number, after the
model was built and compiled. `check` compares each value with the annotation of
its parameter (train()'s arguments, RunConfig's fields) and names the gin binding
and the type it needs. One function, used by every configurable entry point of a
run, so the annotations are the only statement of what a setting must be.

Checked: bool, int, float (an int will do), str, None, Literal[...], unions of these
(`int | None`), and plain classes (isinstance). Protocols, callables and generic
containers are left to the code that uses them.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from t5x_like import errors


class ArgumentTypeError(errors.ConfigError, TypeError):
    """A setting has the wrong type (e.g. a quoted number bound through gin)."""


def check(fn_or_cls: Callable[..., Any], values: Mapping[str, Any]) -> None:
    """Raises ArgumentTypeError for the first value that does not fit its annotation."""
    # The name gin files use: the module as they import it, then the function.
    selector = f"{fn_or_cls.__module__.rpartition('.')[2]}.{fn_or_cls.__qualname__}"
    for name, value in values.items():
        hint = _annotation(fn_or_cls, name)
        if hint is not None and not _fits(value, hint):
            raise ArgumentTypeError(
                f"gin binding {selector}.{name} is {value!r} "
                f"({_a(type(value).__name__)}); it must be {_describe(hint)}",
                fix=f"{_correction(value, hint)} where it is set (a gin file, a "
                "--gin.NAME=VALUE flag, or the macro it refers to)")


def _annotation(fn_or_cls: Callable[..., Any], name: str) -> Any:
    """The parameter's annotation as a type, or None when absent or unresolvable
    (e.g. a name imported only for type checkers)."""
    annotation = getattr(fn_or_cls, "__annotations__", {}).get(name)
    if not isinstance(annotation, str):       # `from __future__ import annotations`
        return annotation
    namespace = vars(sys.modules[fn_or_cls.__module__])
    try:
        return eval(annotation, dict(namespace))  # noqa: S307 - the module's own annotation
    except (NameError, AttributeError, TypeError, SyntaxError):
        return None


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) \
            and not isinstance(value, bool)
    if origin is None and isinstance(hint, type) and not _is_protocol(hint):
        return isinstance(value, hint)
    return True                                # generics, protocols, callables


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(hint))
    if hint is None or hint is type(None):
        return "None"
    names = {bool: "True or False", int: "an int", float: "a number", str: "a string"}
    return names.get(hint) or _a(getattr(hint, "__name__", str(hint)))


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _correction(value: Any, hint: Any) -> str:
    """"write 5, not '5'" when a quoted string holds what the parameter needs."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                parsed = parse(value)
            except ValueError:
                continue
            if _fits(parsed, hint):
                return f"write {parsed!r}, not {value!r} (quotes make a string),"
            break
    return f"bind {_describe(hint)}"
