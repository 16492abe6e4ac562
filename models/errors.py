"""The one exception type the CLI turns into a one-line message and exit code 2.

It lives in the lowest layer so that every layer (models, exporters, quantize,
device_tests) can raise it without importing upwards.
"""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input from the user: names the file, what was expected and what was found."""

    def __init__(self, source: str | Path | None, expected: str, found: str) -> None:
        self.source = str(source) if source is not None else None
        self.expected = expected
        self.found = found
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}expected {self.expected}, found {self.found}"
