"""The one base class of every error dinowatch raises on purpose, and how messages name files."""

from __future__ import annotations

import os
from pathlib import Path


class DinowatchError(Exception):
    """Base of dinowatch's own errors; subclasses live beside the code that raises them."""


def readable(text: str | os.PathLike[str]) -> str:
    """A file name (or a message holding one) as valid UTF-8: undecodable bytes as `\\xNN`.

    Python holds bytes of a name that are not UTF-8 as lone surrogates (PEP 383), which
    neither JSON, SQLite text nor a UTF-8 log can carry. Valid text comes back unchanged.
    """
    text = os.fspath(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def existing_file(path: Path | None) -> Path | None:
    """A config validator for a file the daemon cannot start without: missing is a config
    error (exit 78). Raises ValueError naming the path."""
    if path is not None and not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path
