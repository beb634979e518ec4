"""Relighter plugins: the API (:class:`Relighter`), the registry and the built-ins."""

from .base import (
    BUILTINS,
    ENTRY_POINT_GROUP,
    Relighter,
    RelighterOptions,
    available,
    create,
    describe_options,
    parse_options,
    resolve,
)

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "Relighter",
    "RelighterOptions",
    "available",
    "create",
    "describe_options",
    "parse_options",
    "resolve",
]
