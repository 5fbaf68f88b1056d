"""A griffe extension for the API reference (loaded by mkdocstrings, see mkdocs.yml).

``AttrsInit``: attrs writes ``__init__`` at import time, so static analysis sees none and
``ImageRequest`` would have no signature. It is rebuilt from the annotated fields, the way
griffe's built-in dataclass support does (``attrs.field`` arguments ``kw_only``,
``default``, ``factory`` and ``init`` are honoured).
"""

from __future__ import annotations

from typing import Any

import griffe

_ATTRS_DECORATORS = frozenset(
    f"{module}.{name}"
    for module in ("attrs", "attr")
    for name in ("frozen", "define", "mutable", "s", "attrs")
)


def _is_attrs_class(cls: griffe.Class) -> bool:
    for decorator in cls.decorators:
        value = decorator.value
        if isinstance(value, griffe.ExprCall):
            value = value.function
        path = value.canonical_path if isinstance(value, griffe.Expr) else str(value)
        if path in _ATTRS_DECORATORS:
            return True
    return False


def _field_arguments(attribute: griffe.Attribute) -> dict[str, Any] | None:
    """The keyword arguments of ``attrs.field(...)``, or None for a plain default."""
    value = attribute.value
    if isinstance(value, griffe.ExprCall) and value.function.canonical_path in (
        "attrs.field",
        "attr.ib",
    ):
        return {
            argument.name: argument.value
            for argument in value.arguments
            if isinstance(argument, griffe.ExprKeyword)
        }
    return None


class AttrsInit(griffe.Extension):
    """Create the ``__init__`` of attrs classes during static analysis."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if "__init__" in cls.members or not _is_attrs_class(cls):
            return
        positional: list[griffe.Parameter] = []
        keyword_only: list[griffe.Parameter] = []
        for member in list(cls.members.values()):
            if not isinstance(member, griffe.Attribute) or member.annotation is None:
                continue
            if "property" in member.labels or (
                "class-attribute" in member.labels and "instance-attribute" not in member.labels
            ):
                continue
            arguments = _field_arguments(member)
            default: str | griffe.Expr | None = member.value
            kw_only = False
            if arguments is not None:
                if str(arguments.get("init")) == "False":
                    continue
                kw_only = str(arguments.get("kw_only")) == "True"
                default = arguments.get("default")
                if "factory" in arguments:
                    default = griffe.ExprCall(function=arguments["factory"], arguments=[])
            kind = (
                griffe.ParameterKind.keyword_only
                if kw_only
                else griffe.ParameterKind.positional_or_keyword
            )
            parameter = griffe.Parameter(
                member.name.lstrip("_"), annotation=member.annotation, kind=kind, default=default
            )
            (keyword_only if kw_only else positional).append(parameter)
        self_parameter = griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)
        init = griffe.Function(
            "__init__",
            lineno=cls.lineno,
            endlineno=cls.lineno,
            parent=cls,
            parameters=griffe.Parameters(self_parameter, *positional, *keyword_only),
            returns="None",
        )
        cls.set_member("__init__", init)
