"""The one error type the UI turns into a readable message (``gr.Error``) and one log line."""

from __future__ import annotations


class AppError(ValueError):
    """A request the app cannot serve; the message names the input (field, file) and what was expected."""
