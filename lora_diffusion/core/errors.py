"""Error types. Each message names the module, key or field and what was expected."""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class for every error this library raises on bad input."""


class UnknownVariantError(AdapterError, KeyError):
    """A variant name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class TargetError(AdapterError):
    """Target patterns that match nothing, or a module that cannot be adapted."""


class AdapterFileError(AdapterError):
    """A file that cannot be read as an adapter (corrupt, pickle, wrong keys or shapes)."""
