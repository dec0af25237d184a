"""Errors a person running training can act on: each says what is wrong and what to do.

The launcher prints a `RunError` as one line, `error: <what> — <fix>`, and exits
non-zero; the traceback goes to the run's log file (or the console with --verbose),
because it explains our code, not the problem. Anything that is not a RunError is a
bug and keeps its traceback.

Each subclass also derives from the built-in exception a caller would expect
(ValueError for a bad setting, FileNotFoundError for a missing file, ...), so code
that catches those keeps working.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class RunError(Exception):
    """Base class: `what` went wrong, and the `fix` (what to do about it)."""

    def __init__(self, what: str, *, fix: str):
        super().__init__(f"{what} — {fix}")
        self.what = what
        self.fix = fix

    def one_line(self) -> str:
        """The message without anything appended to str() on the way up (gin adds
        the configurable's name and file location to exceptions it passes on)."""
        return " ".join(f"{self.what} — {self.fix}".split())


class ConfigError(RunError, ValueError):
    """A setting is malformed or asks for something impossible."""


class InputNotFoundError(RunError, FileNotFoundError):
    """A file the run reads (data, vocabulary) does not exist."""


class DataError(RunError, ValueError):
    """The data exists but yields nothing to train on."""


class NotWritableError(RunError, PermissionError):
    """A directory the run writes to (MODEL_DIR, its checkpoints) is not writable."""



class LibraryChangedError(RunError, ImportError):
    """A library no longer has an internal that one of our adapters reaches for: it
    was upgraded past the versions that adapter was verified with."""

    def __init__(self, *, symbol: str, verified: str, adapter: str):
        library = symbol.split(".")[0]
        installed = getattr(sys.modules.get(library), "__version__", "unknown")
        super().__init__(
            f"{library} {installed} has no {symbol}, which {adapter} uses (verified with "
            f"{library} {verified})",
            fix=f"install {library} {verified}, or update {adapter} to {library} "
            f"{installed}")


def library_internal(symbol: str, *, verified: str, adapter: str) -> Any:
    """The object at `symbol` ("package.module.Class.attr"), importing modules on the
    way, for `adapter` (the one module that uses it); a LibraryChangedError naming it
    if the installed library lacks it, so an upgrade that moves an internal fails in
    one line, not deep in a traceback."""
    parts = symbol.split(".")
    found = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=2):
        try:
            found = getattr(found, part)
        except AttributeError:
            try:         # a submodule its package does not import itself
                found = importlib.import_module(".".join(parts[:depth]))
            except ImportError:
                raise LibraryChangedError(symbol=symbol, verified=verified,
                                          adapter=adapter) from None
    return found
