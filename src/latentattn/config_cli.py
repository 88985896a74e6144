"""Command-line options built from a config dataclass: one option per field, its help the field's
docstring, its default the dataclass's (shown in the help, never repeated by hand), as litgpt builds
its CLI from signatures.

A field `batch_size: int = 16` with a docstring below it becomes `--batch-size N` whose help ends in
"(default 16)". Options the user does not give are absent from the parsed namespace, so a caller can
tell "not given" from "given the default" (`--resume` takes a run's saved settings for the rest).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any

_METAVARS = {int: "N", float: "X"}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass `cls` (a string statement right after the
    annotated assignment, as PEP 257 and Sphinx read attribute docstrings), as one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _without_none(hint: Any) -> Any:
    """`X` for `X | None` (or Optional[X]); `hint` itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _default_text(default: Any) -> str:
    if default is dataclasses.MISSING or default is None or default is False or default == ():
        return ""
    return f" (default {default})"


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    choices: Mapping[str, tuple[Any, ...]] | None = None,
    metavars: Mapping[str, str] | None = None,
    flags: tuple[str, ...] = (),
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    show_defaults: bool = True,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One option per field of the dataclass `cls` except `exclude`: `--name-with-dashes`, typed from the
    annotation (`X | None` as X, tuples as one or more values, `Literal` as choices), `choices` from a
    registry where given. Booleans are `--x/--no-x`, except `flags` (plain `--x`). `aliases` gives a
    field's older option names, still accepted. A field without a default is required. Every exposed
    field must have a docstring (its help). `defaults` replace the dataclass's defaults in the help, for
    a caller that applies its own to the fields not given."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    choices, metavars, aliases, defaults = choices or {}, metavars or {}, aliases or {}, defaults or {}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        if field.name not in docs:
            raise TypeError(f"{cls.__name__}.{field.name} has no docstring to serve as its help")
        hint = _without_none(hints[field.name])
        help_text = docs[field.name]
        shown = _default_text(defaults.get(field.name, field.default))
        if show_defaults and shown:
            help_text = help_text.removesuffix(".") + shown + "."
        options: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        if hint is bool:
            options["action"] = "store_true" if field.name in flags else argparse.BooleanOptionalAction
        else:
            if typing.get_origin(hint) is tuple:
                hint = typing.get_args(hint)[0]
                options["nargs"] = "+"
            if typing.get_origin(hint) is typing.Literal:
                options["choices"] = typing.get_args(hint)
            else:
                options["type"] = hint
            if field.name in choices:
                options["choices"] = tuple(choices[field.name])
            if "choices" not in options:
                options["metavar"] = metavars.get(field.name, _METAVARS.get(hint, field.name.upper()))
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            options["required"] = True
        names = (field.name, *aliases.get(field.name, ()))
        parser.add_argument(*("--" + name.replace("_", "-") for name in names), **options)


def config_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` given on the command line, lists as tuples."""
    given = vars(args)
    names = [field.name for field in dataclasses.fields(cls) if field.name in given]
    return {name: tuple(given[name]) if isinstance(given[name], list) else given[name] for name in names}
