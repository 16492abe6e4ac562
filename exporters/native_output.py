"""Capture what native libraries write straight to file descriptors 1 and 2.

TensorFlow's converter, its MLIR quantizer and LiteRT's delegates print from C++
(``fully_quantize: 0, inference_type: 6 ...``, ``INFO: Created TensorFlow Lite XNNPACK
delegate``, absl's "log messages before InitializeLog") regardless of Python's
``sys.stdout`` and of ``TF_CPP_MIN_LOG_LEVEL``. Below ``pipeline/`` nothing may print, so
those writes are sent to a temporary file for the duration of the call; the text is kept
so that an error message can quote it.

``quiet`` is the one way the exporters silence a converter: logging and warnings muted,
Python's streams and the native descriptors captured, what was printed kept for errors.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import Iterator


class NativeOutput:
    """What the native code wrote while captured (filled in when the block exits)."""

    def __init__(self) -> None:
        self.text = ""

    def tail(self, lines: int = 5) -> str:
        return " | ".join(ln.strip() for ln in self.text.strip().splitlines()[-lines:] if ln.strip())


@contextlib.contextmanager
def captured_native_output(fds: tuple[int, ...] = (1, 2)) -> Iterator[NativeOutput]:
    """Redirect the process-wide descriptors ``fds`` to one temporary file.

    Python's own streams are flushed first so nothing written before is lost or
    reordered; the descriptors are restored even when the block raises. Where a
    descriptor cannot be duplicated (an embedding host without one), the block runs
    uncaptured rather than failing.
    """
    captured = NativeOutput()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in fds:
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:
                    continue
                os.dup2(sink.fileno(), fd)
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


@contextlib.contextmanager
def quiet(*, native: bool = True, python_stdout: bool = False,
          python_stderr: bool = True) -> Iterator[NativeOutput]:
    """Below ``pipeline/`` nothing prints: for the duration, logging is disabled at WARNING
    and below (process-wide: an export is not concurrent with other work here), warnings
    are ignored, and what is written is captured: Python's ``sys.stderr`` (and with
    ``python_stdout`` its ``sys.stdout``), and with ``native`` the descriptors 1 and 2 that
    C++ libraries write to. Yields what was written, filled in on exit (Python's stdout,
    then its stderr, then the native text): its tail can go into an error message.

    ``python_stderr=False`` leaves ``sys.stderr`` alone; the descriptors still catch what
    reaches them (ExecuTorch's ``execute``: a Python object there hung or aborted it when
    XNNPACK's workers wrote to it without the GIL)."""
    captured = NativeOutput()
    out, err = io.StringIO(), io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    fds = NativeOutput()                      # stays empty unless ``native``
    try:
        with captured_native_output() if native else contextlib.nullcontext(fds) as fds, \
                warnings.catch_warnings(), \
                contextlib.redirect_stdout(out) if python_stdout else contextlib.nullcontext(), \
                contextlib.redirect_stderr(err) if python_stderr else contextlib.nullcontext():
            warnings.simplefilter("ignore")
            yield captured
    finally:
        logging.disable(previous)
        captured.text = out.getvalue() + err.getvalue() + fds.text
