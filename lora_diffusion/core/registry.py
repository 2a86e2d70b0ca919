"""The variant registry: one registration point per variant (a class decorator)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .adapter import Adapter
from .errors import AdapterError, UnknownVariantError

_REGISTRY: dict[str, type[Adapter]] = {}
A = TypeVar("A", bound=type[Adapter])


def register_variant(cls: A) -> A:
    """Register an Adapter subclass under ``cls.variant``; duplicates are refused."""
    name = cls.variant
    if not name or name != name.lower():
        raise ValueError(f"{cls.__name__}.variant must be a lowercase name, found {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"variant '{name}' is already registered by {_REGISTRY[name].__name__}")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[name] = cls
    return cls


def get_variant(name: str) -> type[Adapter]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownVariantError(
            f"unknown variant '{name}'; valid variants are: {', '.join(variant_names())}") from None


def variant_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_options(cls: type[Adapter], options: dict[str, Any]) -> Any:
    """Validate ``AdapterSpec.options`` against the variant's Options dataclass."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise AdapterError(
            f"AdapterSpec.options: unknown option(s) {unknown} for variant '{cls.variant}'; "
            f"valid options are {sorted(fields) or 'none'}")
    try:
        return cls.Options(**options)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"AdapterSpec.options for variant '{cls.variant}': {e}") from None
