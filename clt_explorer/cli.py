"""Command-line options generated from dataclasses: each field becomes ``--field-name`` with its type,
and the docstring written under the field becomes its help text, so that no setting is listed twice."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Iterable


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (``x: int = 1`` then ``\"\"\"What x is.\"\"\"``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (e.g. a frozen install): no help texts, same options
        return {}
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _scalar_type(annotation: Any) -> type | None:
    """int, float, str or bool for ``T`` and ``T | None``; None for anything else."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else None
    return annotation if annotation in (int, float, str, bool) else None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: Iterable[str] = (),
                            group: str | None = None) -> list[str]:
    """Add ``--name`` for every scalar field of ``cls`` (default None: "not given"); returns the field names."""
    target = parser.add_argument_group(group) if group else parser
    hints, docs, added = typing.get_type_hints(cls), field_docs(cls), []
    for field in dataclasses.fields(cls):
        kind = _scalar_type(hints[field.name])
        if field.name in exclude or kind is None:
            continue
        default = "" if field.default in (dataclasses.MISSING, None) else f" (default {field.default}, or the preset's)"
        flag = f"--{field.name.replace('_', '-')}"
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=docs.get(field.name, "") + default)
        else:
            target.add_argument(flag, type=kind, metavar=kind.__name__.upper(), help=docs.get(field.name, "") + default)
        added.append(field.name)
    return added


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
