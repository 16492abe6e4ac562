"""The user interface: the only place that prints.

Human-readable output goes through rich; ``--json`` prints one JSON document on
stdout and nothing else there; ``-q`` silences progress and chatter (errors still
go to stderr). Progress bars draw on stderr so stdout stays pipeable.

User text is never markup. Every message, table cell, title and caption is printed
literally (``rich.markup.escape``), so a path like ``ckpt[best].safetensors`` or a
folder named ``[/red]`` prints as it is instead of vanishing or crashing rich. Our own
styling is opt-in: a ``Markup`` string (with values inside it passed through ``esc``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table


PIPED_WIDTH = 160


class Markup(str):
    """A string of our own rich markup (styles we chose); every other string is printed
    literally. Build it with ``esc`` around each value: ``Markup(f"[bold]{esc(path)}[/bold]")``."""


_CONTROL = {c: f"\\x{c:02x}" for c in range(32) if c not in (9, 10)}


def printable(text: str) -> str:
    """Text any terminal can take: a lone surrogate (a non-UTF-8 file name as Python reads
    it) as ``\\udcxx`` instead of a UnicodeEncodeError, control characters as ``\\xNN``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").translate(_CONTROL)


def esc(value: Any) -> str:
    """``value`` as text with rich markup escaped (for use inside a ``Markup`` string)."""
    return escape(printable(str(value)))


def literal(value: Any) -> Any:
    """What rich should print for ``value``: a ``Markup`` string as markup, any other
    string escaped, anything else (a renderable) unchanged."""
    if isinstance(value, Markup):
        return printable(str(value))
    if isinstance(value, str):
        return escape(printable(value))
    return value


def literal_table(table: Table) -> Table:
    """Escape every cell, the title and the caption of ``table`` unless it is ``Markup``:
    tables show file names, layer names and device specs, which are user text."""
    table.title = literal(table.title) if table.title is not None else None
    table.caption = literal(table.caption) if table.caption is not None else None
    for column in table.columns:
        column.header = literal(column.header)
        column._cells = [literal(c) for c in column._cells]
    return table


class UI:
    def __init__(self, quiet: bool = False, json_mode: bool = False, debug: bool = False) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self.debug = debug
        # emoji off: ':smile:' in a file name is text, not a picture
        self.out = Console(highlight=False, soft_wrap=True, emoji=False)
        self.err = Console(stderr=True, highlight=False, emoji=False)
        for console in (self.out, self.err):
            # Piped into a log or CI, rich assumes 80 columns and squeezes the tables into
            # ellipses; a log has no width, so give it room unless COLUMNS says otherwise.
            if not console.is_terminal and "COLUMNS" not in os.environ:
                console.width = PIPED_WIDTH

    # -- plain output -------------------------------------------------------
    def info(self, msg: str) -> None:
        """Chatter: shown unless -q or --json. Literal text unless ``msg`` is ``Markup``."""
        if not (self.quiet or self.json_mode):
            self.err.print(literal(msg))

    def result(self, msg: str) -> None:
        """A result line a human asked for (suppressed only by --json)."""
        if not self.json_mode:
            self.out.print(literal(msg))

    def warn(self, msg: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {literal(msg)}")

    def assumed(self, msg: str) -> None:
        """A value the command defaulted because nobody gave it: one line on stderr that
        -q does not hide (a guess must never pass silently); in --json it is data."""
        self.err.print(f"[bold yellow]assumed:[/bold yellow] {msg}", soft_wrap=True)

    def error(self, msg: str) -> None:
        """The one error line: printed whole, never wrapped (a path may be long)."""
        one = " ".join(printable(str(msg)).splitlines())         # one line, whatever the path holds
        self.err.print(f"[red]error:[/red] {literal(Markup(msg) if isinstance(msg, Markup) else one)}",
                       soft_wrap=True)

    def table(self, table: Table) -> None:
        if not self.json_mode:
            self.out.print(literal_table(table))

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
        sys.stdout.flush()

    # -- progress -----------------------------------------------------------
    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress]:
        """A rich progress bar on stderr, disabled under -q/--json."""
        prog = Progress(SpinnerColumn(), TextColumn("{task.description}", style="progress.description",
                                                    markup=False),
                        BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}", markup=False),
                        console=self.err, disable=self.quiet or self.json_mode, transient=False)
        with prog:
            yield prog

    @contextlib.contextmanager
    def status(self, msg: str) -> Iterator[None]:
        if self.quiet or self.json_mode:
            yield
        else:
            with self.err.status(literal(msg)):
                yield


def _json_default(o: Any) -> Any:
    import dataclasses
    from pathlib import Path
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
