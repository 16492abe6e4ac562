"""The user interface: the only place that prints.

Human-readable output goes through rich; ``--json`` prints one JSON document on
stdout and nothing else there; ``-q`` silences progress and chatter (errors still
go to stderr). Progress bars draw on stderr so stdout stays pipeable.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table


PIPED_WIDTH = 160


class UI:
    def __init__(self, quiet: bool = False, json_mode: bool = False, debug: bool = False) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self.debug = debug
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False)
        for console in (self.out, self.err):
            # Piped into a log or CI, rich assumes 80 columns and squeezes the tables into
            # ellipses; a log has no width, so give it room unless COLUMNS says otherwise.
            if not console.is_terminal and "COLUMNS" not in os.environ:
                console.width = PIPED_WIDTH

    # -- plain output -------------------------------------------------------
    def info(self, msg: str) -> None:
        """Chatter: shown unless -q or --json."""
        if not (self.quiet or self.json_mode):
            self.err.print(msg)

    def result(self, msg: str) -> None:
        """A result line a human asked for (suppressed only by --json)."""
        if not self.json_mode:
            self.out.print(msg)

    def warn(self, msg: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {msg}")

    def assumed(self, msg: str) -> None:
        """A value the command defaulted because nobody gave it: one line on stderr that
        -q does not hide (a guess must never pass silently); in --json it is data."""
        self.err.print(f"[bold yellow]assumed:[/bold yellow] {msg}", soft_wrap=True)

    def error(self, msg: str) -> None:
        self.err.print(f"[red]error:[/red] {msg}", soft_wrap=True)

    def table(self, table: Table) -> None:
        if not self.json_mode:
            self.out.print(table)

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
        sys.stdout.flush()

    # -- progress -----------------------------------------------------------
    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress]:
        """A rich progress bar on stderr, disabled under -q/--json."""
        prog = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                        BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                        console=self.err, disable=self.quiet or self.json_mode, transient=False)
        with prog:
            yield prog

    @contextlib.contextmanager
    def status(self, msg: str) -> Iterator[None]:
        if self.quiet or self.json_mode:
            yield
        else:
            with self.err.status(msg):
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
