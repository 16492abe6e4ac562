"""Atomic writes: a failed stage leaves no half-written file and overwrites nothing.

Everything the pipeline writes goes to a temporary name in the same folder and is
renamed into place (``os.replace`` is atomic on POSIX within one filesystem).
Whole output folders are built in a temporary sibling and swapped in at the end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from models.errors import InputError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a tool that writes files itself
    (``torch.save``, ``onnx.save``, ``mlmodel.save``); renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def check_writable_output(out_dir: str | Path, force: bool) -> None:
    """Refuse to touch an existing, non-empty output folder unless ``force``."""
    out = Path(out_dir)
    check_output_location(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(out, "a new or empty output folder (or --force)",
                         "an existing folder with results in it")


_PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output_location(out_dir: str | Path) -> None:
    """An output folder must be creatable: not under a file, not on a kernel pseudo file
    system (``/proc``, ``/sys``, ``/dev``), its nearest existing ancestor a writable folder.
    Checked before any work, so the failure is one line, not an ``OSError`` at the end."""
    out = Path(out_dir)
    resolved = out.resolve()
    if any(resolved == p or p in resolved.parents for p in _PSEUDO_FS):
        raise InputError(out, "an output folder on a real file system", f"a path under /{resolved.parts[1]}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "an output folder", "a file")
    ancestor = resolved
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(out, "an output folder", f"a path under the file {ancestor}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(out, "an output folder you can write", f"no write permission in {ancestor}")


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Build an output folder in a temporary sibling; swap it in only on success.

    On failure the previous folder (if any) is untouched and the staging folder removed.
    """
    out = Path(out_dir)
    check_writable_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name}.old{os.getpid()}"
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
